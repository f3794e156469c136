"""Helpers shared by the Colab notebooks in ``colab/``.

The notebooks keep the K-FAC code in plain sight (``KFAC(...)``,
``model.fit(..., callbacks=[KFACCallback()])``, ``make_train_step``); this
module holds only the parts that are the same in every notebook:

* **Size switch.** ``small_mode()`` reads the environment variable
  ``KFAC_KERAS_NOTEBOOK_SMALL``. CI sets it to ``1`` so that every notebook
  runs with few steps and small data in a few seconds to a minute; without
  it the notebooks use their tutorial sizes. ``choose(small=..., tutorial=...)``
  picks a value by the switch, and ``size_banner()`` says which size runs.
* **Fair runs.** ``train`` trains a fresh model through
  ``benchmarks.harness.run_optimizer``: the same initial weights
  (seeded) and the same mini-batches in the same order for every optimizer,
  per-batch losses and wall-clock times, and the K-FAC values of every step
  (damping, rho, alpha, mu, update norm) when the optimizer is a ``KFAC``.
* **Plain fit with records.** ``fit_and_record`` compiles and fits a fresh
  model with ``model.fit`` (adding ``KFACCallback`` for a ``KFAC``
  optimizer) and keeps the per-batch losses, training times (``FitTimer``)
  and K-FAC values next to the usual ``History``.
* **Plots and tables.** ``plot_loss_curves`` draws the smoothed training loss
  of several runs against steps and against run time, side by side;
  ``target_table`` lists the steps and seconds each run needed to reach a
  set of loss targets.
* **Running the notebooks.** ``execute_notebook`` runs a notebook top to
  bottom with nbclient in a kernel that uses this Python interpreter (used
  by ``colab/build_notebooks.py`` and ``tests/test_notebooks.py``).
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np

from benchmarks import harness
from kfac_keras import KFAC, KFACCallback
from benchmarks.plotting import loss_curves_figure
from benchmarks.targets import steps_and_seconds_to_target
from benchmarks.timing import TimedLossHistory

__all__ = [
    "FitTimer",
    "KFAC_LOG_KEYS",
    "SMALL_ENV_VAR",
    "StepValues",
    "choose",
    "execute_notebook",
    "fit_and_record",
    "plot_loss_curves",
    "size_banner",
    "small_mode",
    "target_table",
    "train",
]

#: The repository root: the kernels of ``execute_notebook`` import
#: ``benchmarks`` (and this clone's ``kfac_keras``) from here.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Environment variable of the size switch (``1``: small sizes, for CI).
SMALL_ENV_VAR = "KFAC_KERAS_NOTEBOOK_SMALL"

_TRUE_VALUES = ("1", "true", "yes", "on")
_FALSE_VALUES = ("", "0", "false", "no", "off")

#: The K-FAC values a training step may add to the logs (see
#: ``kfac_keras.KFAC.logged_values``).
KFAC_LOG_KEYS = ("damping", "rho", "alpha", "mu", "update_norm", "qmodel_change")


def small_mode(environ=None):
    """Whether the notebooks should run at their small (CI) size.

    Args:
        environ: mapping to read ``KFAC_KERAS_NOTEBOOK_SMALL`` from. Defaults
            to None, meaning ``os.environ``.

    Returns:
        True for ``1``/``true``/``yes``/``on``, False for an unset variable,
        the empty string or ``0``/``false``/``no``/``off`` (case-insensitive).

    Raises:
        ValueError: naming the variable, for any other value.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(SMALL_ENV_VAR, "")
    value = raw.strip().lower()
    if value in _TRUE_VALUES:
        return True
    if value in _FALSE_VALUES:
        return False
    raise ValueError(
        f"{SMALL_ENV_VAR}={raw!r} is not understood; use 1 (small sizes) or 0 "
        "(tutorial sizes).")


def choose(small, tutorial, environ=None):
    """Returns ``small`` in small mode and ``tutorial`` otherwise.

    Args:
        small: the value for the small (CI) size.
        tutorial: the value for the tutorial size.
        environ: see ``small_mode``. Defaults to None (``os.environ``).
    """
    return small if small_mode(environ) else tutorial


