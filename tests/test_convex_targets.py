"""Issue 12's convex targets for `KFAC()` through `fit` (S5-convex).

Two full-batch problems on one Dense layer (the same as
`tools/step_efficiency/tasks.py`'s `issue_convex_data`):

* ill-conditioned least squares (feature scales `logspace(0, 2)`, condition
  number of `X^T X` about 1e4, MSE): the gap to the optimum must close to
  1e-3 of the initial gap within 10 steps;
* softmax regression with a finite optimum (labels drawn from a softmax
  model; initial loss 22.7 from Keras's initial weights at seed 0, optimal
  loss 0.926): the loss must come within 2% of the optimum within 30 steps.

The optima are computed in NumPy (normal equations; Newton's method with the
exact Hessian), and the losses after each step are recomputed in NumPy from
the layer's weights, so nothing here trusts the library's own numbers. A
K-FAC with exact expectations written in NumPy (no library code) solves
both well within the budgets, and so does the library's plain K-FAC update
at learning rate 1 with statistics and inverses every step: the targets are
reachable. The library's default (`step_rule="orthogonal"`, a fixed step
RMS of `0.2 lr`) is not: those tests are strict xfails until a default
closes them (issue 12), with the lead's blessing for session 5.
"""

import keras
import numpy as np
import pytest

import kfac_keras

EXAMPLES, FEATURES, CLASSES, OUTPUTS = 1000, 10, 5, 3


def convex_data(kind, seed=0):
    """`(x, y)` of the least-squares (`"lsq"`) or softmax (`"softmax"`) problem."""
    rng = np.random.default_rng(seed)
    if kind == "lsq":
        scales = np.logspace(0.0, 2.0, FEATURES)
        x = rng.standard_normal((EXAMPLES, FEATURES)) * scales
        w = rng.standard_normal((FEATURES, OUTPUTS)) / scales[:, None]
        y = x @ w + 0.1 * rng.standard_normal((EXAMPLES, OUTPUTS))
        return x.astype("float32"), y.astype("float32")
    scales = np.logspace(0.0, np.log10(34.0), FEATURES)
    x = (rng.standard_normal((EXAMPLES, FEATURES)) * scales).astype("float32")
    w = rng.standard_normal((FEATURES, CLASSES)) / scales[:, None] * 0.5
    b = rng.standard_normal(CLASSES) * 0.5
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.minimum((p.cumsum(1) < rng.random((EXAMPLES, 1))).sum(1), CLASSES - 1)
    return x, y.astype("int32")


def with_bias_column(x):
    return np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)


def softmax(z):
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def numpy_loss(kind, weights, x, y):
    """Keras's mean loss of the Dense layer `[kernel; bias] = weights`."""
    z = with_bias_column(x) @ weights
    if kind == "lsq":
        return float(np.mean((z - y) ** 2))
    return float(-np.mean(np.log(softmax(z)[np.arange(len(x)), y])))


def numpy_optimum(kind, x, y):
    """The optimal loss: normal equations, or Newton's method (exact Hessian)."""
    xb = with_bias_column(x)
    if kind == "lsq":
        w, *_ = np.linalg.lstsq(xb, y.astype(np.float64), rcond=None)
        return numpy_loss(kind, w, x, y)
    w = np.zeros((xb.shape[1], CLASSES))
    onehot = np.eye(CLASSES)[y]
    for _ in range(50):
        p = softmax(xb @ w)
        grad = (xb.T @ (p - onehot) / len(x)).ravel()
        per_example = p[:, :, None] * np.eye(CLASSES)[None] - p[:, :, None] * p[:, None, :]
        hessian = np.einsum("ni,nj,nab->iajb", xb, xb, per_example).reshape(
            grad.size, grad.size) / len(x)
        w -= np.linalg.solve(hessian + 1e-12 * np.eye(grad.size), grad).reshape(w.shape)
    return numpy_loss(kind, w, x, y)


def numpy_kfac_losses(kind, x, y, weights, steps, damping=1e-4):
    """Losses after each of `steps` K-FAC steps with exact expectations
    (`A = mean x~x~^T`, `G` = mean output Hessian, factored Tikhonov damping,
    learning rate 1, no momentum, no averaging)."""
    xb = with_bias_column(x)
    w = np.array(weights, np.float64)
    n, k = len(x), w.shape[1]
    losses = []
    for _ in range(steps):
        z = xb @ w
        if kind == "lsq":
            residual, g_factor = 2.0 * (z - y) / (n * k), 2.0 / k * np.eye(k)
        else:
            p = softmax(z)
            residual, g_factor = (p - np.eye(k)[y]) / n, (np.diag(p.sum(0)) - p.T @ p) / n
        a_factor = xb.T @ xb / n
        pi = np.sqrt(np.mean(np.diag(a_factor)) / np.mean(np.diag(g_factor)))
        root = np.sqrt(damping)
        step = np.linalg.solve(a_factor + pi * root * np.eye(len(a_factor)), np.linalg.solve(
            g_factor + root / pi * np.eye(k), (xb.T @ residual).T).T)
        w = w - step
        losses.append(numpy_loss(kind, w, x, y))
    return np.array(losses)


