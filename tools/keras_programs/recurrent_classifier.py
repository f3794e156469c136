"""Recurrent classifiers trained with K-FAC at its defaults and with Adam, equal epochs.

    python tools/keras_programs/recurrent_classifier.py [--models lstm,bilstm] [--epochs 4]

Task (synthetic, seeded): sequences of `--length` tokens from a vocabulary of
`--vocabulary`, each holding exactly one token A (id 1) and one token B (id 2)
at random positions among distractors; the class is whether A comes before B.
Models: `Embedding -> LSTM -> Dense(2)` ("lstm") and
`Embedding -> Bidirectional(LSTM) -> Dense(2)` ("bilstm"). The K-FAC run
differs from the Adam run only in the optimizer and the callback. Prints, per
model and optimizer, the validation accuracy (final, and after each epoch),
the training loss of the first and last epochs, and the median training
step time (ms, steps of epochs after the first, so tracing is excluded).

`--overhead` also times, on the "lstm" model and one batch, a forward and
backward pass (in a `tf.function`) with and without K-FAC's capture of the
LSTM (which runs the recurrence in `tf.scan` with the pre-activations
exposed), and a K-FAC `fit` with the LSTM given the diagonal block (no LSTM
capture).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kfac_keras  # noqa: E402
from kfac_choice import make_kfac  # noqa: E402

# The models and data live in benchmarks/keras_program_models.py (one copy).
# The repository root is on sys.path only for this import, so `kfac_keras`
# still comes from wherever it came from before.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.keras_program_models import order_task  # noqa: E402
from benchmarks.keras_program_models import build_recurrent_classifier as build  # noqa: E402
del sys.path[0]



class StepTimer(keras.callbacks.Callback):
    """Wall time of every training batch after the first epoch."""

    def __init__(self):
        super().__init__()
        self.times = []
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch > 0:
            self.times.append(time.perf_counter() - self._start)


def run(kind, optimizer_name, data, args):
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_val, y_val) = data
    model = build(kind, args.length, args.vocabulary, args.units)
    timer = StepTimer()
    callbacks = [timer]
    if optimizer_name == "kfac":
        optimizer = make_kfac(json.loads(args.kfac), args.step_rule)
        callbacks.append(kfac_keras.KFACCallback(verbose=0))
    elif optimizer_name == "kfac, lstm diagonal":
        optimizer = kfac_keras.KFAC(layer_blocks={"LSTM": "diagonal"})
        callbacks.append(kfac_keras.KFACCallback(verbose=0))
    else:
        optimizer = keras.optimizers.Adam()
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                        validation_data=(x_val, y_val), callbacks=callbacks, verbose=0)
    kinds = None
    if optimizer_name.startswith("kfac"):
        kinds = [info["kind"] for info in optimizer.registration.describe()]
    return {"val_accuracy": history.history["val_accuracy"][-1],
            "val_accuracy_per_epoch": history.history["val_accuracy"],
            "loss_first_epoch": history.history["loss"][0],
            "loss_last_epoch": history.history["loss"][-1],
            "ms_per_step": 1000 * float(np.median(timer.times)) if timer.times else float("nan"),
            "blocks": kinds}


def _median_ms(functions, repeats=50):
    """Median ms per call of each function, calls interleaved (so load changes
    on a shared machine hit all alike)."""
    for fn in functions:
        fn()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for fn, record in zip(functions, times):
            start = time.perf_counter()
            fn().numpy()
            record.append(time.perf_counter() - start)
    return [1000 * float(np.median(t)) for t in times]


def _checksum(tensors):
    """One scalar that depends on every tensor (so none is pruned)."""
    return tf.add_n([tf.reduce_sum(tf.square(tf.convert_to_tensor(t))) for t in tensors])


def capture_overhead(data, args):
    """Median ms of forward + backward on one batch, without and with capture."""
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), _ = data
    model = build("lstm", args.length, args.vocabulary, args.units)
    x, y = x_train[:args.batch_size], y_train[:args.batch_size]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    registration = kfac_keras.register(model)
    lstm = model.layers[1]

    @tf.function
    def plain():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return _checksum(tape.gradient(loss, model.trainable_variables))

    @tf.function
    def captured():
        with tf.GradientTape() as tape:
            with registration.capture() as recorder:
                logits = model(x, training=True)
            loss = loss_fn(y, logits)
        records = recorder.for_layer(lstm)
        return _checksum(tape.gradient(loss, model.trainable_variables + [p for _, p in records]))

    return _median_ms([plain, captured])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lstm,bilstm")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train", type=int, default=4096)
    parser.add_argument("--validation", type=int, default=1024)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--vocabulary", type=int, default=12)
    parser.add_argument("--units", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--kfac", default="{}", help="JSON keyword arguments of KFAC(...)")
    parser.add_argument("--step-rule", default="", help="JSON StepRuleKFAC arguments (tools/step_efficiency/step_rules.py): train with that step rule instead of KFAC's (kfac_choice.py)")
    parser.add_argument("--optimizers", default="adam,kfac", help="comma list of adam, kfac")
    args = parser.parse_args()
    data = (order_task(args.train, args.length, args.vocabulary, args.seed),
            order_task(args.validation, args.length, args.vocabulary, args.seed + 1))
    print(f"order task: {args.train} train / {args.validation} val sequences of length "
          f"{args.length}, {args.epochs} epochs of batch {args.batch_size}, seed {args.seed}")
    if args.overhead:
        plain, captured = capture_overhead(data, args)
        print(f"lstm forward+backward on one batch of {args.batch_size}: {plain:.1f} ms "
              f"without capture, {captured:.1f} ms with capture (median of 50, interleaved)", flush=True)
    for kind in args.models.split(","):
        variants = tuple(args.optimizers.split(","))
        if args.overhead and kind == "lstm":
            variants += ("kfac, lstm diagonal",)
        for optimizer_name in variants:
            result = run(kind, optimizer_name, data, args)
            blocks = f"  blocks {result['blocks']}" if result["blocks"] else ""
            per_epoch = ", ".join(f"{a:.3f}" for a in result["val_accuracy_per_epoch"])
            print(f"{kind:7s} {optimizer_name:19s} val_accuracy {result['val_accuracy']:.4f} "
                  f"(per epoch {per_epoch})  "
                  f"loss {result['loss_first_epoch']:.4f} -> {result['loss_last_epoch']:.4f}  "
                  f"{result['ms_per_step']:.1f} ms/step{blocks}", flush=True)


if __name__ == "__main__":
    main()