def size_banner(environ=None):
    """One line saying which size this run uses and how to change it.

    Args:
        environ: see ``small_mode``. Defaults to None (``os.environ``).
    """
    if small_mode(environ):
        return (f"Size: SMALL ({SMALL_ENV_VAR}=1): few steps and small data, "
                "to check that every cell runs. Unset it for the tutorial size.")
    return (f"Size: TUTORIAL ({SMALL_ENV_VAR} unset or 0). Set "
            f"{SMALL_ENV_VAR}=1 for a quick run with few steps.")


class StepValues(keras.callbacks.Callback):
    """Records chosen entries of every training step's logs.

    K-FAC's training step adds the current damping, the update norm and,
    with ``AdaptiveOptions``, ``rho``, ``alpha``, ``mu`` and
    ``qmodel_change`` to the logs; unlike ``loss`` they are not averaged
    over the epoch, so the value in the logs of a batch is that step's value.

    Args:
        keys: the log entries to record. Entries missing from the logs are
            skipped. Defaults to ``KFAC_LOG_KEYS``.

    Attributes:
        values: dict from key to the list of recorded floats (one per step
            that had the key).
    """

    def __init__(self, keys=KFAC_LOG_KEYS):
        super().__init__()
        if isinstance(keys, str):
            raise TypeError(f"`keys` must be a sequence of strings; received {keys!r}.")
        self.keys = tuple(keys)
        self.values = {key: [] for key in self.keys}

    def on_train_begin(self, logs=None):
        self.values = {key: [] for key in self.keys}

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        for key in self.keys:
            if key in logs:
                self.values[key].append(float(logs[key]))

    def arrays(self):
        """The recorded values as float64 arrays, leaving out keys never seen."""
        return {key: np.asarray(v, dtype=np.float64) for key, v in self.values.items() if v}


class FitTimer(TimedLossHistory):
    """Per-batch losses and training time of a `model.fit` run with several epochs.

    Like `benchmarks.timing.TimedLossHistory` (per-batch loss
    recovered from Keras' running mean, wall-clock time after every batch,
    warm-up steps charged the median step time), except that the time
    between epochs (validation, epoch-end callbacks) is left out of the run
    time, so that it measures training only.

    Args:
        **kwargs: `TimedLossHistory` arguments (`warmup_steps`,
            `smooth_window`, ...), with its defaults.
    """

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        if self.wall:  # shift the origin by the time since the last batch ended
            now = time.perf_counter()
            self.t0 += (now - self.t0) - self.wall[-1]


def train(make_model, make_optimizer, x, y, loss, *, steps, batch_size, seed=0,
          label="", report=False, metrics=None, jit_compile=False,
          record=KFAC_LOG_KEYS):
    """Trains a fresh model for ``steps`` steps and records what happened.

    A thin wrapper of ``benchmarks.harness.run_optimizer``: the model
    is built after ``keras.utils.set_random_seed(seed)`` (same initial
    weights for every optimizer) and trained on a fixed sequence of
    mini-batches (same order for every optimizer). When the optimizer is a
    ``kfac_keras.KFAC``, ``kfac_keras.KFACCallback`` is added.

    Args:
        make_model: ``() -> keras.Model``.
        make_optimizer: ``() -> keras.optimizers.Optimizer``.
        x: inputs, a numpy array.
        y: targets, a numpy array, or None for an autoencoder (targets ``x``).
        loss: the Keras loss given to ``compile``.
        steps: int, the number of optimizer steps.
        batch_size: int, examples per step.
        seed: int, seed of the initial weights and of the batch order.
            Defaults to 0.
        label: str, name of the run in the plots and tables. Defaults to "".
        report: bool, print K-FAC's registration report. Defaults to False.
        metrics: optional list of Keras metrics for ``compile``. Defaults to
            None.
        jit_compile: bool, passed to ``compile``. Defaults to False.
        record: the log entries to record every step (``StepValues``).
            Defaults to ``KFAC_LOG_KEYS``.

    Returns:
        The ``run_optimizer`` result (``history`` with per-step ``loss``,
        ``smoothed`` and ``elapsed``; ``per_step_ms``; ``total_seconds`` ...)
        plus ``label``, ``values`` (``StepValues.arrays()``) and
        ``optimizer`` (the trained optimizer instance).
    """
    made = {}
    values = StepValues(record)

    def build_optimizer():
        made["optimizer"] = make_optimizer()
        return made["optimizer"]

    def callbacks():
        extra = []
        if isinstance(made["optimizer"], KFAC):
            extra.append(KFACCallback(verbose=1 if report else 0))
        extra.append(values)
        return extra

    result = harness.run_optimizer(
        make_model, build_optimizer, x, y, loss, batch_size, steps, seed,
        jit_compile, callbacks=callbacks, label=label, metrics=metrics)
    result["label"] = label
    result["values"] = values.arrays()
    result["optimizer"] = made["optimizer"]
    return result


