"""Command-line options shared by the optimizer-race benchmarks (autoencoder, MNIST CNN, transformer LM)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import keras

from benchmarks.optimizers import DEFAULT_OPTIMIZERS, OPTIMIZER_NAMES, get_optimizer_specs
from benchmarks.targets import DEFAULT_SMOOTH_WINDOW
from benchmarks.timing import DEFAULT_WARMUP_STEPS
from kfac_keras import KFAC

__all__ = [
    "build_common_parser",
    "kfac_kwargs_from_args",
    "parse_positive_list",
    "race_specs",
    "race_targets",
    "parse_kfac_options",
    "parse_optimizer_list",
    "print_environment",
    "protocol_notes",
    "resolve_common_args",
]


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


def parse_kfac_options(text: str):
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
        KFAC(**kwargs)
    return kwargs


def _parse_float_list(text: str):
    return tuple(float(t) for t in text.split(",") if t.strip())


def parse_positive_list(text: str, flag: str):
    """The positive finite numbers of a comma list such as ``--targets``.

    Args:
        text: str, e.g. ``"120,100,80"``.
        flag: str, the flag's name for the error message (``"--targets"``).

    Returns:
        A non-empty tuple of floats.

    Raises:
        ValueError: if an entry is not a number, or not finite and positive,
            or the list is empty.
    """
    try:
        values = _parse_float_list(text)
    except ValueError:
        raise ValueError(f"{flag} must be a comma list of numbers; received {text!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{flag} must be positive numbers; received {text!r}")
    return values


def race_targets(parser, args, flag, default, quick_default):
    """The targets of a race: the comma list of ``flag`` if given (refused
    through ``parser.error`` unless positive numbers), else the command's
    defaults for ``--quick`` or a full run.

    Args:
        parser: the command's `argparse.ArgumentParser`.
        args: its parsed flags.
        flag: str, e.g. ``"--targets"``.
        default: tuple, the targets of a full run.
        quick_default: tuple, the targets with ``--quick``.
    """
    text = getattr(args, flag.lstrip("-").replace("-", "_"))
    if not text:
        return quick_default if args.quick else default
    try:
        return parse_positive_list(text, flag)
    except ValueError as e:
        parser.error(str(e))


def race_specs(args, output_layer_name, grids=None):
    """The optimizers of the race from ``--optimizers``, ``--kfac-damping``,
    ``--kfac-options`` and ``--kfac-grid`` (`optimizers.get_optimizer_specs`);
    prints why and returns an empty dict when none is left to run.

    Args:
        args: the parsed flags of `build_common_parser`.
        output_layer_name: str, the model's output layer (excluded by Muon).
        grids: dict of learning-rate grids per optimizer, or None for the
            shared ones. Defaults to None.
    """
    specs = get_optimizer_specs(args.optimizers, output_layer_name=output_layer_name,
                                kfac_kwargs=kfac_kwargs_from_args(args),
                                kfac_grid=args.kfac_grid, grids=grids)
    if not specs:
        print("no optimizer to run", file=sys.stderr)
    return specs


def build_common_parser(example: str, description: str = "", *,
                        default_steps: int, quick_steps: int,
                        default_optimizers=DEFAULT_OPTIMIZERS, mnist_data=True):
    """argparse parser with the flags shared by the optimizer-race commands.

    Args:
        example: str, the command's module name in `benchmarks` (for the
            program name and the default output folder).
        description: str, the help text's description. Defaults to "".
        default_steps: int, training steps without `--quick`.
        quick_steps: int, training steps with `--quick`.
        default_optimizers: names raced unless `--optimizers` says otherwise.
            Defaults to `DEFAULT_OPTIMIZERS`.
        mnist_data: bool, whether the command reads MNIST and so takes
            `--data-dir`. Defaults to True.

    Returns:
        An `argparse.ArgumentParser`.
    """
    p = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{example}", description=description)
    if mnist_data:
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
    p.add_argument("--kfac-options", type=parse_kfac_options, default={},
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


def start_race(parser, argv, *, default_steps: int, quick_steps: int):
    """The opening of an optimizer-race command: parses ``argv`` (the flags of
    ``build_common_parser``), refuses a non-positive ``--batch-size``, prints
    the environment and resolves the ``--quick``-dependent defaults.

    Returns:
        ``(args, t_start, steps, grid_steps, jit)``; ``t_start`` is
        ``time.perf_counter()`` at the start of the run.
    """
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive; received {args.batch_size}")
    t_start = time.perf_counter()
    print_environment()
    steps, grid_steps, jit = resolve_common_args(
        args, default_steps=default_steps, quick_steps=quick_steps)
    return args, t_start, steps, grid_steps, jit


def print_environment():
    """One line with the library versions and thread count."""
    import tensorflow as tf

    print(f"python {sys.version.split()[0]}, tensorflow {tf.__version__}, keras "
          f"{keras.__version__}, {os.cpu_count()} CPU cores", flush=True)
