"""The one plotting module of the benchmarks and notebooks (matplotlib).

* ``draw_loss_curves`` draws the smoothed training loss of several runs
  against optimizer steps or against run time onto one axis.
* ``write_loss_plots`` saves ``loss_vs_steps.png`` and
  ``loss_vs_seconds.png`` (the optimizer-race benchmarks).
* ``loss_curves_figure`` puts both side by side in one figure (notebooks).
* ``write_log_log_plot`` saves one log-log plot of several series (the
  scaling benchmark).

A "run" is a ``benchmarks.harness.run_optimizer`` result (or anything with a
``history`` holding ``smoothed`` and ``elapsed``), with an optional
``display``/``label`` name and ``lr``.
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks.reports import fmt_lr
from benchmarks.targets import DEFAULT_SMOOTH_WINDOW

__all__ = [
    "draw_loss_curves",
    "loss_curves_figure",
    "write_log_log_plot",
    "write_loss_plots",
]

_X_LABELS = {"steps": "optimizer steps",
             "seconds": "run time, s (log scale; compile time excluded)"}


def _pyplot(for_files):
    """matplotlib's pyplot; scripts that only write files use the Agg backend."""
    import matplotlib

    if for_files:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_axis(axis, subs):
    """Log ticks labelled with plain numbers (1, 2, 5, 10, ...), no minor labels."""
    from matplotlib import ticker

    axis.set_major_locator(ticker.LogLocator(subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _run_label(name, run, with_lr):
    label = run.get("display") or run.get("label") or name
    return f"{label} (lr {fmt_lr(run.get('lr'))})" if with_lr else label


def draw_loss_curves(ax, runs, *, x_axis="steps", loss_scale=1.0, targets=(),
                     log_y=True, with_lr=True, highlight="kfac"):
    """Draws each run's smoothed loss against steps or run time onto ``ax``.

    Args:
        ax: a matplotlib ``Axes``.
        runs: dict ``{name: run}`` or an iterable of runs (then named by their
            ``label``).
        x_axis: ``"steps"`` or ``"seconds"`` (log scale). Defaults to
            ``"steps"``.
        loss_scale: the losses are multiplied by this (e.g. 784 to turn a
            mean per-pixel cross-entropy into a per-image sum). Defaults to 1.
        targets: loss values drawn as dashed lines. Defaults to ().
        log_y: log scale for the loss axis. Defaults to True.
        with_lr: add each run's learning rate to its legend entry. Defaults
            to True.
        highlight: name of the run drawn with a thicker line. Defaults to
            ``"kfac"``.

    Raises:
        ValueError: for an unknown ``x_axis``.
    """
    if x_axis not in _X_LABELS:
        raise ValueError(f"`x_axis` must be one of {sorted(_X_LABELS)}; received {x_axis!r}.")
    items = runs.items() if isinstance(runs, dict) else ((r.get("label", ""), r) for r in runs)
    for name, run in items:
        history = run["history"]
        smoothed = np.asarray(history["smoothed"], dtype=np.float64) * loss_scale
        if not smoothed.size:
            continue
        xs = (np.arange(1, smoothed.size + 1) if x_axis == "steps"
              else np.asarray(history["elapsed"], dtype=np.float64))
        ax.plot(xs, smoothed, lw=2.2 if name == highlight else 1.4,
                label=_run_label(name, run, with_lr))
    for target in targets:
        ax.axhline(target, color="grey", ls="--", lw=0.7)
    ax.set_xlabel(_X_LABELS[x_axis])
    if x_axis == "seconds":
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis, (1.0, 2.0, 5.0))
    if log_y:
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis, (1.0, 2.0, 3.0, 5.0))
    ax.grid(True, which="both", alpha=0.3)


def write_loss_plots(runs, out_dir, *, loss_scale=1.0, loss_label="loss", targets=(),
                     title="", log_y=True):
    """Saves ``loss_vs_steps.png`` and ``loss_vs_seconds.png`` to ``out_dir``.

    Args:
        runs: dict ``{name: run}``.
        out_dir: folder, created if missing.
        loss_scale: see ``draw_loss_curves``. Defaults to 1.
        loss_label: name of the loss on the y axis. Defaults to "loss".
        targets: loss values drawn as dashed lines. Defaults to ().
        title: plot title. Defaults to "" (``training loss vs steps`` ...).
        log_y: log scale for the loss axis. Defaults to True.

    Returns:
        The two paths.
    """
    plt = _pyplot(for_files=True)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for x_axis in ("steps", "seconds"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw_loss_curves(ax, runs, x_axis=x_axis, loss_scale=loss_scale, targets=targets,
                         log_y=log_y)
        ax.set_ylabel(f"{loss_label} (moving average)")
        ax.set_title(title or f"training loss vs {x_axis}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"loss_vs_{x_axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def loss_curves_figure(runs, *, loss_scale=1.0, ylabel="training loss", targets=(),
                       title=None, log_y=True):
    """Smoothed training loss against steps (left) and run time (right), in one figure.

    Args:
        runs: iterable of runs, each with a ``label``.
        loss_scale: see ``draw_loss_curves``. Defaults to 1.
        ylabel: label of the loss axis. Defaults to "training loss".
        targets: loss values drawn as dashed lines. Defaults to ().
        title: optional figure title. Defaults to None.
        log_y: log scale for the loss axis. Defaults to True.

    Returns:
        The matplotlib ``Figure`` (drawn inline by a notebook).
    """
    plt = _pyplot(for_files=False)
    runs = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, x_axis in zip(axes, ("steps", "seconds")):
        draw_loss_curves(ax, runs, x_axis=x_axis, loss_scale=loss_scale, targets=targets,
                         log_y=log_y, with_lr=False, highlight=None)
    axes[0].set_ylabel(f"{ylabel} ({DEFAULT_SMOOTH_WINDOW}-step average)")
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_log_log_plot(path, series, *, xlabel, ylabel, title, x_base=2):
    """Saves one log-log plot of several series.

    Args:
        path: the PNG file to write.
        series: iterable of ``(label, xs, ys, style)``; series with no points
            are left out.
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: plot title.
        x_base: base of the logarithmic x axis. Defaults to 2.

    Returns:
        ``path``.
    """
    from matplotlib import ticker

    plt = _pyplot(for_files=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs, ys, style in series:
        if len(xs):
            ax.plot(xs, ys, style, label=label)
    ax.set_xscale("log", base=x_base)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
