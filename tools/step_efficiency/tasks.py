"""The benchmark tasks of the step-efficiency experiments (issue 12).

Each task builds the same model, data stream and loss for every optimizer, so
that steps-to-target compare step rules and nothing else:

* `autoencoder`: the paper's 784-1000-500-250-30-250-500-1000-784 autoencoder
  (tanh hidden units, linear code, logit output), batch 1000 of the 10,000
  MNIST test images; loss reported as summed Bernoulli cross-entropy per image
  (784 x Keras's mean BCE), in nats.
* `cnn`: the MNIST CNN of `kfac_keras.examples.mnist_cnn` (8,000 training
  images of the same fixed split, batch 250), mean softmax cross-entropy.
* `lm`: a 2-layer causal transformer on sequences of a fixed random order-2
  Markov chain (`MarkovChain`), whose conditional entropy is the exact floor.
* `mlp`: 784-512-512-10 ReLU classifier, batch 500 of the 8,000 images.
* `lsq` and `softmax`: convex checks (one Dense layer, full batch) with
  their optima computed independently (`convex_optimum`). `softmax` is nearly
  separable (even exact K-FAC sits at 2.3x its optimum after 30 steps).
* `lsq_issue` and `softmax_issue`: the convex problems of issue 12 (S5-convex,
  `issue_convex_data`): ill-conditioned least squares that an exact K-FAC at
  learning rate 1 solves in 1-2 steps, and a softmax regression with a finite,
  well-defined optimum (labels drawn from a softmax model, loss 0.926 at the
  optimum) whose initial loss from Keras's initial weights (seed 0) is 22.7;
  the NumPy K-FAC with exact expectations (`numpy_kfac_curve`) reaches 1% of
  the optimum in 3 steps from zero weights, 16 from Keras's, and stalls with
  factor averaging 0.95. Their steps-to-target are counted on the raw loss
  (`Task.smooth = 1`: full batch, no noise to average).

MNIST is read from IDX files (`read_idx`) in `$KFAC_KERAS_DATA_DIR`.
"""

import gzip
import math
import os
import struct
import sys

import numpy as np

# The LM task's chain and model live in benchmarks/markov_lm.py (one copy). The
# repository root is on sys.path only for this import, so `kfac_keras` still
# comes from wherever it came from before.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.markov_lm import MarkovChain, make_transformer_lm  # noqa: E402
del sys.path[0]

PIXELS = 784
AUTOENCODER_SIZES = (1000, 500, 250, 30, 250, 500, 1000)
CNN_SPLIT_SEED = 20150601  # kfac_keras.examples.mnist_cnn.SPLIT_SEED
CNN_TEST_SIZE = 2000


def read_idx(path):
    """Reads an IDX file (optionally gzipped) into a NumPy array.

    Args:
        path: str, the file (`*-idx3-ubyte[.gz]` or `*-idx1-ubyte[.gz]`).

    Returns:
        A uint8/int/float array with the shape stored in the header.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, rank = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise ValueError(f"{path} is not an IDX file (magic {data[:4]!r}).")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{dtype_code:02x}.")
    shape = struct.unpack(">" + "I" * rank, data[4:4 + 4 * rank])
    array = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * rank)
    return array.reshape(shape)


def _find(directory, stem):
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no {stem}[.gz] in {directory}; set KFAC_KERAS_DATA_DIR.")


def load_mnist(directory=None):
    """The 10,000 MNIST test images in [0, 1] (float32, `(N, 784)`) and labels."""
    directory = directory or os.environ.get("KFAC_KERAS_DATA_DIR", "")
    images = read_idx(_find(directory, "t10k-images-idx3-ubyte"))
    labels = read_idx(_find(directory, "t10k-labels-idx1-ubyte"))
    x = images.reshape(images.shape[0], -1).astype("float32") / 255.0
    return x, labels.astype("int32")


def cnn_train_indices(num_examples):
    """Training indices of the CNN benchmark's fixed split (same permutation)."""
    permutation = np.random.default_rng(CNN_SPLIT_SEED).permutation(num_examples)
    return np.sort(permutation[CNN_TEST_SIZE:])


class Task:
    """Model factory, loss, batch stream and targets of one benchmark.

    Attributes:
        name: str.
        make_model: callable returning a fresh model (call after seeding).
        loss: Keras loss object.
        batches: list of `(x, y)` NumPy batches, one per step (the same for
            every optimizer).
        loss_scale: float, factor from Keras's loss to the reported unit.
        targets: tuple of reported-unit targets (steps to each are counted on
            the 10-step moving average).
        output_layer: name of the output layer (excluded from Muon).
        floor: reported-unit optimum, or None.
        unit: str, the reported unit.
        gap_fraction: float or None; if set, one more target is added at run
            time: `floor + gap_fraction * (first loss - floor)`.
        smooth: int, length of the trailing mean the targets are counted on
            (1: the raw loss, for the deterministic full-batch tasks).
    """

    def __init__(self, name, make_model, loss, batches, loss_scale, targets,
                 output_layer, floor=None, unit="", gap_fraction=None, smooth=10):
        self.smooth = int(smooth)
        self.name, self.make_model, self.loss, self.batches = name, make_model, loss, batches
        self.loss_scale, self.targets, self.output_layer = loss_scale, targets, output_layer
        self.floor, self.unit, self.gap_fraction = floor, unit, gap_fraction


