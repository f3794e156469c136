"""Long-run stability check: the MNIST deep autoencoder with default K-FAC.

Run with::

    python -m benchmarks.stability [--steps 3000] [--batch-size 1000]
        [--data-dir DIR] [--examples N] [--seed 0] [--check-every 100]
        [--max-increase 10] [--out FILE.json] [--verbose 0|1]

It trains the 784-1000-500-250-30-250-500-1000-784 autoencoder of
`benchmarks.autoencoder` (tanh hidden units, linear code layer,
`BinaryCrossentropy(from_logits=True)`) with `kfac_keras.KFAC()` at its
default settings (only `seed` is set, which fixes the Fisher samples and does
not change the algorithm), through `make_train_step` in a `tf.function`, on
batches drawn from a fresh random permutation of the data every epoch.

The run is *stable* when all of these hold:

* every per-batch loss is finite;
* every weight and every optimizer variable (factors, inverses, momentum,
  damping, counters) is finite at each check (every `--check-every` steps)
  and at the end;
* the non-finite guard skipped no step (`optimizer.skipped_steps == 0`: a
  skipped step means some loss, gradient or statistic was NaN/Inf);
* no per-batch loss exceeds `--max-increase` (10) times the lowest per-batch
  loss seen before it.

The script prints a summary (losses at the start and the end, the largest
loss increase and where, skipped steps, time per step) and exits with status
1 if the run is not stable. `--out` also writes the summary, with the
per-step losses, as JSON. CI runs it at a reduced size
(`tests/test_stability_script.py`).

Data: `benchmarks.mnist_data.load_mnist` (`--data-dir` or the
`KFAC_KERAS_DATA_DIR` environment variable).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

DEFAULT_STEPS = 3000
DEFAULT_BATCH_SIZE = 1000


def build_parser():
    """The command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Long-run stability of default K-FAC on the MNIST autoencoder.")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps (default {DEFAULT_STEPS})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"examples per step (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--data-dir", default=None,
                        help="MNIST IDX folder (default: $KFAC_KERAS_DATA_DIR)")
    parser.add_argument("--examples", type=int, default=None,
                        help="use only the first N images (default: all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for weights, batch order and Fisher samples (default 0)")
    parser.add_argument("--check-every", type=int, default=100,
                        help="steps between finiteness checks of all variables (default 100)")
    parser.add_argument("--max-increase", type=float, default=10.0,
                        help="largest allowed ratio of a batch loss to the lowest "
                             "earlier batch loss (default 10)")
    parser.add_argument("--out", default=None, help="write the summary as JSON here")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1),
                        help="1 (default): print the loss at every check")
    return parser


def _check_args(args):
    for name in ("steps", "batch_size", "check_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; received "
                             f"{getattr(args, name)}.")
    if args.examples is not None and args.examples < args.batch_size:
        raise ValueError(f"--examples ({args.examples}) must be >= --batch-size "
                         f"({args.batch_size}).")
    if not args.max_increase > 1.0:
        raise ValueError(f"--max-increase must be > 1; received {args.max_increase}.")


def _all_finite(variables):
    return all(bool(np.isfinite(v.numpy()).all()) for v in variables
               if np.issubdtype(np.dtype(v.dtype), np.floating))


def largest_increase(losses):
    """`(ratio, step)`: the largest `losses[t] / min(losses[:t])`, t >= 1."""
    losses = np.asarray(losses, dtype=np.float64)
    if len(losses) < 2:
        return 1.0, 0
    running_min = np.minimum.accumulate(losses)[:-1]
    ratios = losses[1:] / running_min
    step = int(np.argmax(ratios)) + 1
    return float(ratios[step - 1]), step


def run(args):
    """Trains and returns the summary dict (see the module docstring)."""
    _check_args(args)
    import keras
    import tensorflow as tf

    import kfac_keras
    from benchmarks.autoencoder import PIXELS, make_autoencoder
    from benchmarks.mnist_data import load_mnist

    x, _, source = load_mnist(args.data_dir)
    if args.examples is not None:
        x = x[: args.examples]
    keras.utils.set_random_seed(args.seed)
    model = make_autoencoder()
    optimizer = kfac_keras.KFAC(seed=args.seed)  # default settings
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    step = tf.function(kfac_keras.make_train_step(model, optimizer, loss))

    rng = np.random.default_rng(args.seed)
    per_epoch = x.shape[0] // args.batch_size
    order = rng.permutation(x.shape[0])
    losses, pending = [], []
    checks_failed = []
    start = time.perf_counter()
    first_step_seconds = None
    for index in range(args.steps):
        position = index % per_epoch
        if position == 0 and index > 0:
            order = rng.permutation(x.shape[0])
        batch = x[order[position * args.batch_size:(position + 1) * args.batch_size]]
        pending.append(step(batch, batch)["loss"])
        if index == 0:
            losses.append(float(pending.pop()))
            first_step_seconds = time.perf_counter() - start
        if (index + 1) % args.check_every == 0 or index + 1 == args.steps:
            losses.extend(float(value) for value in pending)
            pending = []
            if not (_all_finite(model.variables) and _all_finite(optimizer.variables)):
                checks_failed.append(index + 1)
            if args.verbose:
                print(f"step {index + 1}: loss {losses[-1]:.5f}, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start

    ratio, ratio_step = largest_increase(losses)
    skipped = int(optimizer.skipped_steps.numpy())
    finite_losses = bool(np.isfinite(losses).all())
    stable = (finite_losses and not checks_failed and skipped == 0
              and ratio <= args.max_increase)
    tail = losses[-min(len(losses), 100):]
    summary = {
        "stable": stable,
        "data": source,
        "examples": int(x.shape[0]),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "optimizer_config": {k: v for k, v in optimizer.get_config().items()
                             if isinstance(v, (int, float, str, bool, type(None)))},
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_min": float(np.min(losses)),
        "loss_mean_last_100": float(np.mean(tail)),
        "summed_ce_per_image_mean_last_100": float(np.mean(tail)) * PIXELS,
        "largest_increase_ratio": ratio,
        "largest_increase_step": ratio_step,
        "max_increase_allowed": args.max_increase,
        "all_losses_finite": finite_losses,
        "failed_variable_checks": checks_failed,
        "skipped_steps": skipped,
        "final_damping": float(optimizer.damping.numpy()),
        "seconds": seconds,
        "seconds_first_step": first_step_seconds,
        "ms_per_step_after_first": (
            1000.0 * (seconds - first_step_seconds) / max(args.steps - 1, 1)),
        "losses": [float(v) if math.isfinite(v) else str(v) for v in losses],
    }
    return summary


def main(argv=None):
    """Command-line entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    summary = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    printable = {k: v for k, v in summary.items() if k != "losses"}
    print(json.dumps(printable, indent=1))
    print("STABLE" if summary["stable"] else "NOT STABLE", flush=True)
    return 0 if summary["stable"] else 1


if __name__ == "__main__":
    sys.exit(main())
