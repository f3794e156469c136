"""Shared benchmark harness for the kfac_keras examples.

The examples race K-FAC against first-order baselines on the same model,
the same initial weights and the same order of mini-batches, and report how
many steps and seconds each optimizer takes to reach a set of training-loss
targets.

What is measured
----------------
``TimedLossHistory`` is a Keras callback. After every batch it records

* **the per-batch training loss.** Keras' ``logs["loss"]`` is the running
  mean over the epoch so far, weighted by batch size. The callback recovers
  the loss of batch ``n`` from two consecutive running means::

      loss_n = (W_n * mean_n - W_{n-1} * mean_{n-1}) / w_n

  Here ``w_n`` is the size of batch ``n`` and ``W_n`` the sum of batch sizes
  so far. For a constant batch size this is ``n*mean_n - (n-1)*mean_{n-1}``.
  The sum is worked out in float64 from the float32 means Keras reports, so
  the absolute error is about ``n * 6e-8 * mean``: below 1e-3 relative after
  10,000 steps. The recorded loss is the compiled loss, i.e. what the
  optimizer minimises, including any regularisation terms the model adds.
* **the wall-clock time** (``time.perf_counter``) at the end of the batch.
  Keras converts the logs to Python floats before it calls the callback, so
  the step has finished on the device by then. Put this callback last in the
  list so that the time of other callbacks' per-batch work (e.g. K-FAC's) is
  counted too. ``run_optimizer`` does this.

The first ``warmup_steps`` batches (default 2) include tracing, graph
optimisation or XLA compilation and pipeline start-up. Their wall-clock time
is reported separately as ``compile_seconds``. For the time axis
("run time") each warm-up step is charged the median time of the
post-warm-up steps instead. ``per_step_ms`` is the median post-warm-up step
time, i.e. a typical step. ``mean_step_ms`` is the mean, which includes the
cost of occasional expensive steps (K-FAC's statistics and inverse updates).
Time-to-target uses the actual per-step times, so it includes those steps.

Smoothing and time-to-target
----------------------------
Mini-batch losses are noisy, so a target counts as reached at the first step
where the **trailing moving average of the last k per-batch losses**
(default k = 10; fewer at the very start) is at or below the target. The
harness does not evaluate the full-data loss. ``steps_and_seconds_to_target``
returns that step count (1-based) and the charged run time up to and
including that step.

Fair comparison
---------------
``run_optimizer`` calls ``keras.utils.set_random_seed(seed)`` before it
builds each model, so every optimizer starts from the same weights. The
mini-batches come from a ``tf.data`` pipeline whose order is fixed in
advance by ``data_seed``, and ``fit`` is called with ``shuffle=False``, so
every optimizer sees the same batches in the same order. With a constant
batch size the index stream is a concatenation of numpy permutations (one
per epoch), cut into consecutive batches. With a batch-size schedule, step
``k`` takes the first ``m_k`` entries of a stateless random permutation
seeded by ``(data_seed, k)``.

Baselines
---------
``adam`` is ``keras.optimizers.Adam``. ``sgd`` is ``SGD(momentum=0.9)``.
``nesterov`` is ``SGD(momentum=0.9, nesterov=True)``. ``muon`` is
``keras.optimizers.Muon``. Keras' Muon applies its Newton-Schulz
orthogonalised update only to 2-D variables whose path doesn't match
``exclude_layers``. Every other variable (biases, i.e. any non-2-D variable)
automatically gets Muon's built-in AdamW step, at ``learning_rate *
adam_lr_ratio``. The harness passes the model's output layer name in
``exclude_layers``, as Muon's docstring recommends, and sets both weight
decays to 0 so that all optimizers minimise the same objective. ``kfac`` is
``kfac_keras.KFAC`` (its defaults) plus ``kfac_keras.KFACCallback``. Optional
K-FAC variants: ``kfac_paper`` (the paper's quadratic-model step size and
momentum with Levenberg-Marquardt damping), ``kfac_tridiagonal`` (the same
with the block-tridiagonal inverse) and ``kfac_fixed`` (learning rate 0.01,
fixed damping, no norm constraint). K-FAC is imported lazily, and skipped
with a message if it can't be imported.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from typing import Callable

import numpy as np

import keras

__all__ = [
    "OPTIMIZER_NAMES",
    "OptimizerSpec",
    "TimedLossHistory",
    "benchmark_optimizers",
    "build_common_parser",
    "choose_jit_compile",
    "fmt_lr",
    "get_optimizer_specs",
    "kfac_import_error",
    "lr_grid_search",
    "make_dataset",
    "moving_average",
    "parse_optimizer_list",
    "resolve_common_args",
    "run_optimizer",
    "steps_and_seconds_to_target",
    "write_grid_table",
    "write_plots",
    "write_results",
]

OPTIMIZER_NAMES = ("kfac", "adam", "sgd", "nesterov", "muon", "kfac_paper",
                   "kfac_tridiagonal", "kfac_fixed")
#: What ``--optimizers`` runs unless told otherwise.
DEFAULT_OPTIMIZERS = ("kfac", "adam", "sgd", "nesterov", "muon")
DEFAULT_WARMUP_STEPS = 2
DEFAULT_SMOOTH_WINDOW = 10


# --------------------------------------------------------------------------
# Smoothing and targets
# --------------------------------------------------------------------------


def moving_average(values, window: int = DEFAULT_SMOOTH_WINDOW) -> np.ndarray:
    """Trailing moving average: entry i is the mean of values[max(0,i-k+1):i+1].

    A NaN or inf inside the window makes the average NaN/inf (a diverged run
    never counts as reaching a target).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    window = max(1, int(window))
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(0, idx - window)
    with np.errstate(invalid="ignore"):
        out = (c[idx] - c[lo]) / (idx - lo)
    # cumsum turns one NaN into NaN forever; recompute exactly around bad values
    bad = ~np.isfinite(v)
    if bad.any():
        out = np.array([np.mean(v[max(0, i - window + 1):i + 1]) for i in range(v.size)])
    return out


