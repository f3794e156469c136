"""Weight growth of the BiLSTM classifier once its training loss is ~0 (session 6, issue 15).

    PYTHONPATH=. python tools/keras_programs/bilstm_growth.py [--epochs 12] [--optimizer kfac]
        [--kfac-options JSON] [--seed 0] [--out LOG.jsonl]

The model and data of `python -m benchmarks.keras_programs --programs bilstm`
(Embedding(12, 16) -> Bidirectional(LSTM(32)) -> Dense(2) logits, order
task of length 20, 4,096 / 1,024 sequences, batch 64), fitted with
`KFAC(seed=--seed, **options)` + `KFACCallback` or with `"adam"`. Prints
and writes, per epoch: the epoch-mean and largest batch training loss, the
validation accuracy and loss, the Frobenius norm of every variable, and the
epoch means of K-FAC's logged `step_size` / `update_norm` / damping (the
log keys starting with `kfac_`). K-FAC's Fisher sampling is seeded, so runs
repeat.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.keras_program_models import build_recurrent_classifier, order_task  # noqa: E402
del sys.path[0]

import kfac_keras  # noqa: E402


class EpochRecorder(keras.callbacks.Callback):
    """Per-epoch batch-loss maximum, K-FAC log means and variable norms."""

    def __init__(self, out, trace=None, trace_epochs=0):
        super().__init__()
        self.out = out
        self.trace = trace
        self.trace_epochs = trace_epochs
        self.records = []

    def on_epoch_begin(self, epoch, logs=None):
        self._batch_losses, self._kfac = [], {}
        self._epoch = epoch

    def _trace_batch(self, batch, logs):
        """One line per batch: running loss, variable norms and, for K-FAC,
        its logged values (`KFAC.logged_values`: step_size, update_norm, ...)."""
        record = {"epoch": self._epoch + 1, "batch": batch,
                  "running_loss": float(logs.get("loss", np.nan)),
                  "norms": {v.path: float(np.linalg.norm(np.asarray(v, np.float64)))
                            for v in self.model.trainable_variables}}
        optimizer = self.model.optimizer
        if isinstance(optimizer, kfac_keras.KFAC):
            record["kfac"] = {k: float(np.asarray(v))
                              for k, v in optimizer.logged_values().items()}
        with open(self.trace, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if self.trace is not None and self._epoch < self.trace_epochs:
            self._trace_batch(batch, logs)
        self._batch_losses.append(float(logs.get("loss", np.nan)))
        for key, value in logs.items():
            if key.startswith("kfac_"):
                self._kfac.setdefault(key, []).append(float(value))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        # Keras's batch "loss" is the running mean over the epoch; the batch's
        # own loss is recovered from consecutive running means.
        running = np.array(self._batch_losses)
        counts = np.arange(1, len(running) + 1)
        own = running * counts - np.concatenate([[0.0], running[:-1] * counts[:-1]])
        record = {
            "epoch": epoch + 1,
            "train_loss": float(logs.get("loss", np.nan)),
            "max_batch_loss": float(np.max(own)),
            "val_accuracy": float(logs.get("val_accuracy", np.nan)),
            "val_loss": float(logs.get("val_loss", np.nan)),
            "norms": {v.path: float(np.linalg.norm(np.asarray(v, np.float64)))
                      for v in self.model.trainable_variables},
            "kfac_mean": {k: float(np.mean(v)) for k, v in self._kfac.items()},
            "kfac_max": {k: float(np.max(v)) for k, v in self._kfac.items()},
        }
        self.records.append(record)
        print(json.dumps(record), flush=True)
        if self.out:
            with open(self.out, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--optimizer", choices=("kfac", "adam"), default="kfac")
    parser.add_argument("--kfac-options", default="{}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--trace", default=None,
                        help="JSON-lines file for a per-batch trace of the first --trace-epochs")
    parser.add_argument("--trace-epochs", type=int, default=2)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    x, y = order_task(4096, args.length, 12, 0)
    x_val, y_val = order_task(1024, args.length, 12, 1)
    model = build_recurrent_classifier("bilstm", args.length, 12, 32)
    callbacks = [EpochRecorder(args.out, args.trace, args.trace_epochs)]
    if args.optimizer == "kfac":
        options = json.loads(args.kfac_options)
        options.setdefault("seed", args.seed)
        optimizer = kfac_keras.KFAC(**options)
        callbacks.insert(0, kfac_keras.KFACCallback(verbose=0))
    else:
        optimizer = "adam"
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps({"argv": sys.argv, "options": args.kfac_options,
                                     "kfac_keras": kfac_keras.__file__}) + "\n")
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=args.epochs, validation_data=(x_val, y_val),
              callbacks=callbacks, verbose=0)


if __name__ == "__main__":
    main()