def make_model(kind):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    return keras.Model(inputs, keras.layers.Dense(OUTPUTS if kind == "lsq" else CLASSES)(inputs))


def initial_weights(model):
    kernel, bias = model.get_weights()
    return np.concatenate([kernel, bias[None]], axis=0).astype(np.float64)


def target(kind, initial_loss, optimum):
    """Least squares: the gap closed to 1e-3; softmax: within 2% of the optimum."""
    if kind == "lsq":
        return optimum + 1e-3 * (initial_loss - optimum)
    return 1.02 * optimum


class NumpyLossAfterEachStep(keras.callbacks.Callback):
    """Records `numpy_loss` of the layer's weights after every epoch (= step)."""

    def __init__(self, kind, x, y):
        super().__init__()
        self.kind, self.x, self.y, self.losses = kind, x, y, []

    def on_epoch_end(self, epoch, logs=None):
        self.losses.append(numpy_loss(self.kind, initial_weights(self.model), self.x, self.y))


def fit_losses(kind, optimizer, steps):
    """NumPy losses after each of `steps` full-batch `fit` steps, and the
    initial loss."""
    x, y = convex_data(kind)
    model = make_model(kind)
    initial = numpy_loss(kind, initial_weights(model), x, y)
    loss = (keras.losses.MeanSquaredError() if kind == "lsq"
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.compile(optimizer=optimizer, loss=loss)
    record = NumpyLossAfterEachStep(kind, x, y)
    model.fit(x, y, batch_size=EXAMPLES, epochs=steps, shuffle=False, verbose=0,
              callbacks=[kfac_keras.KFACCallback(), record])
    return np.array(record.losses), initial


def steps_to(losses, value):
    """1-based index of the first loss at or below `value`, or None."""
    hits = np.nonzero(losses <= value)[0]
    return int(hits[0]) + 1 if len(hits) else None


BUDGETS = {"lsq": 10, "softmax": 30}


@pytest.mark.parametrize("kind", ["lsq", "softmax"])
def test_problems_are_as_the_issue_states(kind):
    """Keras's initial loss, a finite optimum, and an exact NumPy K-FAC that
    reaches the target well inside the budget (issue: 2 steps, resp. 15)."""
    x, y = convex_data(kind)
    model = make_model(kind)
    weights = initial_weights(model)
    initial, optimum = numpy_loss(kind, weights, x, y), numpy_optimum(kind, x, y)
    if kind == "softmax":
        assert initial == pytest.approx(22.7, abs=0.1)
        assert 0.8 < optimum < 1.0  # labels are drawn: not separable
    losses = numpy_kfac_losses(kind, x, y, weights, BUDGETS[kind])
    reached = steps_to(losses, target(kind, initial, optimum))
    assert reached is not None and reached <= {"lsq": 2, "softmax": 21}[kind], (reached, losses)


@pytest.mark.parametrize("kind", ["lsq", "softmax"])
def test_plain_kfac_update_reaches_the_targets(kind):
    """The library's K-FAC machinery can meet the budgets: the plain update at
    learning rate 1, damping 1e-4, statistics and inverses every step, no
    averaging, no momentum (lsq: 3 steps, softmax: 15 measured)."""
    x, y = convex_data(kind)
    optimizer = kfac_keras.KFAC(
        step_rule="kl_clip", norm_constraint=None, learning_rate=1.0, momentum=0.0,
        damping=1e-4, adaptive=None, factor_decay=0.0, cov_update_every=1,
        inv_update_every=1, seed=0)
    losses, initial = fit_losses(kind, optimizer, BUDGETS[kind])
    reached = steps_to(losses, target(kind, initial, numpy_optimum(kind, x, y)))
    assert reached is not None and reached <= BUDGETS[kind], (reached, losses)


@pytest.mark.xfail(strict=True, reason="issue 12: the default orthogonal rule takes steps of "
                   "fixed RMS 0.2 lr (lr 1e-2), so it cannot travel to the optimum in 10/30 "
                   "steps (lsq: loss 5.1 after 30 steps, optimum 0.0097; softmax: 8.0 vs 0.926)")
@pytest.mark.parametrize("kind", ["lsq", "softmax"])
def test_kfac_defaults_reach_the_convex_targets(kind):
    x, y = convex_data(kind)
    losses, initial = fit_losses(kind, kfac_keras.KFAC(seed=0), BUDGETS[kind])
    reached = steps_to(losses, target(kind, initial, numpy_optimum(kind, x, y)))
    assert reached is not None and reached <= BUDGETS[kind], (reached, losses)
