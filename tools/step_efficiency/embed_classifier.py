"""keras-io's transformer classifier (`benchmarks.keras_programs`, program
"transformer") with Adam and with K-FAC Embedding treatments (S5-embed).

    python tools/step_efficiency/embed_classifier.py \\
        --configs '{"row_0.2": {"embedding_rule": "row", "row_rms": 0.2}}' [--no-adam]

A config with `embedding_rule` builds `embedding_rules.EmbeddingRuleKFAC`;
one without builds `kfac_keras.KFAC(**config)` (the library). The benchmark's
`run_program` is used as it is: only the `kfac_keras.KFAC` it calls is
replaced by the experiment class for the duration of a run. Prints one JSON
line per run (val_accuracy and train loss per epoch, fit seconds).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import kfac_keras  # noqa: E402
from benchmarks import keras_programs  # noqa: E402
from embedding_rules import EmbeddingRuleKFAC  # noqa: E402


def run(name, config, data, program, epochs, seed):
    library = kfac_keras.KFAC
    optimizer_name = "kfac"
    if config is None:
        optimizer_name = "adam"
    elif "embedding_rule" in config:
        kfac_keras.KFAC = EmbeddingRuleKFAC
    try:
        result = keras_programs.run_program(program, optimizer_name, data, epochs=epochs,
                                            seed=seed, kfac_options=config)
    finally:
        kfac_keras.KFAC = library
    row = {"config": name, "kwargs": config,
           "val_accuracy": [round(e["val_accuracy"], 4) for e in result["epochs"]],
           "loss": [round(e["loss"], 4) for e in result["epochs"]],
           "seconds": round(result["seconds"], 1)}
    print(json.dumps(row), flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="{}", help="JSON: name -> KFAC / EmbeddingRuleKFAC kwargs")
    p.add_argument("--no-adam", action="store_true", help="skip the Adam run")
    p.add_argument("--epochs", type=int, default=None, help="default: the program's (2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    program = keras_programs.PROGRAMS["transformer"]
    (x, y), (x_val, y_val), source = program.load_data(program.train, program.val, None)
    epochs = args.epochs or program.epochs
    print(f"transformer classifier: {source}; {program.train}/{program.val} examples, "
          f"{epochs} epochs, seed {args.seed}", flush=True)
    data = ((x, y), (x_val, y_val))
    if not args.no_adam:
        run("adam", None, data, program, epochs, args.seed)
    for name, config in json.loads(args.configs).items():
        run(name, config, data, program, epochs, args.seed)


if __name__ == "__main__":
    main()