def steps_and_seconds_to_target(history, targets, loss_scale: float = 1.0,
                                window: int | None = None):
    """First step at which the smoothed loss reaches each target.

    Args:
        history: a dict with ``"loss"`` (per-batch losses) and ``"elapsed"``
            (charged run time in seconds after each step). ``"smoothed"`` is
            used if present, else a ``window``-step moving average of
            ``"loss"`` is computed. Accepts a ``run_optimizer`` result too.
        targets: iterable of target values, in the scaled units.
        loss_scale: the history's losses are multiplied by this first (e.g.
            784 to turn Keras' mean BCE into summed cross-entropy per image).

    Returns:
        ``{target: (steps, seconds)}``. Both are None if the target was never
        reached. ``steps`` counts steps from 1.
    """
    h = history.get("history", history)
    if "smoothed" in h and window is None:
        smoothed = np.asarray(h["smoothed"], dtype=np.float64)
    else:
        smoothed = moving_average(h["loss"], window or h.get("window", DEFAULT_SMOOTH_WINDOW))
    smoothed = smoothed * loss_scale
    elapsed = np.asarray(h["elapsed"], dtype=np.float64)
    out = {}
    for t in targets:
        with np.errstate(invalid="ignore"):
            hit = np.nonzero(smoothed <= t)[0]
        if hit.size:
            i = int(hit[0])
            out[t] = (i + 1, float(elapsed[i]))
        else:
            out[t] = (None, None)
    return out


# --------------------------------------------------------------------------
# The timing callback
# --------------------------------------------------------------------------


class TimedLossHistory(keras.callbacks.Callback):
    """Records per-batch loss and wall-clock time (see the module docstring).

    Args:
        warmup_steps: leading steps whose time counts as compile/warm-up.
        smooth_window: k of the trailing moving average.
        batch_sizes: per-step batch sizes, if they vary. Needed to recover
            the per-batch loss from Keras' size-weighted running mean.
            None means a constant batch size.
        stop_on_nan: stop training when the loss becomes NaN/inf.
        progress_every: print a compact progress line every this many steps
            (0 = silent).
        label: name shown in progress lines.
        loss_scale, loss_unit: used only for progress lines.
    """

    def __init__(self, warmup_steps=DEFAULT_WARMUP_STEPS,
                 smooth_window=DEFAULT_SMOOTH_WINDOW, batch_sizes=None,
                 stop_on_nan=True, progress_every=0, label="",
                 loss_scale=1.0, loss_unit="", total_steps=None):
        super().__init__()
        self.warmup_steps = int(warmup_steps)
        self.smooth_window = int(smooth_window)
        self.batch_sizes = None if batch_sizes is None else [int(b) for b in batch_sizes]
        self.stop_on_nan = stop_on_nan
        self.progress_every = int(progress_every)
        self.label = label
        self.loss_scale = float(loss_scale)
        self.loss_unit = loss_unit
        self.total_steps = total_steps
        self._reset()

    def _reset(self):
        self.losses = []
        self.running_means = []
        self.wall = []  # seconds since on_train_begin at the end of each step
        self.t0 = None
        self._global_step = 0
        self._prev_weighted_sum = 0.0
        self._cum_weight = 0.0

    # Keras hooks ----------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._reset()
        self.t0 = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        # Keras resets its loss tracker at every epoch.
        self._prev_weighted_sum = 0.0
        self._cum_weight = 0.0

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        logs = logs or {}
        mean = float(logs.get("loss", float("nan")))
        w = 1.0
        if self.batch_sizes is not None and self._global_step < len(self.batch_sizes):
            w = float(self.batch_sizes[self._global_step])
        self._cum_weight += w
        weighted = mean * self._cum_weight
        loss = (weighted - self._prev_weighted_sum) / w
        self._prev_weighted_sum = weighted
        self.running_means.append(mean)
        self.losses.append(loss)
        self.wall.append(now - self.t0)
        self._global_step += 1
        if self.progress_every and (self._global_step % self.progress_every == 0
                                    or self._global_step == self.total_steps):
            self._print_progress()
        if self.stop_on_nan and not math.isfinite(loss):
            print(f"  [{self.label}] loss is {loss} at step {self._global_step}; "
                  "stopping this run", flush=True)
            self.model.stop_training = True

    # Results --------------------------------------------------------------
    def _print_progress(self):
        n = self._global_step
        recent = self.losses[-self.smooth_window:]
        sm = float(np.mean(recent)) * self.loss_scale
        ms = self.step_seconds()[self.warmup_steps:]
        ms_txt = f"{np.median(ms) * 1e3:7.1f} ms/step" if ms.size else "   warm-up    "
        tot = f"/{self.total_steps}" if self.total_steps else ""
        print(f"  [{self.label}] step {n:5d}{tot}  avg loss {sm:10.4f}{self.loss_unit}"
              f"  {ms_txt}  wall {self.wall[-1]:7.1f} s", flush=True)

    def step_seconds(self) -> np.ndarray:
        w = np.asarray(self.wall, dtype=np.float64)
        return np.diff(np.concatenate([[0.0], w]))

    def result(self) -> dict:
        """The history as a plain dict (numpy arrays + floats)."""
        steps = self.step_seconds()
        w = min(self.warmup_steps, len(steps))
        post = steps[w:]
        if post.size:
            median = float(np.median(post))
        elif steps.size:
            median = float(np.median(steps))
        else:
            median = float("nan")
        mean = float(np.mean(post)) if post.size else median
        charged = steps.copy()
        charged[:w] = median
        loss = np.asarray(self.losses, dtype=np.float64)
        return {
            "loss": loss,
            "smoothed": moving_average(loss, self.smooth_window),
            "running_mean": np.asarray(self.running_means, dtype=np.float64),
            "wall": np.asarray(self.wall, dtype=np.float64),
            "step_seconds": steps,
            "elapsed": np.cumsum(charged),
            "compile_seconds": float(np.sum(steps[:w])),
            "per_step_ms": median * 1e3,
            "mean_step_ms": mean * 1e3,
            "warmup_steps": w,
            "window": self.smooth_window,
            "steps_run": int(loss.size),
        }


