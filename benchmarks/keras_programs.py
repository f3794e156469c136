"""keras-io-style programs trained with Adam and with `KFAC()`, only the optimizer line and the callback changed.

Run with::

    python -m benchmarks.keras_programs [--quick] [--programs transformer,bilstm,denoising]
        [--optimizers adam,kfac] [--epochs N] [--data-dir DIR] [--out-dir DIR]
        [--seed 0] [--kfac-options JSON] ...

The programs (models and data in ``benchmarks.keras_program_models``):

* ``transformer``: keras-io's transformer text classifier on synthetic
  reviews of IMDB's shapes (vocabulary 20,000, length 200); 6,000 training
  and 2,000 validation reviews, batch 32, 2 epochs, ``"adam"``,
  ``sparse_categorical_crossentropy`` on the softmax outputs; validation
  metric: accuracy.
* ``bilstm``: ``Embedding(12, 16) -> Bidirectional(LSTM(32)) -> Dense(2)``
  logits on the order task (which of two marked tokens comes first, length
  20); 4,096 training and 1,024 validation sequences, batch 64, 4 epochs;
  validation metric: accuracy.
* ``denoising``: keras-io's convolutional denoising autoencoder
  (Conv2DTranspose decoder) on MNIST digits with Gaussian noise (factor
  0.4; ``benchmarks.mnist_data.load_mnist``, which prints its source): the
  first 4,000 images for training, the next 1,000 for validation, batch 128,
  3 epochs, binary cross-entropy; validation metric: loss (lower is better).

Each program is compiled and fitted as keras-io does it (``model.compile``
then ``model.fit(..., validation_data=...)``), once with ``optimizer="adam"``
and no callback, once with ``optimizer=kfac_keras.KFAC(**options)`` (its
defaults unless ``--kfac-options`` says otherwise) and
``callbacks=[kfac_keras.KFACCallback()]``, for the same number of epochs,
from the same initial weights (``keras.utils.set_random_seed(--seed)``
before building the model) and with the same data. Nothing else differs:
no learning-rate search, no tuning for either optimizer.

Printed and written to ``--out-dir`` (``results.md``, ``results.csv``): per
program and epoch, the validation metric of each optimizer side by side,
the training loss, and the wall time since the start of ``fit`` (training
plus the validation pass, as ``fit`` spends it; the first epoch includes
tracing); per program, whether K-FAC's final validation metric is at least
Adam's, and the K-FAC blocks the model got. ``--quick`` (small data sets, 2
epochs) is a smoke test: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import os
import sys
import time
from typing import Callable

import keras
import numpy as np

from benchmarks import cli, keras_program_models as models
from benchmarks.mnist_data import load_mnist

__all__ = ["PROGRAMS", "KerasProgram", "build_parser", "main", "run_program"]

OPTIMIZER_NAMES = ("adam", "kfac")
OPTIMIZER_LABELS = {"adam": "Adam", "kfac": "K-FAC"}
# The order task's sizes (tools/keras_programs/recurrent_classifier.py's defaults).
ORDER_LENGTH = 20
ORDER_VOCABULARY = 12
ORDER_UNITS = 32
MNIST_PIXELS = (28, 28, 1)


@dataclasses.dataclass
class KerasProgram:
    """One keras-io-style program: its model, data, loss and budget.

    Args:
        name: str, the program's `--programs` name.
        title: str, one line saying what the program is.
        build_model: `() -> keras.Model`, called after seeding.
        load_data: `(train, val, data_dir) -> ((x, y), (x_val, y_val),
            source)`, where `source` says where the data came from.
        loss: the `loss` passed to `compile`.
        metrics: tuple, the `metrics` passed to `compile`.
        validation_metric: str, the `fit` history key compared, e.g.
            `"val_accuracy"`.
        higher_is_better: bool, whether a larger `validation_metric` is better.
        train: int, training examples.
        val: int, validation examples.
        epochs: int, epochs of both runs.
        batch_size: int, the `fit` batch size.
        quick: tuple `(train, val, epochs)` of `--quick`.
    """

    name: str
    title: str
    build_model: Callable
    load_data: Callable
    loss: object
    metrics: tuple
    validation_metric: str
    higher_is_better: bool
    train: int
    val: int
    epochs: int
    batch_size: int
    quick: tuple


def _reviews(train, val, data_dir):
    del data_dir  # synthetic
    return (models.synthetic_reviews(train, 1), models.synthetic_reviews(val, 2),
            "synthetic reviews (benchmarks.keras_program_models.synthetic_reviews, seeds 1 "
            "and 2)")


def _order_sequences(train, val, data_dir):
    del data_dir  # synthetic
    return (models.order_task(train, ORDER_LENGTH, ORDER_VOCABULARY, 0),
            models.order_task(val, ORDER_LENGTH, ORDER_VOCABULARY, 1),
            f"order task (benchmarks.keras_program_models.order_task, length {ORDER_LENGTH}, "
            f"vocabulary {ORDER_VOCABULARY}, seeds 0 and 1)")


def _noisy_digits(train, val, data_dir):
    images, _, source = load_mnist(data_dir, flatten=False, allow_download=False)
    if images.shape[0] < train + val:
        raise ValueError(f"the denoising program needs {train + val} images but {source} has "
                         f"{images.shape[0]}; lower the sizes (e.g. --quick).")
    if images.shape[1:] != MNIST_PIXELS:
        raise ValueError(f"the denoising program needs 28x28 MNIST digits; {source} has images "
                         f"of shape {images.shape[1:]}. Pass --data-dir with the MNIST IDX files.")
    noisy = models.noisy_images(images)
    return ((noisy[:train], images[:train]), (noisy[train:train + val], images[train:train + val]),
            f"{source}, Gaussian noise 0.4 (seed 1)")


#: The programs, by `--programs` name.
PROGRAMS = {
    "transformer": KerasProgram(
        "transformer", "keras-io transformer text classifier (synthetic IMDB-shaped reviews)",
        models.build_transformer_classifier, _reviews, "sparse_categorical_crossentropy",
        ("accuracy",), "val_accuracy", True, train=6000, val=2000, epochs=2, batch_size=32,
        quick=(320, 160, 2)),
    "bilstm": KerasProgram(
        "bilstm", "Bidirectional(LSTM) classifier (order task)",
        lambda: models.build_recurrent_classifier(
            "bilstm", ORDER_LENGTH, ORDER_VOCABULARY, ORDER_UNITS),
        _order_sequences, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ("accuracy",), "val_accuracy", True, train=4096, val=1024, epochs=4, batch_size=64,
        quick=(512, 256, 2)),
    "denoising": KerasProgram(
        "denoising", "keras-io convolutional denoising autoencoder (Conv2DTranspose, MNIST)",
        models.build_denoising_autoencoder, _noisy_digits, "binary_crossentropy", (),
        "val_loss", False, train=4000, val=1000, epochs=3, batch_size=128,
        quick=(256, 128, 2)),
}


class EpochRecorder(keras.callbacks.Callback):
    """Records every epoch's logs and the wall time since the start of `fit`."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        record = {key: float(value) for key, value in (logs or {}).items()}
        record["epoch"] = epoch + 1
        record["seconds"] = time.perf_counter() - self._start
        self.epochs.append(record)


