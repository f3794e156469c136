"""MNIST CNN classifier benchmark: K-FAC against first-order baselines.

Run with::

    python -m benchmarks.mnist_cnn [--quick] [--optimizers kfac,adam]
        [--steps N] [--batch-size 250] [--data-dir DIR] [--out-dir DIR]
        [--no-grid] [--jit auto|on|off] [--targets 0.3,0.1] ...

Model (``make_cnn``), all ``relu`` except the output::

    Conv2D(16, 3x3, valid) -> MaxPooling2D(2) -> Conv2D(32, 3x3, valid)
    -> MaxPooling2D(2) -> Flatten (5*5*32 = 800) -> Dense(128) -> Dense(10)

The last layer (named ``logits``) outputs logits. The loss is
``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``, the mean
cross-entropy per image in nats. Weights use Keras' default initialisers.
K-FAC gives both convolutions KFC blocks and both Dense layers Kronecker
blocks. Muon gets ``exclude_layers=["logits"]``, so its orthogonalised
update acts on the hidden kernels (convolution kernels included).

Data. ``benchmarks.mnist_data.load_mnist`` (it prints its source) with the
labels. The images are split once by a fixed permutation (seed
``SPLIT_SEED``, independent of ``--seed``): 2,000 held-out test images and
the rest for training. On the 10,000-image MNIST test set (the data in
``../shared/data/mnist``) that is 8,000 training and 2,000 test images. With
fewer than 10,000 images, a fifth is held out.

Training. Every optimizer starts from the same weights and sees the same
batches (``--batch-size``, default 250, i.e. 32 steps per pass over the
8,000 training images) through ``harness.benchmark_optimizers``: the
learning-rate grids of ``optimizers.get_optimizer_specs`` (extended when the
best value is at an edge), K-FAC with its defaults. The table gives the
steps and seconds for the moving average of the training cross-entropy to
reach each target, and the **test accuracy**: the fraction of the 2,000
held-out images whose arg-max logit is the true label, after the final
training run.

K-FAC runs with its defaults unless ``--kfac-damping``, ``--kfac-grid`` or
``--lrs kfac=...`` say otherwise (the results list the choice).

Cost. The command prints each optimizer's median and mean step time and
the total wall time; docs/benchmarks.md lists measured runs. ``--quick``
(40 steps, two-point grids of 10-step runs, no XLA probe) is a smoke test.
"""

from __future__ import annotations

import sys

import keras
import numpy as np

from benchmarks import cli, harness, reports
from benchmarks.mnist_data import load_mnist

OUTPUT_LAYER = "logits"
NUM_CLASSES = 10
TEST_SIZE = 2000
SPLIT_SEED = 20150601
DEFAULT_STEPS = 600
QUICK_STEPS = 40
DEFAULT_BATCH_SIZE = 250
# Mean training cross-entropy (nats per image). Chosen so that the tuned
# baselines reach them within DEFAULT_STEPS on the 8,000 training images.
DEFAULT_TARGETS = (0.3, 0.1, 0.05, 0.02)
QUICK_TARGETS = (1.5, 0.8)