def plot_loss_curves(runs, *, loss_scale=1.0, ylabel="training loss", targets=(),
                     title=None, log_y=True):
    """Smoothed training loss against steps (left) and run time (right).

    ``benchmarks.plotting.loss_curves_figure``, for ``train`` and
    ``fit_and_record`` results.

    Args:
        runs: iterable of ``train`` results.
        loss_scale: the losses are multiplied by this (e.g. 784 to turn a
            mean per-pixel cross-entropy into a per-image sum). Defaults to 1.
        ylabel: label of the loss axis. Defaults to "training loss".
        targets: loss values drawn as dashed lines. Defaults to ().
        title: optional figure title. Defaults to None.
        log_y: log scale for the loss axis. Defaults to True.

    Returns:
        The matplotlib ``Figure``.
    """
    return loss_curves_figure(runs, loss_scale=loss_scale, ylabel=ylabel, targets=targets,
                              title=title, log_y=log_y)


def target_table(runs, targets, loss_scale=1.0):
    """A text table of the steps and seconds each run took to reach each target.

    A target counts as reached at the first step where the smoothed loss (a
    trailing 10-step average, times ``loss_scale``) is at or below it;
    ``-`` means never within the run.

    Args:
        runs: iterable of ``train`` results.
        targets: loss values, in the scaled units.
        loss_scale: see ``plot_loss_curves``. Defaults to 1.

    Returns:
        The table as a string (one row per run).
    """
    runs = list(runs)
    header = ["run", "ms/step"] + [f"<= {t:g}: steps / s" for t in targets]
    rows = [header]
    for run in runs:
        reached = steps_and_seconds_to_target(run, targets, loss_scale=loss_scale)
        cells = [run["label"], f"{run['per_step_ms']:.0f}"]
        for target in targets:
            steps, seconds = reached[target]
            cells.append("-" if steps is None else f"{steps} / {seconds:.1f}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fit_and_record(make_model, optimizer, loss, x, y, *, epochs, batch_size,
                   validation_data=None, label="", metrics=("accuracy",), seed=0,
                   verbose=2, report=True, record=KFAC_LOG_KEYS):
    """Builds, compiles and fits a fresh model with plain ``model.fit``.

    ``keras.utils.set_random_seed(seed)`` runs before the model is built, so
    runs with different optimizers start from the same weights and (as
    ``fit`` draws its shuffling from the same seeded generators) see the
    batches in the same order. For a ``kfac_keras.KFAC`` optimizer,
    ``kfac_keras.KFACCallback`` is added.

    Args:
        make_model: ``() -> keras.Model``.
        optimizer: a fresh optimizer instance.
        loss: the Keras loss.
        x: training inputs.
        y: training targets.
        epochs: int, passed to ``fit``.
        batch_size: int, passed to ``fit``.
        validation_data: optional ``(x_val, y_val)``, passed to ``fit``.
            Defaults to None.
        label: str, name of the run in plots. Defaults to "".
        metrics: Keras metrics for ``compile``. Defaults to
            ``("accuracy",)``.
        seed: int, seed set before building the model. Defaults to 0.
        verbose: ``fit``'s verbosity. Defaults to 2 (one line per epoch).
        report: bool, let ``KFACCallback`` print the registration report.
            Defaults to True.
        record: log entries recorded every step (``StepValues``). Defaults
            to ``KFAC_LOG_KEYS``.

    Returns:
        A dict with ``label``, ``model``, ``optimizer``, ``epochs`` (the
        ``History.history`` dict), ``history`` (per-batch ``loss``,
        ``smoothed`` and ``elapsed`` as in ``train``; ``FitTimer`` leaves the
        validation between epochs out of the time), ``per_step_ms`` and
        ``values`` (``StepValues.arrays()``), so it can be passed to
        ``plot_loss_curves`` and ``target_table``.
    """
    keras.backend.clear_session()
    keras.utils.set_random_seed(int(seed))
    model = make_model()
    model.compile(optimizer=optimizer, loss=loss,
                  metrics=list(metrics) if metrics else None)
    timer = FitTimer()
    values = StepValues(record)
    callbacks = [values, timer]  # the timer last, so it times the others too
    if isinstance(optimizer, KFAC):
        callbacks.insert(0, KFACCallback(verbose=1 if report else 0))
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs,
                        validation_data=validation_data, verbose=verbose,
                        callbacks=callbacks)
    result = timer.result()
    return {"label": label, "model": model, "optimizer": optimizer,
            "epochs": history.history, "history": result,
            "per_step_ms": result["per_step_ms"], "values": values.arrays()}