def run_program(program, optimizer_name, data, *, epochs, seed=0, kfac_options=None):
    """Compiles and fits one program as keras-io does, with Adam or with K-FAC.

    Args:
        program: a `KerasProgram`.
        optimizer_name: str, `"adam"` (`optimizer="adam"`, no callback) or
            `"kfac"` (`kfac_keras.KFAC(**kfac_options)` and a `KFACCallback`).
        data: `((x, y), (x_val, y_val))`.
        epochs: int, epochs to train.
        seed: int, `keras.utils.set_random_seed` value before the model is
            built. Defaults to 0.
        kfac_options: dict of `KFAC` arguments. Defaults to None (its
            defaults).

    Returns:
        A dict: `epochs` (one dict per epoch with the `fit` logs, `epoch` and
        `seconds`, the wall time since the start of `fit`), `seconds` (the
        whole `fit`), and `blocks` (`Counter` of K-FAC block kinds, or None
        for Adam).
    """
    if optimizer_name not in OPTIMIZER_NAMES:
        raise ValueError(f"`optimizer_name` must be one of {OPTIMIZER_NAMES}; "
                         f"received {optimizer_name!r}.")
    (x, y), (x_val, y_val) = data
    keras.backend.clear_session()
    keras.utils.set_random_seed(int(seed))
    model = program.build_model()
    callbacks = []
    if optimizer_name == "adam":
        optimizer = "adam"
    else:
        import kfac_keras

        optimizer = kfac_keras.KFAC(**dict(kfac_options or {}))
        callbacks.append(kfac_keras.KFACCallback(verbose=0))
    model.compile(optimizer=optimizer, loss=program.loss, metrics=list(program.metrics))
    recorder = EpochRecorder()
    start = time.perf_counter()
    model.fit(x, y, batch_size=program.batch_size, epochs=epochs,
              validation_data=(x_val, y_val), verbose=0, callbacks=callbacks + [recorder])
    seconds = time.perf_counter() - start
    blocks = None
    if optimizer_name == "kfac":
        blocks = collections.Counter(
            info["kind"] for info in model.optimizer.registration.describe())
    return {"epochs": recorder.epochs, "seconds": seconds, "blocks": blocks}


