"""S7-classgap: the transformer classifier's epoch-2 gap (issue 15), with diagnostics.

The program of `s6_classifier.py` (`benchmarks.keras_programs.PROGRAMS["transformer"]`: same
data, model, budget and seeding, so `--optimizer kfac --seed 0` reproduces the benchmark's
epoch numbers), `KFAC(**json.loads(--kfac))` + `KFACCallback()` or `"adam"`, plus a callback
that every `--checkpoint-every` batches and at each epoch's end records, *without touching the
compiled metrics* (it uses `model.predict`, not `evaluate`, which would reset the epoch's
training loss):

* loss and accuracy in inference mode on the validation set and on the first `--train-probe`
  training reviews (so train vs val is measured the same way, without Dropout);
* the logits `z` of the final Dense (its input times its kernel plus bias; the model outputs
  softmax probabilities): mean and max `|z_1 - z_0|` on the validation set, the fraction of
  validation reviews predicted with probability > 0.99, and the share of the validation loss
  that comes from misclassified reviews (overconfidence on mistakes);
* the Frobenius norm of every trainable variable, and the norm of its change since the last
  checkpoint (how far each table / kernel moved);
* the K-FAC logs `damping` and `orthogonal_bound` of the last batch, when present.

One JSON line per checkpoint on stdout (`"kind": "checkpoint"`), then one summary line
(`"kind": "summary"`) with the per-epoch Keras logs (`val_accuracy`, `val_loss`, `loss`).

    PYTHONPATH=. python tools/keras_programs/s7_classgap.py --optimizer kfac --seed 0 \
        --kfac '{"weight_decay": 0.01}'
"""

import argparse
import json
import sys

import keras
import numpy as np

from benchmarks import keras_programs
from s6_classifier import seeded_transformer

#: Keras's clipping of probabilities in `sparse_categorical_crossentropy`.
PROBABILITY_EPSILON = 1e-7


def probe_metrics(probabilities, labels):
    """Cross-entropy and accuracy of softmax outputs, as Keras computes them."""
    picked = np.clip(probabilities[np.arange(len(labels)), labels], PROBABILITY_EPSILON, 1.0)
    losses = -np.log(picked)
    correct = np.argmax(probabilities, axis=1) == labels
    return losses, correct


class Diagnostics(keras.callbacks.Callback):
    """Records the quantities of the module docstring every `every` batches and per epoch."""

    def __init__(self, train_probe, val, every):
        super().__init__()
        self.train_probe, self.val, self.every = train_probe, val, every
        self.step = 0
        self.previous = None

    def on_train_begin(self, logs=None):
        final = self.model.layers[-1]
        # The final Dense's input, so the logits can be formed from its kernel and bias.
        self.features = keras.Model(self.model.inputs, final.input)
        self.final = final
        self.previous = {v.path: np.array(v) for v in self.model.trainable_variables}
        self._record(epoch=0, logs={})

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.every and self.step % self.every == 0:
            self._record(epoch=None, logs=logs or {})

    def on_epoch_end(self, epoch, logs=None):
        self._record(epoch=epoch + 1, logs=logs or {})

    def _record(self, epoch, logs):
        record = {"kind": "checkpoint", "step": self.step, "epoch": epoch}
        for name, (x, y) in (("train_probe", self.train_probe), ("val", self.val)):
            features = self.features.predict(x, batch_size=500, verbose=0)
            logits = features @ np.array(self.final.kernel) + np.array(self.final.bias)
            logits = logits - logits.max(axis=1, keepdims=True)
            probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            losses, correct = probe_metrics(probabilities, y)
            record[f"{name}_loss"] = round(float(losses.mean()), 4)
            record[f"{name}_accuracy"] = round(float(correct.mean()), 4)
            if name == "val":
                margin = np.abs(logits[:, 1] - logits[:, 0])
                record["val_margin_mean"] = round(float(margin.mean()), 3)
                record["val_margin_max"] = round(float(margin.max()), 3)
                record["val_confident_fraction"] = round(
                    float((probabilities.max(axis=1) > 0.99).mean()), 4)
                record["val_loss_share_wrong"] = round(
                    float(losses[~correct].sum() / max(losses.sum(), 1e-12)), 4)
                record["val_wrong_mean_loss"] = round(
                    float(losses[~correct].mean()) if (~correct).any() else 0.0, 3)
        norms, moved = {}, {}
        for variable in self.model.trainable_variables:
            value = np.array(variable)
            norms[variable.path] = round(float(np.linalg.norm(value)), 4)
            moved[variable.path] = round(float(np.linalg.norm(value - self.previous[variable.path])), 4)
            self.previous[variable.path] = value
        record["norms"], record["moved"] = norms, moved
        for key in ("damping", "orthogonal_bound", "loss"):
            if key in logs:
                record[f"last_{key}"] = float(f"{float(logs[key]):.4g}")
        print(json.dumps(record), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=("adam", "kfac"), default="kfac")
    parser.add_argument("--kfac", default="{}", help="JSON keyword arguments of KFAC(...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=47,
                        help="batches between checkpoints (0: per epoch only); 188 per epoch")
    parser.add_argument("--train-probe", type=int, default=2000)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)

    import kfac_keras

    program, (x, y), (x_val, y_val), epochs, model = seeded_transformer(args.seed, args.epochs)
    callbacks = []
    options = json.loads(args.kfac)
    if args.optimizer == "adam":
        optimizer = "adam"
    else:
        optimizer = kfac_keras.KFAC(**options)
        callbacks.append(kfac_keras.KFACCallback(verbose=0))
    model.compile(optimizer=optimizer, loss=program.loss, metrics=list(program.metrics))
    recorder = keras_programs.EpochRecorder()
    diagnostics = Diagnostics((x[:args.train_probe], np.asarray(y[:args.train_probe])),
                              (x_val, np.asarray(y_val)), args.checkpoint_every)
    model.fit(x, y, batch_size=program.batch_size, epochs=epochs,
              validation_data=(x_val, y_val), verbose=0,
              callbacks=callbacks + [diagnostics, recorder])
    record = {
        "kind": "summary", "tag": args.tag, "optimizer": args.optimizer, "kfac": options,
        "seed": args.seed,
        "sampling_seed": (model.optimizer.curvature.sampling_seed_value
                          if args.optimizer == "kfac" else None),
        "kfac_keras": kfac_keras.__file__,
        "epochs": [{k: round(float(e[k]), 4) for k in ("val_accuracy", "val_loss", "loss")}
                   | {"seconds": round(e["seconds"], 1)} for e in recorder.epochs],
    }
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
