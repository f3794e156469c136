"""Per-step time of K-FAC vs Adam on the small CNN (not a test).

Trains `small_models.small_cnn()` (Conv2D+BatchNorm+pool twice, then Dense)
on random MNIST-size data (28x28x1, batch 128) with `model.fit`, once with
Adam and once with K-FAC (its default statistics and inverse schedule,
printed by the command), XLA off (the CPU default), and reports per-step wall
times after a warm-up: the median (a typical step: preconditioning only) and
the mean (amortizing the statistics and inverse steps).

Usage::

    python -m benchmarks.time_small_cnn [--steps 40] [--warmup 5]
"""

import argparse

import keras
import numpy as np

import kfac_keras
from benchmarks import small_models
from benchmarks.timing import TimedLossHistory


def time_optimizer(optimizer, use_kfac, steps, warmup, batch_size=128, seed=0):
    """Per-step durations (seconds) of `fit` after `warmup` steps.

    Args:
        optimizer: a Keras optimizer instance.
        use_kfac: bool, add `KFACCallback`.
        steps: int, timed steps.
        warmup: int, untimed steps first (tracing, first decompositions).
        batch_size: int. Defaults to 128.
        seed: int. Defaults to 0.

    Returns:
        A NumPy array of `steps` durations.
    """
    keras.utils.set_random_seed(seed)
    model = small_models.small_cnn()
    x, y = small_models.random_image_data((steps + warmup) * batch_size, seed=seed)
    model.compile(optimizer=optimizer, jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = TimedLossHistory(warmup_steps=warmup, stop_on_nan=False)
    callbacks = ([kfac_keras.KFACCallback(verbose=0)] if use_kfac else []) + [timer]
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
              callbacks=callbacks)
    return timer.step_seconds()[warmup:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    results = {
        "adam": time_optimizer(keras.optimizers.Adam(1e-3), False, args.steps, args.warmup),
        "kfac": time_optimizer(kfac_keras.KFAC(learning_rate=0.02, damping=0.3, seed=0), True,
                               args.steps, args.warmup),
        "kfac (statistics every step)": time_optimizer(
            kfac_keras.KFAC(learning_rate=0.02, damping=0.3, seed=0, cov_update_every=1),
            True, args.steps, args.warmup),
    }
    defaults = kfac_keras.KFAC()
    print(f"small CNN, batch 128, 28x28x1, XLA off, {args.steps} steps after "
          f"{args.warmup} warm-up steps; K-FAC statistics every "
          f"{defaults.cov_update_every} steps, inverses every {defaults.inv_update_every}")
    for name, durations in results.items():
        print(f"  {name:30s} median {1e3 * np.median(durations):7.1f} ms   "
              f"mean {1e3 * np.mean(durations):7.1f} ms   "
              f"max {1e3 * np.max(durations):7.1f} ms")


if __name__ == "__main__":
    main()
