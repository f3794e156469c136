"""S6-classifier: `benchmarks.keras_programs`' transformer program, one run per call, as JSON.

The same model, data, budget and seeding as `python -m benchmarks.keras_programs --programs
transformer --seed S` (its `PROGRAMS["transformer"]` and `EpochRecorder`), with three
experimental knobs the benchmark does not have:

* `--decay cosine`: `KFACCallback(decay="cosine")` (a callback change a user can make);
* `--embed-factor F`: sets `kfac_keras.orthogonal_step.EMBEDDING_LEARNING_RATE_FACTOR` before
  the first step is traced (the library's Embedding rule at another factor; tools-only, the
  library file is not edited);
* `--kfac JSON`: extra `KFAC(...)` arguments;
* `--rule JSON`: build `tools/step_efficiency/embedding_rules.EmbeddingRuleKFAC(**rule, **kfac)`
  (S5-embed's experimental Embedding treatments, e.g. `{"embedding_rule": "present",
  "present_rms": 0.05}`) instead of `kfac_keras.KFAC(**kfac)`.

Prints one JSON line: the configuration and, per epoch, `val_accuracy`, `val_loss`, `loss`.

    PYTHONPATH=. python tools/keras_programs/s6_classifier.py --optimizer kfac --seed 0
"""

import argparse
import json
import os
import sys

import keras

from benchmarks import keras_programs


def seeded_transformer(seed, epochs=None):
    """The benchmark's transformer program, data and a model built after
    `keras.utils.set_random_seed(seed)`: `(program, train, val, epochs, model)`
    (`epochs` None: the program's)."""
    program = keras_programs.PROGRAMS["transformer"]
    train, val, _ = program.load_data(program.train, program.val, None)
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    return program, train, val, epochs or program.epochs, program.build_model()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=("adam", "kfac"), default="kfac")
    parser.add_argument("--kfac", default="{}", help="JSON keyword arguments of KFAC(...)")
    parser.add_argument("--rule", default=None, help="JSON EmbeddingRuleKFAC arguments")
    parser.add_argument("--decay", default=None, help="KFACCallback(decay=...)")
    parser.add_argument("--embed-factor", type=float, default=None,
                        help="EMBEDDING_LEARNING_RATE_FACTOR (default: the library's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)

    import kfac_keras
    from kfac_keras import orthogonal_step

    if args.embed_factor is not None:
        orthogonal_step.EMBEDDING_LEARNING_RATE_FACTOR = args.embed_factor
    program, (x, y), (x_val, y_val), epochs, model = seeded_transformer(args.seed, args.epochs)
    callbacks = []
    options = json.loads(args.kfac)
    if args.optimizer == "adam":
        optimizer = "adam"
    else:
        if args.rule is not None:
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))), "step_efficiency"))
            from embedding_rules import EmbeddingRuleKFAC

            optimizer = EmbeddingRuleKFAC(**json.loads(args.rule), **options)
        else:
            optimizer = kfac_keras.KFAC(**options)
        callbacks.append(kfac_keras.KFACCallback(verbose=0, decay=args.decay))
    model.compile(optimizer=optimizer, loss=program.loss, metrics=list(program.metrics))
    recorder = keras_programs.EpochRecorder()
    model.fit(x, y, batch_size=program.batch_size, epochs=epochs,
              validation_data=(x_val, y_val), verbose=0, callbacks=callbacks + [recorder])
    record = {
        "tag": args.tag, "optimizer": args.optimizer, "kfac": options, "decay": args.decay,
        "rule": json.loads(args.rule) if args.rule else None,
        "embed_factor": (orthogonal_step.EMBEDDING_LEARNING_RATE_FACTOR
                         if args.optimizer == "kfac" else None),
        "seed": args.seed,
        "sampling_seed": (model.optimizer.curvature.sampling_seed_value if args.optimizer == "kfac"
                          else None),
        "epochs": [{k: round(float(e[k]), 4) for k in ("val_accuracy", "val_loss", "loss")}
                   for e in recorder.epochs],
    }
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