def execute_notebook(path, *, small=True, cwd=None, timeout=900, env=None,
                     save_to=None):
    """Runs a notebook top to bottom in a kernel on this Python interpreter.

    The kernel is ``python -m ipykernel_launcher`` with ``sys.executable``
    (from a kernelspec written to a temporary folder), so it sees the same
    packages as the caller whatever kernels Jupyter has installed. The
    notebook's own ``kernelspec`` metadata is left as it was. The repository
    root (``REPO_ROOT``) comes first on the kernel's ``PYTHONPATH``, so the
    notebook imports ``benchmarks`` and ``kfac_keras`` from this clone
    wherever the notebook file is. Output written
    by C/C++ code directly to the process's file descriptors (TensorFlow's
    start-up logging) is not captured into the notebook.

    Args:
        path: the ``.ipynb`` file to run. It is read, not modified (unless
            ``save_to`` names it).
        small: bool, set ``KFAC_KERAS_NOTEBOOK_SMALL`` to ``1`` (True) or
            ``0`` (False) for the kernel. Defaults to True.
        cwd: working directory of the kernel. Defaults to None, meaning the
            notebook's folder.
        timeout: seconds allowed for each cell. Defaults to 900.
        env: optional dict of extra environment variables for the kernel.
            Defaults to None.
        save_to: optional path to write the executed notebook to. Defaults
            to None (not written).

    Returns:
        The executed ``nbformat.NotebookNode``.

    Raises:
        nbclient.exceptions.CellExecutionError: if a cell raises; the
            message has the cell's traceback.
        nbclient.exceptions.CellTimeoutError: if a cell runs past
            ``timeout``.
    """
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import nbclient  # noqa: PLC0415 (test/examples dependency)
    import nbformat  # noqa: PLC0415
    from jupyter_client.kernelspec import KernelSpecManager  # noqa: PLC0415
    from jupyter_client.manager import AsyncKernelManager  # noqa: PLC0415

    if not isinstance(small, bool):
        raise TypeError(f"`small` must be a bool; received {small!r}.")
    path = os.path.abspath(os.fspath(path))
    notebook = nbformat.read(path, as_version=4)
    kernelspec = dict(notebook.metadata.get("kernelspec", {}))
    kernel_env = dict(os.environ)
    kernel_env.update(env or {})
    kernel_env[SMALL_ENV_VAR] = "1" if small else "0"
    kernel_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, kernel_env.get("PYTHONPATH", "")) if p)
    kernel_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The inline backend draws the figures into the notebook; a backend set
    # for scripts (e.g. MPLBACKEND=Agg) would drop them.
    kernel_env.pop("MPLBACKEND", None)
    name = "kfac-keras-this-python"
    with tempfile.TemporaryDirectory(prefix="kfac_keras_kernel_") as kernels:
        os.makedirs(os.path.join(kernels, name))
        with open(os.path.join(kernels, name, "kernel.json"), "w") as f:
            # capture_fd_output=False: output that C/C++ code writes straight
            # to the process's stdout/stderr (TensorFlow's start-up logging)
            # goes to the terminal, not into the notebook; Python's own
            # output and warnings are kept.
            json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher",
                                "-f", "{connection_file}",
                                "--IPKernelApp.capture_fd_output=False"],
                       "display_name": "Python (this interpreter)",
                       "language": "python"}, f)
        manager = AsyncKernelManager(
            kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]))
        client = nbclient.NotebookClient(
            notebook, km=manager, timeout=timeout, kernel_name=name,
            resources={"metadata": {"path": cwd or os.path.dirname(path)}})
        client.execute(env=kernel_env)
    if kernelspec:
        notebook.metadata["kernelspec"] = kernelspec
    if save_to is not None:
        nbformat.write(notebook, os.fspath(save_to))
    return notebook
