"""Where the time of a K-FAC step goes, next to an Adam step on the same model.

Run with::

    python -m benchmarks.step_cost [--models autoencoder,cnn]
        [--batch-size 1000] [--repeats 10] [--data-dir DIR] [--out-dir DIR]

For each model it times, in milliseconds (median over `--repeats` calls of a
`tf.function`, after two warm-up calls; jit off, the Keras default on CPU):

* `adam_step`: a complete Adam training step (forward, backward, update).
* `forward_backward`: forward pass, loss and gradient only.
* `statistics`: the extra cost of a step that updates the factor statistics
  (the sampled-loss backward pass and the factor products), measured as
  (step with statistics) - (step without).
* `decomposition_per_call` and `decomposition_amortized` (= per call /
  `inv_update_every`): all factor decompositions of the model.
* `preconditioning`: multiplying all gradients by the damped inverse blocks.
* `update_and_overhead`: the rest of a step without statistics,
  decompositions or damping adaptation (norm constraint, momentum, guards).
* `damping_adaptation_per_call` and `damping_adaptation_amortized` (= per
  call / `damping_update_every`): the default Levenberg-Marquardt rule (loss
  after the update and forward-mode Fisher products on the batch).
* `kfac_step_default`: the mean K-FAC step at the default options, over a
  whole number of `inv_update_every` periods after the start-up phase, so
  the occasional statistics, decompositions and damping adaptations are
  included at their steady-state frequency.

and prints the ratio `kfac_step_default / adam_step_alternated`, where the
K-FAC periods and as many Adam steps are timed alternately (so a change in
machine load affects both alike). Results are printed as
a Markdown table and written to `<out-dir>/step_cost.md` and `.csv`.
"""

import argparse
import csv
import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kfac_keras  # noqa: E402
from benchmarks.cli import parse_kfac_options  # noqa: E402
from benchmarks.autoencoder import make_autoencoder  # noqa: E402
from benchmarks.mnist_data import load_mnist  # noqa: E402
from benchmarks.small_models import small_cnn  # noqa: E402
from benchmarks.timing import call_seconds, kfac_period_seconds, median_ms  # noqa: E402


def build_adam_step(model, x, y, loss, learning_rate=1e-3):
    """An Adam training step on a fixed batch, as a `tf.function`.

    Args:
        model: a built Keras model.
        x: input batch (tensor).
        y: target batch (tensor).
        loss: a Keras loss object, called as `loss(y, prediction)`.
        learning_rate: Adam's learning rate. Defaults to 1e-3.

    Returns:
        `(optimizer, step)`: the built `keras.optimizers.Adam` and a
        zero-argument `tf.function` that runs one step and returns the loss.
    """
    adam = keras.optimizers.Adam(learning_rate)
    adam.build(model.trainable_variables)

    @tf.function
    def adam_step():
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        adam.apply_gradients(zip(tape.gradient(value, model.trainable_variables),
                                 model.trainable_variables))
        return value

    return adam, adam_step


def build_kfac_step(make_model, x, y, loss, **options):
    """A K-FAC training step on a fixed batch, on a fresh model (seed 0).

    Args:
        make_model: `() -> keras.Model`, called after `set_random_seed(0)`.
        x: input batch (tensor).
        y: target batch (tensor).
        loss: the loss given to `kfac_keras.make_train_step`.
        **options: `kfac_keras.KFAC` options (`seed` is 0).

    Returns:
        `(model, optimizer, step)`; `step` is a zero-argument `tf.function`
        running one `make_train_step` step and returning the loss.
    """
    keras.utils.set_random_seed(0)
    model = make_model()
    optimizer = kfac_keras.KFAC(seed=0, **options)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    return model, optimizer, tf.function(lambda: step(x, y)["loss"])


def autoencoder_problem(batch_size, data_dir):
    x, _, source = load_mnist(data_dir)
    x = x[:batch_size]
    return (make_autoencoder, x, x,
            keras.losses.BinaryCrossentropy(from_logits=True),
            f"autoencoder 784-1000-500-250-30-250-500-1000-784 ({source})")


def cnn_problem(batch_size, data_dir):
    x, y, source = load_mnist(data_dir, flatten=False)
    return (lambda: small_cnn(input_shape=(28, 28, 1), num_classes=10),
            x[:batch_size], y[:batch_size],
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            f"small CNN ({source})")


PROBLEMS = {"autoencoder": autoencoder_problem, "cnn": cnn_problem}


