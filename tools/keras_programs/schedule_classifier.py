"""Epoch-2 diagnosis of the transformer classifier: where K-FAC's steps go over time.

Trains `benchmarks.keras_programs`' transformer program (same model, data,
sizes, batch and epochs: train 6000 / val 2000, batch 32, 2 epochs) with Adam
or K-FAC and prints one JSON line per window of `--window` steps:

- `val_accuracy` / `val_loss` and `train_accuracy` / `train_loss` on the
  first 2000 training reviews, both in inference mode (no Dropout), so the
  train/val gap says whether the model overfits;
- `fit_loss`: the running training loss `fit` reports (with Dropout);
- `path`: the summed length of the window's parameter updates
  (sum over steps of `||w_t - w_{t-1}||`), `displacement`: `||w_end -
  w_start||` over the window, and `efficiency = displacement / path` (1 for
  steps that all point one way; about `1/sqrt(steps)` for a random walk);
  `layers`: the six variables with the largest RMS movement per entry over
  the window;
- K-FAC's logs averaged over the window (`step_size`, `update_norm`, `damping`).

    python tools/keras_programs/schedule_classifier.py --optimizer kfac --seed 0
    python tools/keras_programs/schedule_classifier.py --optimizer kfac \
        --kfac '{"learning_rate": 0.003}'
    python tools/keras_programs/schedule_classifier.py --optimizer kfac --cosine 0.1

`--cosine f` passes `keras.optimizers.schedules.CosineDecay(lr, steps of the
fit, alpha=f)` as the learning rate (K-FAC's lr, 1e-2 unless `--kfac` says
otherwise; Adam's 1e-3); `--decay cosine` uses `KFACCallback(decay=...)`
instead (kfac_keras/step_length.py) when the library has it.
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.keras_program_models import build_transformer_classifier, synthetic_reviews  # noqa: E402
del sys.path[0]

TRAIN, VAL, BATCH, EPOCHS = 6000, 2000, 32, 2  # benchmarks.keras_programs' transformer program
KFAC_LOG_KEYS = ("step_size", "update_norm", "damping")


def flat_weights(model):
    """The trainable weights, per variable (NumPy copies)."""
    return [np.array(v.numpy(), dtype=np.float64) for v in model.trainable_variables]


class WindowProbe(keras.callbacks.Callback):
    """Prints one JSON line of progress, noise and layer movement per window of steps."""

    def __init__(self, window, data, tag):
        super().__init__()
        self.window, self.data, self.tag = window, data, tag
        self.step = 0

    def on_train_begin(self, logs=None):
        self.start_time = time.time()
        self.names = [v.path for v in self.model.trainable_variables]
        self.previous = flat_weights(self.model)
        self._reset_window()

    def _reset_window(self):
        self.window_start = [w.copy() for w in self.previous]
        self.path = 0.0
        self.kfac_sums = {}
        self.fit_losses = []

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        current = flat_weights(self.model)
        self.path += float(np.sqrt(sum(np.sum((c - p) ** 2)
                                       for c, p in zip(current, self.previous))))
        self.previous = current
        for key in KFAC_LOG_KEYS:
            if key in logs:
                self.kfac_sums[key] = self.kfac_sums.get(key, 0.0) + float(logs[key])
        self.fit_losses.append(float(logs.get("loss", np.nan)))
        self.step += 1
        if self.step % self.window == 0:
            self._report()

    def _report(self):
        (x_train, y_train), (x_val, y_val) = self.data
        val_loss, val_acc = self.model.evaluate(x_val, y_val, batch_size=256, verbose=0)
        train_loss, train_acc = self.model.evaluate(x_train[:VAL], y_train[:VAL], batch_size=256,
                                                    verbose=0)
        moves = [float(np.linalg.norm(c - s)) for c, s in zip(self.previous, self.window_start)]
        displacement = float(np.sqrt(sum(m * m for m in moves)))
        # RMS movement per entry (comparable across variables; zero-initialised
        # biases make a relative movement meaningless), largest first.
        rms_move = {n.split("/")[-2] + "/" + n.split("/")[-1]:
                    float(f"{m / np.sqrt(max(s.size, 1)):.3g}")
                    for n, m, s in zip(self.names, moves, self.window_start)}
        top = dict(sorted(rms_move.items(), key=lambda kv: -kv[1])[:6])
        record = {"run": self.tag, "step": self.step, "epoch": round(self.step * BATCH / TRAIN, 2),
                  "val_accuracy": round(val_acc, 4), "val_loss": round(val_loss, 4),
                  "train_accuracy": round(train_acc, 4), "train_loss": round(train_loss, 4),
                  "fit_loss": round(self.fit_losses[-1], 4),
                  "path": round(self.path, 4), "displacement": round(displacement, 4),
                  "efficiency": round(displacement / max(self.path, 1e-12), 4),
                  **{k: float(f"{v / self.window:.4g}") for k, v in self.kfac_sums.items()},
                  "lr_now": float(f"{float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)):.4g}"),
                  "seconds": round(time.time() - self.start_time, 1), "layers": top}
        print(json.dumps(record), flush=True)
        self._reset_window()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=["adam", "kfac"], default="kfac")
    parser.add_argument("--kfac", default="{}", help="JSON keyword arguments of KFAC(...)")
    parser.add_argument("--cosine", type=float, default=None,
                        help="CosineDecay over the fit's steps to this fraction of the lr")
    parser.add_argument("--decay", default=None, help="KFACCallback(decay=...) (K-FAC only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=47, help="steps per printed line")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    data = (synthetic_reviews(TRAIN, 1), synthetic_reviews(VAL, 2))
    (x_train, y_train), (x_val, y_val) = data
    model = build_transformer_classifier()
    total_steps = EPOCHS * -(-TRAIN // BATCH)
    callbacks = []
    if args.optimizer == "adam":
        lr = 1e-3  # Keras's Adam default ("adam" in compile)
        if args.cosine is not None:
            lr = keras.optimizers.schedules.CosineDecay(lr, total_steps, alpha=args.cosine)
        optimizer = keras.optimizers.Adam(lr)
    else:
        import kfac_keras

        options = json.loads(args.kfac)
        if args.cosine is not None:
            options["learning_rate"] = keras.optimizers.schedules.CosineDecay(
                options.get("learning_rate", 1e-2), total_steps, alpha=args.cosine)
        optimizer = kfac_keras.KFAC(**options)
        callback_options = {"verbose": 0}
        if args.decay:
            callback_options["decay"] = args.decay
        callbacks.append(kfac_keras.KFACCallback(**callback_options))
    tag = args.tag or f"{args.optimizer} {args.kfac if args.optimizer == 'kfac' else ''}" \
        f"{' cosine ' + str(args.cosine) if args.cosine is not None else ''}" \
        f"{' decay ' + args.decay if args.decay else ''} seed {args.seed}"
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=BATCH, epochs=EPOCHS, verbose=0,
              validation_data=(x_val, y_val),
              callbacks=callbacks + [WindowProbe(args.window, data, tag)])


if __name__ == "__main__":
    main()