def make_cnn(input_shape=(28, 28, 1), num_classes=NUM_CLASSES):
    """The benchmark CNN (see the module docstring); outputs logits.

    Args:
        input_shape: tuple, image shape. Defaults to `(28, 28, 1)`.
        num_classes: int, number of logits. Defaults to 10.

    Returns:
        A built functional `keras.Model`.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    h = keras.layers.Conv2D(16, 3, activation="relu", name="conv1")(inputs)
    h = keras.layers.MaxPooling2D(2, name="pool1")(h)
    h = keras.layers.Conv2D(32, 3, activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(2, name="pool2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(128, activation="relu", name="hidden")(h)
    outputs = keras.layers.Dense(num_classes, name=OUTPUT_LAYER)(h)
    return keras.Model(inputs, outputs, name="mnist_cnn")


def train_test_split(num_examples, test_size=TEST_SIZE, seed=SPLIT_SEED):
    """A fixed split of ``range(num_examples)`` into training and test indices.

    Args:
        num_examples: int, size of the data set (at least 2).
        test_size: int, held-out examples. Defaults to 2000. If the data set
            has fewer than ``5 * test_size`` examples, a fifth is held out
            instead.
        seed: int, seed of the permutation. Defaults to `SPLIT_SEED`; the
            benchmark's ``--seed`` does not change the split.

    Returns:
        ``(train_indices, test_indices)``: disjoint sorted int64 arrays whose
        union is ``range(num_examples)``.
    """
    if not isinstance(num_examples, (int, np.integer)) or num_examples < 2:
        raise ValueError(f"`num_examples` must be an int >= 2; received {num_examples!r}.")
    if not isinstance(test_size, (int, np.integer)) or test_size < 1:
        raise ValueError(f"`test_size` must be a positive int; received {test_size!r}.")
    if num_examples < 5 * test_size:
        test_size = max(1, num_examples // 5)
    permutation = np.random.default_rng(seed).permutation(int(num_examples))
    return np.sort(permutation[test_size:]), np.sort(permutation[:test_size])


def classification_accuracy(model, x, y, batch_size=500):
    """Fraction of examples whose arg-max model output equals the label.

    Args:
        model: a Keras model returning one score (logit or probability) per
            class.
        x: numpy array of inputs.
        y: numpy array of integer labels, shape ``(N,)``.
        batch_size: int, prediction batch size. Defaults to 500.

    Returns:
        A Python float in [0, 1].
    """
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"`x` has {x.shape[0]} examples but `y` has {y.shape[0]}.")
    scores = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
    return float(np.mean(np.argmax(scores, axis=-1) == y))


def build_parser():
    p = cli.build_common_parser(
        "mnist_cnn", __doc__.split("\n\n")[0], default_steps=DEFAULT_STEPS,
        quick_steps=QUICK_STEPS)
    p.set_defaults(batch_size=DEFAULT_BATCH_SIZE)
    p.add_argument("--targets", default=None,
                   help="comma list of training cross-entropy targets in nats (default "
                        f"{','.join(f'{t:g}' for t in DEFAULT_TARGETS)}; "
                        f"{','.join(f'{t:g}' for t in QUICK_TARGETS)} with --quick)")
    return p


def main(argv=None):
    parser = build_parser()
    args, t_start, steps, grid_steps, jit = cli.start_race(
        parser, argv, default_steps=DEFAULT_STEPS, quick_steps=QUICK_STEPS)
    targets = cli.race_targets(parser, args, "--targets", DEFAULT_TARGETS, QUICK_TARGETS)

    x, y, source = load_mnist(args.data_dir, flatten=False)
    y = np.asarray(y).astype("int32")
    train_idx, test_idx = train_test_split(x.shape[0])
    x_train, y_train = x[train_idx], y[train_idx]
    x_test, y_test = x[test_idx], y[test_idx]
    print(f"data: {source}; {x_train.shape[0]} training and {x_test.shape[0]} held-out "
          f"test images (fixed split, seed {SPLIT_SEED})", flush=True)

    specs = cli.race_specs(args, OUTPUT_LAYER)
    if not specs:
        return 2

    def evaluate(model):
        accuracy = classification_accuracy(model, x_test, y_test)
        print(f"  test accuracy on {x_test.shape[0]} held-out images: {accuracy:.4f}",
              flush=True)
        return {"test_accuracy": accuracy}

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    bench = harness.benchmark_optimizers(
        specs, make_cnn, x_train, y_train, loss,
        steps=steps, batch_size=args.batch_size, seed=args.seed,
        grid=not args.no_grid, quick=args.quick, grid_steps=grid_steps,
        lr_overrides=args.lrs, jit=jit, smooth_window=args.smooth,
        warmup_steps=args.warmup, loss_unit=" nats", verbose=args.verbose,
        evaluate=evaluate)
    runs, grids = bench["runs"], bench["grids"]

    epochs = steps * args.batch_size / x_train.shape[0]
    notes = [
        f"data: {source}; {x_train.shape[0]} training images, {x_test.shape[0]} held-out "
        f"test images (fixed permutation, seed {SPLIT_SEED})",
        "model: Conv2D(16,3x3)-MaxPool(2)-Conv2D(32,3x3)-MaxPool(2)-Flatten(800)-"
        "Dense(128)-Dense(10), relu, logit output; "
        "loss: SparseCategoricalCrossentropy(from_logits=True), mean nats per image",
        f"batch size {args.batch_size}, {steps} steps ({epochs:.1f} passes over the "
        f"training images), seed {args.seed}; same initial weights and batch order for "
        "every optimizer",
        "test accuracy: arg-max of the logits vs the label on the held-out images, "
        "after the final training run",
        *cli.protocol_notes(args, grid_steps, jit, loss_name="training cross-entropy"),
    ]

    reports.finish_race(
        runs, grids, targets, args.out_dir, t_start, title="MNIST CNN classifier",
        loss_name="train CE", loss_label="training cross-entropy (nats)", notes=notes,
        extra_columns=[("test accuracy", reports.evaluation_column("test_accuracy"))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