def _epoch_batches(num, batch_size, steps, seed):
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(num) for _ in range(
        math.ceil(steps * batch_size / num) + 1)])
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def autoencoder_task(steps, seed=0, loss_reduction="sum_over_batch_size"):
    import keras

    x, _ = load_mnist()

    def make_model():
        inputs = keras.Input((PIXELS,))
        h = inputs
        for i, units in enumerate(AUTOENCODER_SIZES):
            h = keras.layers.Dense(units, activation=None if units == 30 else "tanh",
                                   name="code" if units == 30 else f"dense_{i}")(h)
        return keras.Model(inputs, keras.layers.Dense(PIXELS, name="output_logits")(h))

    batches = [(x[i], x[i]) for i in _epoch_batches(len(x), 1000, steps, seed)]
    scale = PIXELS if loss_reduction == "sum_over_batch_size" else PIXELS / 1000.0
    loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=loss_reduction)
    return Task("autoencoder", make_model, loss, batches, scale, (120.0, 100.0, 80.0),
                "output_logits", unit="nats")


def cnn_task(steps, seed=0):
    import keras

    x, y = load_mnist()
    train = cnn_train_indices(len(x))
    x, y = x[train].reshape(-1, 28, 28, 1), y[train]

    def make_model():
        inputs = keras.Input((28, 28, 1))
        h = keras.layers.Conv2D(16, 3, activation="relu", name="conv1")(inputs)
        h = keras.layers.MaxPooling2D(2)(h)
        h = keras.layers.Conv2D(32, 3, activation="relu", name="conv2")(h)
        h = keras.layers.MaxPooling2D(2)(h)
        h = keras.layers.Flatten()(h)
        h = keras.layers.Dense(128, activation="relu", name="hidden")(h)
        return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))

    batches = [(x[i], y[i]) for i in _epoch_batches(len(x), 250, steps, seed)]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return Task("cnn", make_model, loss, batches, 1.0, (0.1, 0.05, 0.02), "logits", unit="CE")


def mlp_task(steps, seed=0):
    import keras

    x, y = load_mnist()
    train = cnn_train_indices(len(x))
    x, y = x[train], y[train]

    def make_model():
        inputs = keras.Input((PIXELS,))
        h = keras.layers.Dense(512, activation="relu", name="hidden1")(inputs)
        h = keras.layers.Dense(512, activation="relu", name="hidden2")(h)
        return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))

    batches = [(x[i], y[i]) for i in _epoch_batches(len(x), 500, steps, seed)]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return Task("mlp", make_model, loss, batches, 1.0, (0.1, 0.03), "logits", unit="CE")


def lm_task(steps, seed=0, vocab=32, length=32, d_model=64, batch_size=64, layers=2,
            heads=4):
    import keras

    chain = MarkovChain(vocab=vocab, seed=1)
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        seqs = chain.sample(batch_size, length, rng)
        batches.append((seqs[:, :-1], seqs[:, 1:]))

    def make_model():
        return make_transformer_lm(vocab, length, d_model, layers, heads)

    floor = chain.floor(length)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return Task("lm", make_model, loss, batches, 1.0, (floor + 0.5, floor + 0.2, floor + 0.1),
                "logits", floor=floor, unit="nats/token")


def convex_data(kind, seed=0):
    """Ill-conditioned least squares or softmax regression data (full batch)."""
    rng = np.random.default_rng(seed)
    n, d = 512, 20
    scales = np.logspace(-1, 1, d)  # condition number of X^T X: about 1e4
    x = (rng.standard_normal((n, d)) * scales).astype("float32")
    if kind == "lsq":
        w = rng.standard_normal((d, 3))
        y = (x @ (w / scales[:, None]) + 0.1 * rng.standard_normal((n, 3))).astype("float32")
        return x, y
    w = rng.standard_normal((d, 5)) / scales[:, None] * 2.0
    logits = x @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p], dtype="int32")
    return x, y


