"""Markdown tables of the JSON lines written by run.py (one table per task).

    python tools/step_efficiency/summarize.py tools/step_efficiency/logs/*.jsonl

Rows keep the order of the runs; a configuration run again replaces its
earlier row. Ratio rows (`--ratio`) fill the `ratio to Adam` column, and
`time = steps x ratio` (in Adam steps) is given for the last target.
"""

import json
import sys


def main(paths):
    for path in paths:
        runs, ratios = {}, {}
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if "ratio_config" in row:
                    ratios[row["ratio_config"]] = row
                else:
                    runs[row["config"]] = row
        if not runs:
            continue
        first = next(iter(runs.values()))
        targets = list(first["reach"])
        print(f"\n### {first['task']}\n")
        header = (["config", "steps"] + [f"steps to {t}" for t in targets]
                  + ["final (10-step mean)", "ratio to Adam", f"Adam-step units to {targets[-1]}"])
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for name, row in runs.items():
            reach = [row["reach"].get(t) for t in targets]
            ratio = ratios.get(name, {}).get("ratio")
            if name.startswith("adam:"):
                ratio = 1.0 if ratio is None else ratio
            units = (f"{reach[-1] * ratio:.0f}" if ratio is not None and reach[-1] is not None
                     else "-")
            final = "diverged" if row.get("diverged") else f"{row['final']:.4g}"
            print("| " + " | ".join(
                [name, str(row["steps"])] + ["-" if r is None else str(r) for r in reach]
                + [final, "-" if ratio is None else f"{ratio:.2f}", units]) + " |")
        extra = [r for n, r in ratios.items() if n not in runs]
        for r in extra:
            print(f"\n(ratio only) {r['ratio_config']}: {r['ratio']:.2f}x Adam")


if __name__ == "__main__":
    main(sys.argv[1:])