def measure(make_model, x, y, loss, repeats, kfac_options=None):
    """Returns a dict of milliseconds for one model and batch."""
    kfac_options = dict(kfac_options or {})
    x = tf.constant(x)
    y = tf.constant(y)
    results = {}

    keras.utils.set_random_seed(0)
    model = make_model()
    _, adam_step = build_adam_step(model, x, y, loss)

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        return tape.gradient(value, model.trainable_variables)

    results["adam_step"] = median_ms(adam_step, repeats)
    results["forward_backward"] = median_ms(forward_backward, repeats)

    def kfac_step_fn(**options):
        return build_kfac_step(make_model, x, y, loss, **{**kfac_options, **options})

    never = 10**9
    _, _, plain = kfac_step_fn(cov_update_every=never, inv_update_every=never, adaptive=None)
    _, _, with_stats = kfac_step_fn(cov_update_every=1, inv_update_every=never, adaptive=None)
    plain_ms = median_ms(plain, repeats)
    results["statistics"] = median_ms(with_stats, repeats) - plain_ms
    # The default Levenberg-Marquardt rule runs every `damping_update_every`
    # steps (an extra forward pass and forward-mode Fisher products).
    adaptive = kfac_keras.KFAC(**kfac_options).adaptive
    if adaptive is not None and adaptive.adapt_damping:
        every_step = dataclasses.replace(adaptive, damping_update_every=1)
        _, _, adapting = kfac_step_fn(cov_update_every=never, inv_update_every=never,
                                      adaptive=every_step)
        results["damping_adaptation_per_call"] = max(
            0.0, median_ms(adapting, repeats) - plain_ms)
        results["damping_adaptation_amortized"] = (
            results["damping_adaptation_per_call"] / adaptive.damping_update_every)
    else:
        results["damping_adaptation_per_call"] = 0.0
        results["damping_adaptation_amortized"] = 0.0

    kmodel, optimizer, _ = kfac_step_fn()
    decompose = tf.function(optimizer.update_inverses, autograph=False)
    results["decomposition_per_call"] = median_ms(decompose, max(3, repeats // 3))
    results["decomposition_amortized"] = (
        results["decomposition_per_call"] / optimizer.inv_update_every)
    grads = forward_backward()
    variables = model.trainable_variables
    kvars = kmodel.trainable_variables
    precondition = tf.function(lambda: optimizer.precondition(grads, kvars))
    results["preconditioning"] = median_ms(precondition, repeats)
    results["update_and_overhead"] = max(
        0.0, plain_ms - results["forward_backward"] - results["preconditioning"])
    del variables

    # The ratio: whole K-FAC periods alternated with as many Adam steps, so
    # that a change in machine load hits both sides alike.
    _, optimizer, default_step = kfac_step_fn()
    period = optimizer.inv_update_every
    cycles = max(2, repeats // period + (1 if repeats % period else 0))
    kfac_period_seconds(default_step, optimizer, 0, skip_startup=True)  # warm-up
    kfac_seconds, adam_seconds = 0.0, 0.0
    for _ in range(cycles):
        kfac_seconds += float(np.sum(kfac_period_seconds(default_step, optimizer, 1, warmup=0)))
        adam_seconds += float(np.sum(call_seconds(adam_step, period, warmup=0)))
    results["kfac_step_default"] = 1000.0 * kfac_seconds / (period * cycles)
    results["adam_step_alternated"] = 1000.0 * adam_seconds / (period * cycles)
    results["ratio_kfac_to_adam"] = kfac_seconds / adam_seconds
    return results


COLUMNS = ["adam_step", "forward_backward", "statistics", "decomposition_per_call",
           "decomposition_amortized", "preconditioning", "update_and_overhead",
           "damping_adaptation_per_call", "damping_adaptation_amortized",
           "kfac_step_default", "adam_step_alternated", "ratio_kfac_to_adam"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="autoencoder,cnn",
                        help="comma list from: " + ",".join(PROBLEMS))
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", default=os.path.join("benchmark_results", "step_cost"))
    parser.add_argument("--kfac-options", type=parse_kfac_options, default={},
                        help='JSON object of KFAC arguments for every K-FAC step measured, '
                             'e.g. \'{"step_rule": "kl_clip"}\' (default: KFAC() defaults)')
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROBLEMS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(PROBLEMS)}")
    defaults = kfac_keras.KFAC(**args.kfac_options)
    print(f"K-FAC options {args.kfac_options or 'defaults'}: step_rule={defaults.step_rule!r}, "
          f"cov_update_every={defaults.cov_update_every}, "
          f"inv_update_every={defaults.inv_update_every}, "
          f"inverse_method={defaults.inverse_method!r}, "
          f"statistics_fraction={defaults.statistics_fraction}")
    rows = []
    for name in names:
        make_model, x, y, loss, label = PROBLEMS[name](args.batch_size, args.data_dir)
        print(f"measuring {label}, batch {args.batch_size} ...", flush=True)
        result = measure(make_model, x, y, loss, args.repeats, args.kfac_options)
        rows.append((name, result))
    header = "| model | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, result in rows:
        cells = [f"{result[c]:.2f}" if c == "ratio_kfac_to_adam" else f"{result[c]:.1f}"
                 for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\nMilliseconds per step (ratio unitless), batch", args.batch_size)
    print(table)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "step_cost.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out_dir, "step_cost.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model"] + COLUMNS)
        for name, result in rows:
            writer.writerow([name] + [f"{result[c]:.4f}" for c in COLUMNS])
    return rows


if __name__ == "__main__":
    main()