# --------------------------------------------------------------------------
# Data pipeline
# --------------------------------------------------------------------------


def _index_stream(n: int, total: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    reps = -(-total // n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:total]


def make_dataset(x, y, batch_size, steps, seed, batch_sizes=None):
    """A ``tf.data.Dataset`` of exactly ``steps`` batches in a fixed order.

    ``y=None`` (or ``y is x``) yields ``(xb, xb)`` pairs (autoencoders).
    With ``batch_sizes`` (a length-``steps`` sequence), step k has
    ``batch_sizes[k]`` examples: the first ``batch_sizes[k]`` entries of a
    stateless random permutation seeded by ``(seed, k)``.
    """
    import tensorflow as tf

    n = int(x.shape[0])
    autoenc = y is None or y is x
    xt = tf.constant(x)
    yt = None if autoenc else tf.constant(y)

    def pick(idx):
        xb = tf.gather(xt, idx)
        return (xb, xb) if autoenc else (xb, tf.gather(yt, idx))

    if batch_sizes is None:
        idx = _index_stream(n, steps * batch_size, seed).astype(np.int32)
        ds = tf.data.Dataset.from_tensor_slices(idx.reshape(steps, batch_size))
        ds = ds.map(pick)
    else:
        sizes = np.minimum(np.asarray(batch_sizes, dtype=np.int64)[:steps], n)
        if sizes.size < steps:
            raise ValueError("batch_sizes is shorter than steps")

        def pick_k(k, m):
            perm = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int32), seed=tf.stack([tf.cast(seed, tf.int64), k]))
            return pick(perm[:m])

        ds = tf.data.Dataset.from_tensor_slices((np.arange(steps, dtype=np.int64), sizes))
        ds = ds.map(pick_k)
    opts = tf.data.Options()
    opts.deterministic = True
    return ds.with_options(opts).prefetch(2)


# --------------------------------------------------------------------------
# One training run
# --------------------------------------------------------------------------


def run_optimizer(make_model, make_optimizer, x, y, loss, batch_size, steps,
                  seed, jit_compile, callbacks=(), verbose=0, *,
                  data_seed=None, batch_sizes=None,
                  warmup_steps=DEFAULT_WARMUP_STEPS,
                  smooth_window=DEFAULT_SMOOTH_WINDOW, label="",
                  progress_every=0, loss_scale=1.0, loss_unit="",
                  metrics=None, evaluate=None):
    """Trains a fresh model for ``steps`` steps and times it.

    Args:
        make_model: ``() -> keras.Model`` (built after seeding).
        make_optimizer: ``() -> keras.optimizers.Optimizer``.
        x, y: numpy arrays. ``y=None`` means autoencoder targets ``x``.
        loss: Keras loss passed to ``compile``.
        batch_size: constant batch size (ignored if ``batch_sizes`` given).
        steps: number of optimizer steps (one epoch of ``steps`` batches).
        seed: weight-initialisation seed; also the data-order seed unless
            ``data_seed`` is given.
        jit_compile: passed to ``model.compile``.
        callbacks: a list of callbacks or a zero-argument callable returning
            one (use a callable for stateful callbacks such as K-FAC's).
        verbose: Keras ``fit`` verbosity (0 = silent; use ``progress_every``
            for compact lines).
        evaluate: optional ``model -> dict`` called after training (outside
            the timed run), e.g. to measure held-out accuracy. Defaults to
            None (no evaluation).

    Returns:
        A dict with ``history`` (see ``TimedLossHistory.result``), plus
        ``final_loss`` (last smoothed loss), ``per_step_ms``,
        ``compile_seconds``, ``jit_compile``, ``steps``, ``total_seconds``,
        and ``evaluation`` (the result of ``evaluate``, or None).
    """
    keras.backend.clear_session()
    keras.utils.set_random_seed(int(seed))
    model = make_model()
    optimizer = make_optimizer()
    model.compile(optimizer=optimizer, loss=loss, jit_compile=bool(jit_compile),
                  metrics=metrics)
    ds = make_dataset(x, y, batch_size, steps,
                      seed if data_seed is None else data_seed, batch_sizes)
    extra = list(callbacks() if callable(callbacks) else callbacks)
    timer = TimedLossHistory(warmup_steps=warmup_steps, smooth_window=smooth_window,
                             batch_sizes=batch_sizes, progress_every=progress_every,
                             label=label, loss_scale=loss_scale, loss_unit=loss_unit,
                             total_steps=steps)
    t = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=steps, shuffle=False,
              verbose=verbose, callbacks=extra + [timer])
    total = time.perf_counter() - t
    evaluation = None if evaluate is None else evaluate(model)
    h = timer.result()
    final = float(h["smoothed"][-1]) if h["steps_run"] else float("nan")
    if h["steps_run"] < steps:  # stopped early (diverged)
        final = float("nan")
    return {
        "label": label,
        "history": h,
        "final_loss": final,
        "per_step_ms": h["per_step_ms"],
        "mean_step_ms": h["mean_step_ms"],
        "compile_seconds": h["compile_seconds"],
        "jit_compile": bool(jit_compile),
        "steps": int(steps),
        "steps_run": h["steps_run"],
        "total_seconds": total,
        "batch_size": int(batch_size) if batch_sizes is None else None,
        "evaluation": evaluation,
    }


