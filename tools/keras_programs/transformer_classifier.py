"""keras-io's `text_classification_with_transformer`, on synthetic data.

The model is the keras-io program's (token + position Embedding, one
transformer block with 2-head MultiHeadAttention, feed-forward 32,
LayerNormalization, Dropout 0.1, GlobalAveragePooling1D, Dropout, Dense 20
relu, Dense 2 softmax, `sparse_categorical_crossentropy` on probabilities);
only the optimizer line and the callback change between runs. There is no
internet here, so the IMDB reviews are replaced by synthetic ones of the same
shapes (vocabulary 20,000, length 200, ids padded with 0 in front like
`pad_sequences`): Zipf-distributed filler tokens, and a few "sentiment" tokens
per review, drawn from the label's set with probability `--signal` and from
the other set otherwise (so the label is learnable but noisy).

Usage (one JSON line per epoch on stdout):

    python tools/keras_programs/transformer_classifier.py --optimizer adam
    python tools/keras_programs/transformer_classifier.py --optimizer kfac \
        --kfac '{"damping": 0.01}' --position batched
"""

import argparse
import json
import os
import sys
import time

import keras

# The models and data live in benchmarks/keras_program_models.py (one copy;
# transformer_diagnostics.py reads SENTIMENT_TOKENS from here). The repository
# root is on sys.path only for this import, so `kfac_keras` still comes from
# wherever it came from before.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.keras_program_models import SENTIMENT_TOKENS, synthetic_reviews  # noqa: E402,F401
from benchmarks.keras_program_models import build_transformer_classifier as build_model  # noqa: E402
del sys.path[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=["adam", "sgd", "kfac"], default="kfac")
    parser.add_argument("--learning-rate", type=float, default=0.1, help="for --optimizer sgd")
    parser.add_argument("--kfac", default="{}", help="JSON keyword arguments of KFAC(...); a dict "
                        "`adaptive` becomes kfac_keras.AdaptiveOptions(**adaptive)")
    parser.add_argument("--adam-cosine-steps", type=int, default=0,
                        help="for --optimizer adam: Adam(CosineDecay(1e-3, N, alpha=0.1)) (0: plain 'adam')")
    parser.add_argument("--step-rule", default="", help="JSON StepRuleKFAC arguments (tools/step_efficiency/step_rules.py): train with that step rule instead of KFAC's (kfac_choice.py)")
    parser.add_argument("--position", choices=["keras_io", "batched"], default="keras_io")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--val", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal", type=float, default=0.8,
                        help="probability that a sentiment token matches the label")
    parser.add_argument("--sentiment", type=float, default=12.0,
                        help="mean number of sentiment tokens per review")
    parser.add_argument("--log-every", type=int, default=0,
                        help="print the K-FAC diagnostics every N batches (0: never)")
    parser.add_argument("--report", action="store_true", help="print the registration report")
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    x_train, y_train = synthetic_reviews(args.train, 1, args.signal, args.sentiment)
    x_val, y_val = synthetic_reviews(args.val, 2, args.signal, args.sentiment)
    model = build_model(args.position, args.dropout)
    callbacks = []
    if args.optimizer == "adam":
        optimizer = "adam" if not args.adam_cosine_steps else keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(1e-3, args.adam_cosine_steps, alpha=0.1))
    elif args.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(args.learning_rate, momentum=0.9)
    else:
        import kfac_keras
        from kfac_choice import make_kfac

        options = json.loads(args.kfac)
        if isinstance(options.get("adaptive"), dict):
            options["adaptive"] = kfac_keras.AdaptiveOptions(**options["adaptive"])
        optimizer = make_kfac(options, args.step_rule)
        callbacks.append(kfac_keras.KFACCallback(verbose=int(args.report)))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])

    class EpochLine(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.time()

        def on_epoch_end(self, epoch, logs=None):
            print(json.dumps({"optimizer": args.optimizer, "kfac": args.kfac,
                              "step_rule": args.step_rule, "seed": args.seed,
                              **({"adam_cosine_steps": args.adam_cosine_steps}
                                 if args.adam_cosine_steps else {}),
                              "position": args.position, "dropout": args.dropout,
                              "epoch": epoch + 1,
                              "steps": (epoch + 1) * -(-args.train // args.batch_size),
                              "loss": round(float(logs["loss"]), 4),
                              "val_accuracy": round(float(logs["val_accuracy"]), 4),
                              "val_loss": round(float(logs["val_loss"]), 4),
                              "seconds": round(time.time() - self.start, 1),
                              **kfac_logs(logs)}), flush=True)

        def on_train_batch_end(self, batch, logs=None):
            if args.log_every and batch % args.log_every == 0:
                print(json.dumps({"batch": batch, "loss": round(float(logs["loss"]), 4),
                                  **kfac_logs(logs)}), flush=True)

    def kfac_logs(logs):
        keys = ("damping", "update_norm", "rho", "kfac_skipped_steps")
        return {k: float(f"{float(logs[k]):.4g}") for k in keys if k in logs}

    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
              validation_data=(x_val, y_val), verbose=0,
              callbacks=callbacks + [EpochLine()])


if __name__ == "__main__":
    main()
