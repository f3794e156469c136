"""The one step timer of the benchmarks.

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
  counted too.

The first ``warmup_steps`` batches (default 2) include tracing, graph
optimisation or XLA compilation and pipeline start-up. Their wall-clock time
is reported separately as ``compile_seconds``. For the time axis
("run time") each warm-up step is charged the median time of the
post-warm-up steps instead. ``per_step_ms`` is the median post-warm-up step
time, i.e. a typical step. ``mean_step_ms`` is the mean, which includes the
cost of occasional expensive steps (K-FAC's statistics and inverse updates).

For code outside ``fit`` (a ``tf.function`` step, a decomposition),
``call_seconds`` times single calls after warm-up calls, ``median_ms`` gives
their median, and ``kfac_period_seconds`` times whole ``inv_update_every``
periods of a K-FAC step. ``fetch`` makes a call's result concrete, so the
time includes the device work.
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np

from benchmarks.targets import DEFAULT_SMOOTH_WINDOW, moving_average

__all__ = [
    "DEFAULT_WARMUP_STEPS",
    "TimedLossHistory",
    "call_seconds",
    "fetch",
    "kfac_period_seconds",
    "median_ms",
]

DEFAULT_WARMUP_STEPS = 2


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


def fetch(result):
    """Makes every tensor in ``result`` concrete, so the device work is done.

    Args:
        result: a tensor, a nest of tensors, or anything else (left alone).

    Returns:
        None.
    """
    import tensorflow as tf

    for value in tf.nest.flatten(result):
        if hasattr(value, "numpy"):
            value.numpy()


def call_seconds(fn, repeats, warmup=2):
    """Wall-clock seconds of each of ``repeats`` calls of ``fn``, after warm-up calls.

    Args:
        fn: zero-argument callable (e.g. a ``tf.function``); its result is
            fetched (``fetch``) inside the timed interval.
        repeats: int, timed calls.
        warmup: int, untimed calls first (tracing, first-call set-up).
            Defaults to 2.

    Returns:
        A float64 numpy array of ``repeats`` durations.
    """
    for _ in range(warmup):
        fetch(fn())
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        fetch(fn())
        durations.append(time.perf_counter() - start)
    return np.asarray(durations, dtype=np.float64)


def median_ms(fn, repeats, warmup=2):
    """Median milliseconds of a call of ``fn`` (see ``call_seconds``).

    Args:
        fn: zero-argument callable.
        repeats: int, timed calls.
        warmup: int, untimed calls first. Defaults to 2.

    Returns:
        A Python float.
    """
    return 1000.0 * float(np.median(call_seconds(fn, repeats, warmup)))


def kfac_period_seconds(step, optimizer, periods, warmup=2, skip_startup=False):
    """Wall time of whole ``inv_update_every`` periods of a K-FAC step.

    Args:
        step: zero-argument callable running one K-FAC step.
        optimizer: the step's ``kfac_keras.KFAC`` (for ``inv_update_every``
            and the estimate counter).
        periods: int, number of periods to time.
        warmup: int, untimed steps first (tracing). Defaults to 2.
        skip_startup: if True, the estimate counter is set to at least 3
            after the warm-up, so the timed periods contain no extra
            start-up decompositions (the optimizer decomposes after each of
            the first three statistics updates); the timed steps then do
            exactly the work of the steady state. Defaults to False.

    Returns:
        A float64 numpy array of ``periods`` durations in seconds, one per
        period.
    """
    for _ in range(warmup):
        fetch(step())
    if skip_startup:
        optimizer.num_estimates.assign(
            max(3.0, float(optimizer.num_estimates.numpy())))
    period = optimizer.inv_update_every
    durations = []
    for _ in range(periods):
        start = time.perf_counter()
        for _ in range(period):
            fetch(step())
        durations.append(time.perf_counter() - start)
    return np.asarray(durations, dtype=np.float64)