def _parse_list(choices, what):
    def parse(text):
        names = [t.strip().lower() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown or no {what} {bad}; choose from {','.join(choices)}")
        return names
    return parse


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.keras_programs",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--programs", type=_parse_list(tuple(PROGRAMS), "programs"),
                   default=list(PROGRAMS),
                   help="comma list from " + ",".join(PROGRAMS) + " (default: all)")
    p.add_argument("--optimizers", type=_parse_list(OPTIMIZER_NAMES, "optimizers"),
                   default=list(OPTIMIZER_NAMES),
                   help="comma list from adam,kfac (default: both)")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test budget: small data sets, 2 epochs (numbers mean nothing)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every program (default: each program's, see --help's "
                        "description; 2 with --quick)")
    p.add_argument("--data-dir", default=None,
                   help="folder with MNIST IDX files for the denoising program (default: "
                        "$KFAC_KERAS_DATA_DIR, then scikit-learn digits, which the program "
                        "rejects)")
    p.add_argument("--out-dir", default=os.path.join("benchmark_results", "keras_programs"),
                   help="where the tables go (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed set before each model is built (default: %(default)s)")
    p.add_argument("--kfac-damping", type=float, default=None,
                   help="damping passed to KFAC (default: KFAC's own)")
    p.add_argument("--kfac-options", type=cli.parse_kfac_options, default={},
                   help="JSON object of extra kfac_keras.KFAC arguments for the K-FAC runs "
                        "(default: none, KFAC's defaults)")
    return p


def _fmt(value, digits=4):
    return "" if value is None else f"{value:.{digits}f}"


