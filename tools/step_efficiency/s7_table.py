"""S7-polar tables from a polar_run.py JSON-lines log: steps to each target, the step-time ratio to
Adam (alternated in the same process), Adam-step units (steps x ratio) and seconds (steps x the
variant's ms per step in the ratio rounds) to each target.

    python tools/step_efficiency/s7_table.py tools/step_efficiency/logs/s7_polar/ae_main.jsonl
"""

import json
import sys


def main(path):
    rows, ratios = [], {}
    for line in open(path):
        record = json.loads(line)
        if "ratio_config" in record:
            ratios[record["ratio_config"]] = record
        else:
            rows.append(record)
    targets = list(rows[0]["reach"])
    print("| config | steps to " + " / ".join(targets) + " | final | ratio (Adam ms, own ms)"
          " | Adam-step units to " + " / ".join(targets) + " | seconds to " + " / ".join(targets) + " |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        reach = [row["reach"][t] for t in targets]
        ratio = ratios.get(row["config"])
        steps = " / ".join("-" if r is None else str(r) for r in reach)
        if ratio is None:
            units = seconds = "-"
            ratio_text = "-"
        else:
            ratio_text = f"{ratio['ratio']:.2f} ({ratio['adam_ms']:.0f}, {ratio['ms']:.0f})"
            units = " / ".join("-" if r is None else f"{r * ratio['ratio']:.0f}" for r in reach)
            seconds = " / ".join("-" if r is None else f"{r * ratio['ms'] / 1000:.1f}" for r in reach)
        final = row["final"]
        print(f"| {row['config']} | {steps} | {final:.4g} | {ratio_text} | {units} | {seconds} |")


if __name__ == "__main__":
    main(sys.argv[1])