def convex_optimum(kind, x, y):
    """The optimal Keras loss, computed independently in NumPy (float64).

    Least squares: normal equations with an intercept; softmax regression:
    Newton's method on the mean cross-entropy with an intercept.
    """
    xb = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
    if kind == "lsq":
        w, *_ = np.linalg.lstsq(xb, y.astype(np.float64), rcond=None)
        return float(np.mean((xb @ w - y) ** 2))
    k, d = int(y.max()) + 1, xb.shape[1]
    onehot = np.eye(k)[y]
    w = np.zeros((d, k))
    for _ in range(100):
        z = xb @ w
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        grad = (xb.T @ (p - onehot) / len(x)).ravel()
        hess = np.zeros((d * k, d * k))
        for n in range(len(x)):
            h = np.diag(p[n]) - np.outer(p[n], p[n])
            hess += np.kron(np.outer(xb[n], xb[n]), h)
        hess /= len(x)
        step = np.linalg.solve(hess + 1e-10 * np.eye(d * k), grad)
        w -= step.reshape(d, k)
        if np.abs(step).max() < 1e-12:
            break
    z = xb @ w
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(x)), y]))


def convex_task(kind, steps, seed=0, loss_multiplier_sum=False):
    """Full-batch least squares (`"lsq"`) or softmax regression (`"softmax"`);
    `loss_multiplier_sum` uses the `"sum"` reduction (the loss times the batch)."""
    import keras

    x, y = convex_data(kind, seed)
    optimum = convex_optimum(kind, x, y)
    out = y.shape[1] if kind == "lsq" else 5

    def make_model():
        inputs = keras.Input((x.shape[1],))
        return keras.Model(inputs, keras.layers.Dense(out, name="out")(inputs))

    reduction = "sum" if loss_multiplier_sum else "sum_over_batch_size"
    if kind == "lsq":
        loss = keras.losses.MeanSquaredError(reduction=reduction)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    scale = 1.0 / len(x) if loss_multiplier_sum else 1.0
    # Least squares: the gap to the optimum closed to 1e-3 of the initial gap
    # (added at run time); softmax regression: within 2% of the optimal loss.
    targets = () if kind == "lsq" else (optimum * 1.02,)
    return Task(kind, make_model, loss, [(x, y)] * steps, scale, targets, "out",
                floor=optimum, unit="loss", gap_fraction=1e-3 if kind == "lsq" else None)


#: `issue_convex_data` shapes: examples, features, classes (softmax) or
#: outputs (least squares).
ISSUE_EXAMPLES, ISSUE_FEATURES, ISSUE_CLASSES, ISSUE_OUTPUTS = 1000, 10, 5, 3
#: Largest feature scale of the softmax problem: with Keras's glorot-uniform
#: kernel (seed 0) the initial logits are large enough for a loss of 22.7
#: (the issue's 22.8); the smallest scale is 1.
ISSUE_SOFTMAX_TOP_SCALE = 34.0
#: Scale of the label model's logits: the optimum is finite (labels are drawn,
#: not separable) with loss 0.926.
ISSUE_SOFTMAX_TEMPERATURE = 0.5


def issue_convex_data(kind, seed=0):
    """The convex problems of issue 12 (full batch, float32).

    `"lsq"`: features with scales `logspace(0, 2)` (condition number of
    `X^T X` about 1e4), targets a random linear map of them plus noise 0.1.
    `"softmax"`: features with scales `logspace(0, log10(34))`, labels drawn
    from a softmax model with logits `x W + b` (`W` ~ N(0, 0.5^2) / scale,
    `b` ~ N(0, 0.5^2)), so the optimum is finite (every class has a
    positive probability at every point).

    Args:
        kind: `"lsq"` or `"softmax"`.
        seed: int, NumPy seed. Defaults to 0.

    Returns:
        `(x, y)`: `(N, D)` float32 features and `(N, 3)` float32 targets
        resp. `(N,)` int32 labels.
    """
    rng = np.random.default_rng(seed)
    n, d = ISSUE_EXAMPLES, ISSUE_FEATURES
    if kind == "lsq":
        scales = np.logspace(0.0, 2.0, d)
        x = rng.standard_normal((n, d)) * scales
        w = rng.standard_normal((d, ISSUE_OUTPUTS)) / scales[:, None]
        y = x @ w + 0.1 * rng.standard_normal((n, ISSUE_OUTPUTS))
        return x.astype("float32"), y.astype("float32")
    if kind != "softmax":
        raise ValueError(f"kind must be 'lsq' or 'softmax'; received {kind!r}.")
    k = ISSUE_CLASSES
    scales = np.logspace(0.0, np.log10(ISSUE_SOFTMAX_TOP_SCALE), d)
    x = (rng.standard_normal((n, d)) * scales).astype("float32")
    w = rng.standard_normal((d, k)) / scales[:, None] * ISSUE_SOFTMAX_TEMPERATURE
    b = rng.standard_normal(k) * 0.5
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.minimum((p.cumsum(1) < rng.random((n, 1))).sum(1), k - 1)
    return x, y.astype("int32")


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def numpy_loss(kind, weights, x, y):
    """Keras's mean loss (MSE averaged over outputs, or softmax cross-entropy)
    of a Dense layer with `weights = [kernel; bias]` (float64)."""
    xb = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
    z = xb @ weights
    if kind == "lsq":
        return float(np.mean((z - y) ** 2))
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(x)), y]))


