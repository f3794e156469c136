"""Table of the S6-classifier runs: `python tools/keras_programs/s6_table.py LOG.jsonl ...`."""
import json
import sys

rows = {}
for path in sys.argv[1:]:
    for line in open(path):
        if line.startswith("{"):
            r = json.loads(line)
            rows[r["tag"]] = r
for tag in sorted(rows):
    r = rows[tag]
    e = r["epochs"]
    print(f"{tag:18s} " + "  ".join(f"acc {x['val_accuracy']:.4f} vloss {x['val_loss']:.3f} "
                                     f"loss {x['loss']:.3f}" for x in e))