def choose_jit_compile(probe, probe_steps=6, verbose=True, label=""):
    """Times a short run with and without XLA and returns the faster setting.

    ``probe(jit_compile, steps)`` must run training and return a
    ``run_optimizer`` result. Returns ``(choice, {True: ms, False: ms})``
    using the median post-warm-up step time.
    """
    timings = {}
    for jit in (False, True):
        try:
            r = probe(jit, probe_steps)
            timings[jit] = r["per_step_ms"]
        except Exception as e:  # noqa: BLE001 - XLA may not support an op
            if verbose:
                print(f"  [{label}] jit_compile={jit} failed: {type(e).__name__}: {e}",
                      flush=True)
            timings[jit] = float("inf")
    choice = timings[True] < timings[False]
    if verbose:
        print(f"  [{label}] jit probe: off {timings[False]:.1f} ms/step, "
              f"on {timings[True]:.1f} ms/step -> jit_compile={choice}", flush=True)
    return choice, timings


# --------------------------------------------------------------------------
# Learning-rate grid search
# --------------------------------------------------------------------------


def fmt_lr(lr) -> str:
    return "default" if lr is None else f"{lr:.3g}"


def _round_sig(v: float, sig: int = 3) -> float:
    return float(f"{v:.{sig}g}")


def _default_score(result) -> float:
    v = result["final_loss"] if isinstance(result, dict) else result
    v = float(v)
    return v if math.isfinite(v) else float("inf")


def lr_grid_search(run_fn, grid, score_fn=None, max_extensions=2, factor=3.0,
                   verbose=True, label="", display_scale=1.0):
    """Tries each learning rate in ``grid`` and picks the best.

    Args:
        run_fn: ``lr -> result``. A result is a ``run_optimizer`` dict or a
            plain number (the score itself).
        grid: learning rates to try.
        score_fn: ``result -> float`` (lower is better). The default is the
            final smoothed loss, with NaN/inf (divergence) scored as +inf.
        max_extensions: how many times the grid may grow when the winner is
            its smallest or largest value. Each extension adds one value,
            ``factor`` times beyond that edge.
        display_scale: scores are multiplied by this in progress lines only.

    Returns:
        dict with ``grid`` (sorted, including extensions), ``results``
        and ``scores`` (keyed by lr), ``winner``, ``extensions`` (the lrs
        added), and ``at_edge`` (True if the final winner is still at an
        edge of the grid it was searched on: the optimum may be further out).
    """
    score_fn = score_fn or _default_score
    grid = sorted({_round_sig(float(g)) for g in grid})
    if not grid:
        raise ValueError("empty learning-rate grid")
    results, scores, extensions = {}, {}, []

    def evaluate(lr):
        if lr in results:
            return
        r = run_fn(lr)
        results[lr] = r
        scores[lr] = float(score_fn(r))
        if verbose:
            print(f"  [{label}] lr={fmt_lr(lr)}: final smoothed loss "
                  f"{scores[lr] * display_scale:.5g}", flush=True)

    for lr in grid:
        evaluate(lr)
    while True:
        winner = min(grid, key=lambda g: (scores[g], g))
        at_low, at_high = winner == grid[0], winner == grid[-1]
        at_edge = (at_low or at_high) and len(grid) > 1 or len(grid) == 1
        if not at_edge or len(extensions) >= max_extensions:
            break
        new = _round_sig(grid[0] / factor) if at_low else _round_sig(grid[-1] * factor)
        if verbose:
            print(f"  [{label}] winner {fmt_lr(winner)} is at the "
                  f"{'low' if at_low else 'high'} edge; extending to {fmt_lr(new)}",
                  flush=True)
        extensions.append(new)
        grid = sorted(grid + [new])
        evaluate(new)
    if verbose and at_edge:
        print(f"  [{label}] WARNING: best lr {fmt_lr(winner)} is still at the edge "
              f"of the grid {[fmt_lr(g) for g in grid]}", flush=True)
    return {"grid": grid, "results": results, "scores": scores, "winner": winner,
            "extensions": extensions, "at_edge": bool(at_edge)}


# --------------------------------------------------------------------------
# Optimizer registry
# --------------------------------------------------------------------------


@dataclasses.dataclass
class OptimizerSpec:
    """How to build one optimizer for the benchmark.

    ``build(lr)`` returns a fresh optimizer (``lr=None``: its default).
    ``grid``/``quick_grid`` are learning-rate grids. Empty means "no search,
    use ``default_lr``". ``callbacks()`` returns fresh extra callbacks.
    """

    name: str
    label: str
    build: Callable
    default_lr: float | None
    grid: tuple = ()
    quick_grid: tuple = ()
    callbacks: Callable = list


def kfac_import_error():
    """None if ``from kfac_keras import KFAC, KFACCallback`` works, else the
    error message."""
    try:
        from kfac_keras import KFAC, KFACCallback  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


#: ``AdaptiveOptions`` arguments of the ``kfac_paper`` variants.
PAPER_ADAPTIVE = {"quadratic_model_step": True, "adapt_damping": True,
                  "min_damping": 1e-3}


def _kfac_build(lr, **kwargs):
    from kfac_keras import KFAC

    if lr is not None:
        kwargs["learning_rate"] = lr
    return KFAC(**kwargs)


def _make_kfac_callbacks_factory():
    """Fresh KFACCallback per run; only the first prints its registration
    report (every run builds the same model)."""
    state = {"first": True}

    def factory():
        from kfac_keras import KFACCallback

        verbose = 1 if state["first"] else 0
        state["first"] = False
        return [KFACCallback(verbose=verbose)]

    return factory


