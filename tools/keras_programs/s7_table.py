"""S7-classgap: tables from `s7_classgap.py` logs.

    python tools/keras_programs/s7_table.py LOG.jsonl ...          # per-run checkpoint tables
    python tools/keras_programs/s7_table.py --summary LOG.jsonl ... # one row per run (epochs)
    python tools/keras_programs/s7_table.py --epoch2 LOG.jsonl ...  # epoch 2's checkpoints
"""

import json
import sys

#: Short names of the variables shown (the full paths are in the logs).
SHOWN = {
    "token_and_position_embedding/embedding/embeddings": "tok",
    "token_and_position_embedding/embedding_1/embeddings": "pos",
    "transformer_block/multi_head_attention/value/kernel": "V",
    "transformer_block/sequential/dense_1/kernel": "ff2",
    "dense_2/kernel": "d20",
    "dense_3/kernel": "out",
}


def read(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.startswith("{")]


def checkpoints(path):
    records = read(path)
    print(f"\n{path}")
    names = list(SHOWN.values())
    print("| step | train loss/acc | val loss/acc | margin mean/max | p>0.99 | wrong share | "
          + " | ".join(f"|{n}| (moved)" for n in names) + " | damping |")
    print("|" + "---|" * (7 + len(names)))
    last_step = None
    for r in records:
        # The last batch checkpoint of an epoch and the epoch's own coincide: one row.
        if r.get("kind") != "checkpoint" or r["step"] == last_step:
            continue
        last_step = r["step"]
        cells = [f"{r['norms'][p]:.2f} ({r['moved'][p]:.2f})" for p in SHOWN]
        print(f"| {r['step']} | {r['train_probe_loss']:.3f} / {r['train_probe_accuracy']:.3f} | "
              f"{r['val_loss']:.3f} / {r['val_accuracy']:.4f} | {r['val_margin_mean']:.2f} / "
              f"{r['val_margin_max']:.1f} | {r['val_confident_fraction']:.3f} | "
              f"{r['val_loss_share_wrong']:.2f} | " + " | ".join(cells)
              + f" | {r.get('last_damping', '')} |")


def summary(paths):
    print("| run | seed | val acc e1 / e2 | val loss e2 | train loss e2 | seconds |")
    print("|---|---|---|---|---|---|")
    for path in paths:
        for r in read(path):
            if r.get("kind") == "summary":
                e = r["epochs"]
                print(f"| {r['tag']} | {r['seed']} | "
                      + " / ".join(f"{x['val_accuracy']:.4f}" for x in e)
                      + f" | {e[-1]['val_loss']:.3f} | {e[-1]['loss']:.3f} | {e[-1]['seconds']} |")


def epoch2(paths):
    """Epoch 2's four checkpoints (steps 235-376): how far val accuracy and margins swing."""
    print("| run | val acc at steps 235/282/329/376 | mean | val margin mean, max over them | "
          "train-probe loss min-max | final |tok| / |ff2| / |d20| |")
    print("|---|---|---|---|---|---|")
    for path in paths:
        records = [r for r in read(path) if r.get("kind") == "checkpoint" and r["step"] > 188]
        seen, rows = set(), []
        for r in records:
            if r["step"] not in seen:
                seen.add(r["step"])
                rows.append(r)
        if not rows:
            continue
        tag = [r for r in read(path) if r.get("kind") == "summary"]
        name = tag[0]["tag"] if tag else path
        accuracies = [r["val_accuracy"] for r in rows]
        losses = [r["train_probe_loss"] for r in rows]
        last = rows[-1]["norms"]
        paths_ = list(SHOWN)
        print(f"| {name} | " + " / ".join(f"{a:.4f}" for a in accuracies)
              + f" | {sum(accuracies) / len(accuracies):.4f} | "
              f"{max(r['val_margin_mean'] for r in rows):.2f} | {min(losses):.3f}-{max(losses):.3f} | "
              f"{last[paths_[0]]:.1f} / {last[paths_[3]]:.2f} / {last[paths_[4]]:.2f} |")


if __name__ == "__main__":
    if sys.argv[1] == "--summary":
        summary(sys.argv[2:])
    elif sys.argv[1] == "--epoch2":
        epoch2(sys.argv[2:])
    else:
        for p in sys.argv[1:]:
            checkpoints(p)
