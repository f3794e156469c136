"""Tables of RESULTS.md S5-schedule from logs_schedule_classifier.jsonl (schedule_classifier.py).

    python tools/keras_programs/summarize_schedule.py tools/keras_programs/logs/logs_schedule_classifier.jsonl
"""

import collections
import json
import sys

EPOCH_STEPS = (188, 376)  # the last window of epochs 1 and 2


def main(path):
    runs = collections.OrderedDict()
    for line in open(path):
        record = json.loads(line)
        runs.setdefault(record["run"], {})[record["step"]] = record
    print("| run | val acc ep 1 / 2 | train acc ep 1 / 2 (no Dropout) | train loss ep 1 / 2 | "
          "val loss ep 1 / 2 | path per 47 steps, ep 2 (mean) | efficiency ep 2 (mean) |")
    print("|---|---|---|---|---|---|---|")
    for name, by_step in runs.items():
        if not all(s in by_step for s in EPOCH_STEPS):
            continue
        one, two = (by_step[s] for s in EPOCH_STEPS)
        late = [r for s, r in by_step.items() if s > EPOCH_STEPS[0]]
        path = sum(r["path"] for r in late) / len(late)
        efficiency = sum(r["efficiency"] for r in late) / len(late)
        print(f"| {name} | {one['val_accuracy']:.4f} / {two['val_accuracy']:.4f} | "
              f"{one['train_accuracy']:.4f} / {two['train_accuracy']:.4f} | "
              f"{one['train_loss']:.3f} / {two['train_loss']:.3f} | "
              f"{one['val_loss']:.3f} / {two['val_loss']:.3f} | {path:.1f} | {efficiency:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1])