def get_optimizer_specs(names=DEFAULT_OPTIMIZERS, *, output_layer_name=None,
                        kfac_kwargs=None, kfac_grid=None, grids=None, verbose=True):
    """OptimizerSpecs for ``names`` (from ``OPTIMIZER_NAMES``).

    K-FAC is skipped with a message if it can't be imported.
    ``output_layer_name`` is given to Muon's ``exclude_layers``.
    ``kfac_grid``: learning rates to search for K-FAC (default: none, so
    K-FAC runs with its own default learning rate).
    ``grids``: ``{name: (grid, quick_grid)}`` to replace the default grids
    for a problem whose good learning rates lie elsewhere.
    """
    kfac_kwargs = dict(kfac_kwargs or {})
    opt = keras.optimizers
    sgd_grid = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    table = {
        "adam": OptimizerSpec(
            "adam", "Adam", lambda lr: opt.Adam(learning_rate=1e-3 if lr is None else lr),
            1e-3, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (1e-3, 3e-3)),
        "sgd": OptimizerSpec(
            "sgd", "SGD+momentum(0.9)",
            lambda lr: opt.SGD(learning_rate=1e-2 if lr is None else lr, momentum=0.9),
            1e-2, sgd_grid, (1e-2, 3e-2)),
        "nesterov": OptimizerSpec(
            "nesterov", "SGD+Nesterov(0.9)",
            lambda lr: opt.SGD(learning_rate=1e-2 if lr is None else lr, momentum=0.9,
                               nesterov=True),
            1e-2, sgd_grid, (1e-2, 3e-2)),
        "muon": OptimizerSpec(
            "muon", "Muon",
            lambda lr: opt.Muon(
                learning_rate=1e-2 if lr is None else lr,
                exclude_layers=[output_layer_name] if output_layer_name else None,
                weight_decay=0.0, adam_weight_decay=0.0),
            1e-2, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), (1e-2, 3e-2)),
        "kfac": OptimizerSpec(
            "kfac", "K-FAC",
            lambda lr: _kfac_build(lr, **kfac_kwargs),
            None, tuple(kfac_grid or ()), tuple(kfac_grid or ()),
            _make_kfac_callbacks_factory()),
        # The paper's adaptive algorithm (sections 6.5 and 7): step size and
        # momentum from the quadratic model, Levenberg-Marquardt damping.
        "kfac_paper": OptimizerSpec(
            "kfac_paper", "K-FAC paper (quadratic-model step, LM damping)",
            lambda lr: _kfac_build(None, adaptive=PAPER_ADAPTIVE, **kfac_kwargs),
            None, (), (), _make_kfac_callbacks_factory()),
        "kfac_tridiagonal": OptimizerSpec(
            "kfac_tridiagonal", "K-FAC paper, block-tridiagonal",
            lambda lr: _kfac_build(None, adaptive=PAPER_ADAPTIVE,
                                   approximation="tridiagonal", **kfac_kwargs),
            None, (), (), _make_kfac_callbacks_factory()),
        # The plain update: fixed damping, no norm constraint.
        "kfac_fixed": OptimizerSpec(
            "kfac_fixed", "K-FAC fixed damping, no clipping",
            lambda lr: _kfac_build(0.01 if lr is None else lr, adaptive=None,
                                   norm_constraint=None, **kfac_kwargs),
            0.01, tuple(kfac_grid or ()), tuple(kfac_grid or ()),
            _make_kfac_callbacks_factory()),
    }
    specs = []
    for n in names:
        if n not in table:
            raise ValueError(f"unknown optimizer {n!r}; choose from {OPTIMIZER_NAMES}")
        if n == "muon" and not hasattr(opt, "Muon"):
            if verbose:
                print("skipping muon: this Keras has no keras.optimizers.Muon", flush=True)
            continue
        if n.startswith("kfac"):
            err = kfac_import_error()
            if err is not None:
                if verbose:
                    print(f"skipping kfac: cannot import kfac_keras.KFAC ({err})", flush=True)
                continue
        spec = table[n]
        if grids and n in grids:
            full, quick = grids[n]
            spec = dataclasses.replace(spec, grid=tuple(full), quick_grid=tuple(quick))
        specs.append(spec)
    return specs


def parse_optimizer_list(text: str):
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in OPTIMIZER_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer(s) {bad}; choose from {','.join(OPTIMIZER_NAMES)}")
    return names


def _parse_lr_overrides(text: str):
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, val = part.partition("=")
        out[name.strip().lower()] = float(val)
    return out


def _parse_kfac_options(text: str):
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--kfac-options is not valid JSON: {e}") from e
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(
            f"--kfac-options must be a JSON object of KFAC arguments; received {text!r}")
    return options


def kfac_kwargs_from_args(args):
    """The extra ``KFAC`` arguments of ``--kfac-damping`` and ``--kfac-options``,
    validated by building one optimizer (a bad option fails before any run)."""
    kwargs = dict(args.kfac_options)
    if args.kfac_damping is not None:
        kwargs["damping"] = args.kfac_damping
    if kwargs:
        from kfac_keras import KFAC

        KFAC(**kwargs)
    return kwargs


def _parse_float_list(text: str):
    return tuple(float(t) for t in text.split(",") if t.strip())