def numpy_kfac_curve(kind, x, y, weights, steps, damping=1e-4, factor_decay=0.0,
                     learning_rate=1.0):
    """Losses of a dense NumPy K-FAC with exact expectations on one Dense layer.

    Factors `A = mean(x~ x~^T)` (`x~ = [x; 1]`) and `G = mean(H_out)` with the
    exact output Hessian of Keras's loss (`2/k I` for MSE over k outputs,
    `diag(p) - p p^T` for softmax cross-entropy), recomputed every step and
    averaged as `F <- decay F + (1 - decay) F_new`; the step is
    `-lr (G + sqrt(damping) / pi I)^{-1} grad (A + pi sqrt(damping) I)^{-1}`
    (the factored Tikhonov split of the library, `pi = sqrt(mean diag(A) /
    mean diag(G))`), no momentum.

    Args:
        kind: `"lsq"` or `"softmax"`.
        x, y: the data (`issue_convex_data`).
        weights: `(D + 1, k)` initial `[kernel; bias]`.
        steps: int, number of steps.
        damping: float. Defaults to 1e-4.
        factor_decay: float in [0, 1). Defaults to 0 (no averaging).
        learning_rate: float. Defaults to 1.

    Returns:
        `(steps + 1,)` float64 losses, the first at `weights`.
    """
    xb = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
    w = np.array(weights, np.float64)
    n, k = len(x), w.shape[1]
    losses = [numpy_loss(kind, w, x, y)]
    a_avg = g_avg = None
    for _ in range(steps):
        z = xb @ w
        if kind == "lsq":
            residual = 2.0 * (z - y) / (n * k)  # d loss / d z
            g_new = 2.0 / k * np.eye(k)
        else:
            p = _softmax(z)
            residual = (p - np.eye(k)[y]) / n
            g_new = (np.diag(p.sum(0)) - p.T @ p) / n
        a_new = xb.T @ xb / n
        a_avg = a_new if a_avg is None else factor_decay * a_avg + (1 - factor_decay) * a_new
        g_avg = g_new if g_avg is None else factor_decay * g_avg + (1 - factor_decay) * g_new
        grad = xb.T @ residual
        pi = np.sqrt(np.mean(np.diag(a_avg)) / np.mean(np.diag(g_avg)))
        shift = np.sqrt(damping)
        step = np.linalg.solve(a_avg + pi * shift * np.eye(len(a_avg)),
                               np.linalg.solve(g_avg + shift / pi * np.eye(k), grad.T).T)
        w = w - learning_rate * step
        losses.append(numpy_loss(kind, w, x, y))
    return np.array(losses)


def issue_convex_task(kind, steps, seed=0):
    """Issue 12's least squares (`"lsq"`, target: the gap closed to 1e-3 of
    the initial gap) or softmax regression (`"softmax"`, target: within 2% of
    the optimal loss), full batch, Keras's initial weights, raw-loss targets."""
    import keras

    x, y = issue_convex_data(kind, seed)
    optimum = convex_optimum(kind, x, y)
    out = ISSUE_OUTPUTS if kind == "lsq" else ISSUE_CLASSES

    def make_model():
        inputs = keras.Input((x.shape[1],))
        return keras.Model(inputs, keras.layers.Dense(out, name="out")(inputs))

    if kind == "lsq":
        loss = keras.losses.MeanSquaredError()
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    targets = () if kind == "lsq" else (optimum * 1.02,)
    return Task(kind + "_issue", make_model, loss, [(x, y)] * steps, 1.0, targets, "out",
                floor=optimum, unit="loss", gap_fraction=1e-3 if kind == "lsq" else None,
                smooth=1)


TASKS = {"autoencoder": autoencoder_task, "cnn": cnn_task, "lm": lm_task, "mlp": mlp_task,
         "lsq": lambda steps, seed=0: convex_task("lsq", steps, seed),
         "softmax": lambda steps, seed=0: convex_task("softmax", steps, seed),
         "lsq_issue": lambda steps, seed=0: issue_convex_task("lsq", steps, seed),
         "softmax_issue": lambda steps, seed=0: issue_convex_task("softmax", steps, seed),
         "lsq_sum": lambda steps, seed=0: convex_task("lsq", steps, seed, True),
         "softmax_sum": lambda steps, seed=0: convex_task("softmax", steps, seed, True),
         # The same autoencoder with the loss summed over the batch (1000x).
         "autoencoder_sum": lambda steps, seed=0: autoencoder_task(steps, seed, "sum")}
