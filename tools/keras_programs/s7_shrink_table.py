"""S7-shrink: one row per s7_shrink.py / s7_classgap.py log (val accuracy per epoch, epoch 2's
checkpoints, how far ff2 moved, the shrink factors in epoch 2, final norms and damping).

    python tools/keras_programs/s7_shrink_table.py tools/keras_programs/logs/s7_shrink/*.jsonl
"""

import json
import sys

FF2 = "transformer_block/sequential/dense_1/kernel"
TOKEN = "token_and_position_embedding/embedding/embeddings"


def read(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.startswith("{")]


def row(path):
    records = read(path)
    summary = [r for r in records if r["kind"] == "summary"]
    if not summary:
        return None
    summary = summary[0]
    # Batch checkpoints of epoch 2 (steps 235-376; the epoch-end line repeats step 376).
    # The first line per step: the epoch-end line's `moved` is 0 (measured right after the batch's).
    checkpoints, shrinks = {}, {}
    for r in records:
        if r["kind"] in ("checkpoint", "shrink") and r["step"] > 188:
            (checkpoints if r["kind"] == "checkpoint" else shrinks).setdefault(r["step"], r)
    steps = sorted(checkpoints)
    accuracies = [checkpoints[s]["val_accuracy"] for s in steps]
    moved = [checkpoints[s]["moved"][FF2] for s in steps]
    if shrinks:
        factors = [shrinks[s]["shrink_factor"] for s in steps]
        # Per matrix, the mean over epoch 2's checkpoints; shown as min-max over the matrices.
        per_matrix = [sum(f[k] for f in factors) / len(factors) for k in range(len(factors[0]))]
        factor_cell = f"{min(per_matrix):.3g}-{max(per_matrix):.3g}"
    else:
        factor_cell = "-"
    last = checkpoints[steps[-1]]
    epochs = " / ".join(f"{e['val_accuracy']:.4f}" for e in summary["epochs"])
    return (f"| {summary['tag']} | `{json.dumps(summary['kfac'])}` | {epochs} | "
            + " / ".join(f"{a:.4f}" for a in accuracies)
            + f" | {sum(accuracies) / len(accuracies):.4f} | {min(moved):.2f}-{max(moved):.2f} | "
            f"{factor_cell} | {last['norms'][TOKEN]:.1f} / {last['norms'][FF2]:.2f} | "
            f"{last.get('last_damping', '-')} |")


def main(paths):
    print("| run | KFAC options | val acc e1 / e2 | epoch-2 checkpoints (235/282/329/376) | their mean "
          "| ff2 moved per 47 steps, epoch 2 | shrink factor in epoch 2 (per-matrix means, min-max) "
          "| final tok / ff2 | last damping |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        line = row(path)
        if line:
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