def build_common_parser(example: str, description: str = "", *,
                        default_steps: int, quick_steps: int,
                        default_optimizers=DEFAULT_OPTIMIZERS):
    """argparse parser with the flags shared by all benchmark examples."""
    p = argparse.ArgumentParser(
        prog=f"python -m kfac_keras.examples.{example}", description=description)
    p.add_argument("--data-dir", default=None,
                   help="folder with MNIST IDX files (default: $KFAC_KERAS_DATA_DIR, "
                        "then keras.datasets, then scikit-learn digits)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke-test budget: {quick_steps} steps, 2-point grids without "
                        "extension, short grid runs, easier targets, no XLA probe")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per optimizer (default {default_steps}, "
                        f"{quick_steps} with --quick)")
    p.add_argument("--batch-size", type=int, default=1000,
                   help="mini-batch size (default: %(default)s)")
    p.add_argument("--out-dir", default=os.path.join("benchmark_results", example),
                   help="where the tables and plots go (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for initial weights and for the data order "
                        "(default: %(default)s)")
    p.add_argument("--optimizers", type=parse_optimizer_list,
                   default=list(default_optimizers),
                   help="comma list from " + ",".join(OPTIMIZER_NAMES)
                        + " (default: " + ",".join(default_optimizers) + ")")
    p.add_argument("--no-grid", action="store_true",
                   help="skip the learning-rate search; use each optimizer's default lr")
    p.add_argument("--grid-steps", type=int, default=None,
                   help="steps per grid-search run (default: steps/4, at least 20; "
                        "steps/4, at least 5, with --quick)")
    p.add_argument("--lrs", type=_parse_lr_overrides, default={},
                   help="fixed learning rates that skip the search, e.g. "
                        "'adam=1e-3,muon=0.02'")
    p.add_argument("--jit", choices=("auto", "on", "off"), default=None,
                   help="XLA jit_compile per optimizer: 'auto' times a few steps "
                        "with and without XLA and keeps the faster (default: auto, "
                        "off with --quick)")
    p.add_argument("--smooth", type=int, default=DEFAULT_SMOOTH_WINDOW,
                   help="moving-average window (steps) for time-to-target "
                        "(default: %(default)s)")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP_STEPS,
                   help="leading steps counted as compile/warm-up time "
                        "(default: %(default)s)")
    p.add_argument("--kfac-damping", type=float, default=None,
                   help="damping passed to KFAC (default: KFAC's own)")
    p.add_argument("--kfac-options", type=_parse_kfac_options, default={},
                   help="JSON object of extra kfac_keras.KFAC arguments for the K-FAC "
                        "runs, e.g. '{\"norm_constraint\": 3e-4, \"adaptive\": null}' "
                        "(default: none, KFAC's defaults)")
    p.add_argument("--kfac-grid", type=_parse_float_list, default=None,
                   help="comma list of K-FAC learning rates to grid-search (default: "
                        "no search, KFAC's default learning rate)")
    p.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2),
                   help="Keras fit verbosity (default: 0; compact per-optimizer "
                        "progress lines are always printed)")
    return p


def protocol_notes(args, grid_steps, jit, loss_name="training loss"):
    """The result notes every benchmark example shares: when a target counts
    as reached, where the learning rates came from, and the XLA choice."""
    return [
        f"a target counts as reached when the {args.smooth}-step moving average of "
        f"the per-batch {loss_name} is at or below it; seconds exclude the first "
        f"{args.warmup} (compile/warm-up) steps, which are charged the median step "
        "time instead",
        "learning rates: " + (
            "each optimizer's default (--no-grid)" if args.no_grid else
            f"picked by a grid search of {grid_steps}-step runs for each optimizer "
            "with a grid (see below)"
            + ("" if args.kfac_grid or "kfac" in args.lrs
               else "; K-FAC runs with its default learning rate"))
        + (f"; fixed by --lrs: {args.lrs}" if args.lrs else ""),
        f"jit_compile: {jit}" + (" (timed per optimizer; the jit column shows the "
                                 "choice)" if jit == "auto" else ""),
    ]