def _program_table(program, results, epochs):
    """Markdown lines: one row per epoch, the optimizers side by side."""
    names = list(results)
    metric = program.validation_metric
    header = ["epoch"]
    header += [f"{OPTIMIZER_LABELS[n]} {metric}" for n in names]
    header += [f"{OPTIMIZER_LABELS[n]} train loss" for n in names]
    header += [f"{OPTIMIZER_LABELS[n]} s" for n in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for epoch in range(epochs):
        rows = [results[n]["epochs"][epoch] if epoch < len(results[n]["epochs"]) else {}
                for n in names]
        cells = [str(epoch + 1)]
        cells += [_fmt(r.get(metric)) for r in rows]
        cells += [_fmt(r.get("loss")) for r in rows]
        cells += [_fmt(r.get("seconds"), 1) for r in rows]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def kfac_at_least_adam(program, results):
    """Whether K-FAC's final validation metric is at least Adam's (None if either is missing).

    Args:
        program: the `KerasProgram` (its metric and direction).
        results: `{optimizer name: run_program result}`.

    Returns:
        True, False or None.
    """
    if not all(n in results and results[n]["epochs"] for n in OPTIMIZER_NAMES):
        return None
    kfac, adam = (results[n]["epochs"][-1].get(program.validation_metric)
                  for n in ("kfac", "adam"))
    if kfac is None or adam is None:
        return None
    if not np.isfinite(kfac):
        return False
    if not np.isfinite(adam):
        return True
    return bool(kfac >= adam) if program.higher_is_better else bool(kfac <= adam)


def write_results(all_results, out_dir, notes=()):
    """Writes `results.md` and `results.csv` to `out_dir`; returns the Markdown text.

    Args:
        all_results: list of `(program, sizes, source, results)`; `sizes` is
            `(train, val, epochs)`, `results` maps an optimizer name to its
            `run_program` result.
        out_dir: str, created if missing.
        notes: lines listed under the title. Defaults to none.

    Returns:
        The Markdown text.
    """
    os.makedirs(out_dir, exist_ok=True)
    lines = ["# keras-io-style programs: Adam and KFAC() at equal epochs", ""]
    lines += [f"- {n}" for n in notes]
    rows = []
    for program, (train, val, epochs), source, results in all_results:
        lines += ["", f"## {program.name}: {program.title}", "",
                  f"- data: {source}; {train} training and {val} validation examples, batch "
                  f"{program.batch_size}, {epochs} epochs",
                  f"- validation metric: {program.validation_metric} "
                  f"({'higher' if program.higher_is_better else 'lower'} is better)"]
        for name, result in results.items():
            line = f"- {OPTIMIZER_LABELS[name]}: fit {result['seconds']:.1f} s"
            if result["blocks"]:
                line += "; K-FAC blocks: " + ", ".join(
                    f"{kind} x{count}" for kind, count in sorted(result["blocks"].items()))
            lines.append(line)
        verdict = kfac_at_least_adam(program, results)
        if verdict is not None:
            lines.append(f"- K-FAC's final {program.validation_metric} as good as Adam's or better: "
                         f"{'yes' if verdict else 'no'}")
        lines += [""] + _program_table(program, results, epochs)
        for name, result in results.items():
            for record in result["epochs"]:
                rows.append({
                    "program": program.name, "optimizer": name, "epoch": record["epoch"],
                    "train_loss": record.get("loss"),
                    "validation_metric": program.validation_metric,
                    "validation_value": record.get(program.validation_metric),
                    "seconds": round(record["seconds"], 3)})
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["program", "optimizer", "epoch", "train_loss",
                                               "validation_metric", "validation_value",
                                               "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be positive; received {args.epochs}")
    t_start = time.perf_counter()
    cli.print_environment()
    kfac_options = cli.kfac_kwargs_from_args(args)

    all_results = []
    for name in args.programs:
        program = PROGRAMS[name]
        train, val, epochs = program.quick if args.quick else (
            program.train, program.val, program.epochs)
        if args.epochs is not None:
            epochs = args.epochs
        (x, y), (x_val, y_val), source = program.load_data(train, val, args.data_dir)
        print(f"=== {name}: {program.title}; {source}; {train} training / {val} validation "
              f"examples, {epochs} epochs ===", flush=True)
        results = {}
        for optimizer_name in args.optimizers:
            result = run_program(program, optimizer_name, ((x, y), (x_val, y_val)),
                                 epochs=epochs, seed=args.seed, kfac_options=kfac_options)
            results[optimizer_name] = result
            per_epoch = ", ".join(_fmt(r.get(program.validation_metric))
                                  for r in result["epochs"])
            print(f"  {OPTIMIZER_LABELS[optimizer_name]:5s} {program.validation_metric} per "
                  f"epoch: {per_epoch}  (fit {result['seconds']:.1f} s)", flush=True)
        all_results.append((program, (train, val, epochs), source, results))

    notes = [
        "each program is compiled and fitted as keras-io does it; the runs differ only in "
        "the optimizer line (`\"adam\"` or `kfac_keras.KFAC(" +
        (json.dumps(kfac_options) if kfac_options else "") + ")`) and the callback "
        "(`KFACCallback()` for K-FAC)",
        f"same initial weights (seed {args.seed}) and data for both optimizers; equal epochs; "
        "no tuning for either",
        "s: wall time since the start of fit (training and the validation pass; the first "
        "epoch includes tracing)",
    ]
    if args.quick:
        notes.append("--quick: smoke-test sizes, the numbers mean nothing")
    text = write_results(all_results, args.out_dir, notes)
    print()
    print(text)
    print(f"wrote {os.path.join(args.out_dir, 'results.md')}, results.csv")
    print(f"total wall time {time.perf_counter() - t_start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