def resolve_common_args(args, *, default_steps: int, quick_steps: int):
    """Fills in the defaults that depend on ``--quick``: returns
    ``(steps, grid_steps, jit)``."""
    steps = args.steps or (quick_steps if args.quick else default_steps)
    if args.grid_steps:
        grid_steps = min(args.grid_steps, steps)
    else:
        grid_steps = min(steps, max(5 if args.quick else 20, steps // 4))
    jit = args.jit or ("off" if args.quick else "auto")
    return steps, grid_steps, jit


# --------------------------------------------------------------------------
# Whole benchmark
# --------------------------------------------------------------------------


def benchmark_optimizers(specs, make_model, x, y, loss, *, steps, batch_size,
                         seed, grid=True, quick=False, grid_steps=None,
                         lr_overrides=None, jit="off", batch_sizes=None,
                         smooth_window=DEFAULT_SMOOTH_WINDOW,
                         warmup_steps=DEFAULT_WARMUP_STEPS, loss_scale=1.0,
                         loss_unit="", verbose=0, progress_every=None,
                         evaluate=None):
    """Grid-searches (optionally) and then trains every optimizer in ``specs``.

    ``evaluate`` (``model -> dict``, default None) is passed to
    ``run_optimizer`` for the final training run of each optimizer only (not
    for grid-search or jit-probe runs); its result is the run's
    ``evaluation``.

    Returns ``{"runs": {name: result}, "grids": {name: grid_search_dict}}``.
    Each run result also holds ``name``, ``display`` and ``lr``.
    """
    lr_overrides = dict(lr_overrides or {})
    if grid_steps is None:
        grid_steps = max(20, steps // 4)
    grid_steps = min(grid_steps, steps)
    if progress_every is None:
        progress_every = max(1, steps // 10)
    runs, grids = {}, {}
    for spec in specs:
        print(f"=== {spec.label} ===", flush=True)

        def do_run(lr, n_steps, jit_flag, prog, tag, _spec=spec, _evaluate=None):
            return run_optimizer(
                make_model, lambda: _spec.build(lr), x, y, loss, batch_size, n_steps,
                seed, jit_flag, callbacks=_spec.callbacks, verbose=verbose,
                batch_sizes=None if batch_sizes is None else batch_sizes[:n_steps],
                warmup_steps=warmup_steps, smooth_window=smooth_window,
                label=f"{_spec.name} lr={fmt_lr(lr)}{tag}", progress_every=prog,
                loss_scale=loss_scale, loss_unit=loss_unit, evaluate=_evaluate)

        if jit == "auto" and batch_sizes is None:
            probe_lr = lr_overrides.get(spec.name, spec.default_lr)
            jit_flag, _ = choose_jit_compile(
                lambda j, n: do_run(probe_lr, n, j, 0, " (jit probe)"),
                probe_steps=warmup_steps + 6, label=spec.name)
        else:
            jit_flag = jit == "on" and batch_sizes is None

        grid_vals = spec.quick_grid if quick else spec.grid
        if spec.name in lr_overrides:
            lr = lr_overrides[spec.name]
        elif grid and grid_vals:
            def grid_run(v, _jit=jit_flag, _name=spec.name):
                try:
                    return do_run(v, grid_steps, _jit, 0, " (grid)")
                except Exception:  # noqa: BLE001 - a failing lr scores +inf
                    print(f"  [{_name}] lr={fmt_lr(v)} raised; counted as diverged:",
                          flush=True)
                    traceback.print_exc()
                    return {"final_loss": float("nan")}

            g = lr_grid_search(
                grid_run, grid_vals,
                max_extensions=0 if quick else 2, label=spec.name,
                display_scale=loss_scale)
            grids[spec.name] = g
            lr = g["winner"]
        else:
            lr = spec.default_lr
        print(f"  [{spec.name}] training {steps} steps at lr={fmt_lr(lr)}, "
              f"jit_compile={jit_flag}", flush=True)
        try:
            r = do_run(lr, steps, jit_flag, progress_every, "", _evaluate=evaluate)
        except Exception:  # noqa: BLE001 - report, and go on with the others
            print(f"  [{spec.name}] training raised; leaving it out of the results:",
                  flush=True)
            traceback.print_exc()
            continue
        r.update(name=spec.name, display=spec.label, lr=lr)
        runs[spec.name] = r
    return {"runs": runs, "grids": grids}


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


def _fmt_target(t) -> str:
    return f"{t:g}"


def _ratio_text(num, den, lower_bound=False):
    if num is None or den is None or den == 0:
        return "n/a"
    txt = f"{num / den:.2f}x"
    return (">" + txt) if lower_bound else txt


def compute_ratios(runs, targets, kfac_key="kfac", loss_scale=1.0):
    """Rows ``(baseline, target, steps_ratio, seconds_ratio)`` where a ratio
    is baseline / K-FAC (>1 means K-FAC is faster). If the baseline never
    reached the target the ratio is a lower bound, computed from its whole
    run, and starts with '>'. 'n/a' if K-FAC didn't reach it."""
    if kfac_key not in runs:
        return []
    k = steps_and_seconds_to_target(runs[kfac_key], targets, loss_scale)
    rows = []
    for name, r in runs.items():
        if name.startswith("kfac"):  # K-FAC and its variants are not baselines
            continue
        b = steps_and_seconds_to_target(r, targets, loss_scale)
        for t in targets:
            ks, ksec = k[t]
            bs, bsec = b[t]
            if ks is None:
                rows.append((name, t, "n/a", "n/a"))
            elif bs is None:
                h = r["history"]
                tot_s = float(h["elapsed"][-1]) if h["steps_run"] else None
                rows.append((name, t, _ratio_text(h["steps_run"], ks, True),
                             _ratio_text(tot_s, ksec, True)))
            else:
                rows.append((name, t, _ratio_text(bs, ks), _ratio_text(bsec, ksec)))
    return rows


def write_results(runs, targets, out_dir, *, title="Benchmark", loss_scale=1.0,
                  loss_name="loss", raw_loss_name=None, kfac_key="kfac",
                  notes=(), grids=None, basename="results", extra_columns=()):
    """Writes ``<basename>.md`` and ``<basename>.csv`` (+ ``ratios.csv`` if
    K-FAC ran) to ``out_dir``. Returns the Markdown text.

    ``targets`` are in scaled units (``loss * loss_scale``).
    ``raw_loss_name`` names the unscaled loss column (e.g. Keras' mean BCE).
    ``extra_columns`` (default none): ``(name, fn)`` pairs; ``fn(run)``
    gives the value of column ``name`` (None: empty), which is added to both
    tables after the final-loss columns (e.g. held-out accuracy).
    """
    os.makedirs(out_dir, exist_ok=True)
    targets = list(targets)
    rows = []
    for name, r in runs.items():
        h = r["history"]
        tt = steps_and_seconds_to_target(r, targets, loss_scale)
        final = r["final_loss"]
        row = {
            "optimizer": name,
            "display": r.get("display", name),
            "lr": fmt_lr(r.get("lr")),
            "jit_compile": r["jit_compile"],
            "batch_size": r.get("batch_size") or "schedule",
            "steps_run": h["steps_run"],
            "per_step_ms": round(r["per_step_ms"], 2),
            "mean_step_ms": round(float(h.get("mean_step_ms", r["per_step_ms"])), 2),
            "compile_s": round(r["compile_seconds"], 2),
            "run_s": round(float(h["elapsed"][-1]), 2) if h["steps_run"] else "",
            f"final_{loss_name}": (_round_sig(final * loss_scale, 5)
                                   if math.isfinite(final) else "nan"),
        }
        if raw_loss_name:
            row[f"final_{raw_loss_name}"] = _round_sig(final, 5) if math.isfinite(final) else "nan"
        for column, value_fn in extra_columns:
            value = value_fn(r)
            row[column] = "" if value is None else value
        for t in targets:
            s, sec = tt[t]
            row[f"steps_to_{_fmt_target(t)}"] = "" if s is None else s
            row[f"seconds_to_{_fmt_target(t)}"] = "" if sec is None else round(sec, 2)
        rows.append(row)

    csv_path = os.path.join(out_dir, f"{basename}.csv")
    with open(csv_path, "w", newline="") as f:
        if rows:
            wr = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            wr.writeheader()
            wr.writerows(rows)

    ratio_rows = compute_ratios(runs, targets, kfac_key, loss_scale)
    if ratio_rows:
        with open(os.path.join(out_dir, "ratios.csv"), "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["baseline", "target", "steps_ratio_baseline_over_kfac",
                         "seconds_ratio_baseline_over_kfac"])
            wr.writerows(ratio_rows)

    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    hdr = ["optimizer", "lr", "jit", "ms/step (median)", "ms/step (mean)", "compile s",
           f"final {loss_name}"]
    if raw_loss_name:
        hdr.append(f"final {raw_loss_name}")
    hdr += [column for column, _ in extra_columns]
    hdr += [f"{loss_name} ≤ {_fmt_target(t)}: steps / s" for t in targets]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    for row in rows:
        cells = [row["display"], row["lr"], "on" if row["jit_compile"] else "off",
                 f"{row['per_step_ms']:.1f}", f"{row['mean_step_ms']:.1f}",
                 f"{row['compile_s']:.1f}",
                 str(row[f"final_{loss_name}"])]
        if raw_loss_name:
            cells.append(str(row[f"final_{raw_loss_name}"]))
        cells += [str(row[column]) for column, _ in extra_columns]
        for t in targets:
            s = row[f"steps_to_{_fmt_target(t)}"]
            sec = row[f"seconds_to_{_fmt_target(t)}"]
            cells.append("not reached" if s == "" else f"{s} / {sec:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    if ratio_rows:
        lines += ["", "## K-FAC speed-up (baseline / K-FAC; >1 means K-FAC is faster)", "",
                  "| baseline | target | steps ratio | seconds ratio |", "|---|---|---|---|"]
        for b, t, sr, tr in ratio_rows:
            lines.append(f"| {runs[b].get('display', b)} | {_fmt_target(t)} | {sr} | {tr} |")
        lines += ["", "'>' marks a lower bound: the baseline did not reach the target "
                  "within its run; 'n/a': K-FAC did not reach it."]
    if grids:
        lines += ["", write_grid_table(grids, loss_scale, loss_name)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"{basename}.md"), "w") as f:
        f.write(text)
    return text


def write_grid_table(grids, loss_scale=1.0, loss_name="loss") -> str:
    """Markdown section listing every grid-search run's final smoothed loss."""
    lines = ["## Learning-rate search (final smoothed loss of the short runs)", ""]
    for name, g in grids.items():
        cells = []
        for lr in g["grid"]:
            s = g["scores"][lr]
            val = "diverged" if not math.isfinite(s) else f"{s * loss_scale:.4g}"
            mark = " **(best)**" if lr == g["winner"] else ""
            cells.append(f"{fmt_lr(lr)}: {val}{mark}")
        edge = " — WARNING: best lr is at the edge of the grid" if g["at_edge"] else ""
        ext = f" (extended by {[fmt_lr(e) for e in g['extensions']]})" if g["extensions"] else ""
        lines.append(f"- {name}{ext}: " + ", ".join(cells) + edge)
    return "\n".join(lines)


def write_plots(runs, out_dir, *, loss_scale=1.0, loss_label="loss", targets=(),
                title="", log_y=True):
    """Saves ``loss_vs_steps.png`` and ``loss_vs_seconds.png`` (log x).

    Plots the smoothed per-batch loss (scaled) of every run, with the
    targets as dashed lines. Returns the two paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for kind in ("steps", "seconds"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, r in runs.items():
            h = r["history"]
            if not h["steps_run"]:
                continue
            yv = np.asarray(h["smoothed"]) * loss_scale
            xv = (np.arange(1, yv.size + 1) if kind == "steps"
                  else np.asarray(h["elapsed"], dtype=np.float64))
            lw = 2.2 if name == "kfac" else 1.4
            ax.plot(xv, yv, lw=lw,
                    label=f"{r.get('display', name)} (lr {fmt_lr(r.get('lr'))})")
        for t in targets:
            ax.axhline(t, color="grey", ls="--", lw=0.7)
        ax.set_xlabel("optimizer steps" if kind == "steps"
                      else "run time, s (log scale; compile time excluded)")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        if kind == "seconds":
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_ylabel(f"{loss_label} (moving average)")
        ax.set_title(title or f"training loss vs {kind}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"loss_vs_{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def save_histories(runs, out_dir, loss_scale=1.0, filename="histories.json"):
    """Dumps per-step loss and time of every run as JSON (for re-plotting)."""
    os.makedirs(out_dir, exist_ok=True)
    data = {}
    for name, r in runs.items():
        h = r["history"]
        data[name] = {
            "lr": r.get("lr"), "jit_compile": r["jit_compile"],
            "per_step_ms": r["per_step_ms"], "mean_step_ms": r.get("mean_step_ms"),
            "compile_seconds": r["compile_seconds"],
            "loss_scale": loss_scale,
            "loss": [float(v) for v in h["loss"]],
            "elapsed": [float(v) for v in h["elapsed"]],
            "step_seconds": [float(v) for v in h["step_seconds"]],
        }
    path = os.path.join(out_dir, filename)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def print_environment():
    """One line with the library versions and thread count."""
    import tensorflow as tf

    print(f"python {sys.version.split()[0]}, tensorflow {tf.__version__}, keras "
          f"{keras.__version__}, {os.cpu_count()} CPU cores", flush=True)
