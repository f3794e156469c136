"""The applied update against NumPy formulas, and K-FAC as Newton's method."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from conftest import block_for_layer


def _model():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
    out = keras.layers.Dense(3, name="out")(h)
    return keras.Model(inputs, out)


def _raw_gradients(model, loss_fn, x, y):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x))
    return [g.numpy().astype(np.float64)
            for g in tape.gradient(loss, model.trainable_variables)]


def _augmented(kernel, bias):
    return np.concatenate([kernel, bias[None, :]], axis=0)


@pytest.mark.parametrize("method", ["cholesky", "inverse", "eigh"])
@pytest.mark.parametrize("l2_reg", [0.0, 0.01])
def test_update_matches_numpy(method, l2_reg):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    model = _model()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    lr, damping = 0.3, 0.05
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, step_rule="kl_clip", learning_rate=lr, momentum=0.0, damping=damping,
                                l2_reg=l2_reg, inverse_method=method,
                                cov_update_every=1, inv_update_every=1, seed=5)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    grads = _raw_gradients(model, loss, x, y)
    step(x, y)
    after = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    for index, layer in enumerate(model.layers[1:]):
        block = block_for_layer(optimizer, layer)
        a = block.input_factor.numpy().astype(np.float64)
        g = block.output_grad_factor.numpy().astype(np.float64)
        k, b = 2 * index, 2 * index + 1
        v = _augmented(grads[k] + l2_reg * before[k], grads[b] + l2_reg * before[b])
        total = damping + l2_reg
        if method == "eigh":
            flat = np.linalg.solve(np.kron(a, g) + total * np.eye(a.shape[0] * g.shape[0]),
                                   v.reshape(-1))
            expected = -lr * flat.reshape(v.shape)
        else:
            pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
            gamma = np.sqrt(total)
            expected = -lr * (np.linalg.inv(a + pi * gamma * np.eye(len(a))) @ v
                              @ np.linalg.inv(g + gamma / pi * np.eye(len(g))))
        got = _augmented(after[k] - before[k], after[b] - before[b])
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-6)


def test_momentum_accumulates_preconditioned_steps():
    """Second step = momentum * first step + the new preconditioned step."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    options = dict(learning_rate=0.1, damping=0.1, cov_update_every=100,
                   inv_update_every=100, seed=2)
    model = _model()
    opt = kfac_keras.KFAC(adaptive=None, norm_constraint=None, step_rule="kl_clip", momentum=0.5, **options)
    step = kfac_keras.make_train_step(model, opt, loss)
    w0 = model.layers[1].kernel.numpy()
    step(x, y)
    w1 = model.layers[1].kernel.numpy()
    # The same second step without momentum, from the same state: rebuild.
    block = block_for_layer(opt, model.layers[1])
    inv_a = block.input_factor_inverse.numpy()
    inv_g = block.output_grad_factor_inverse.numpy()
    grads = _raw_gradients(model, loss, x, y)
    step(x, y)
    w2 = model.layers[1].kernel.numpy()
    pre = (inv_a @ _augmented(grads[0], grads[1]) @ inv_g)[:-1]
    np.testing.assert_allclose(w2 - w1, 0.5 * (w1 - w0) - 0.1 * pre, rtol=2e-3, atol=1e-6)


def test_newton_on_ill_conditioned_least_squares():
    """One Dense layer + squared error: K-FAC with lr=1 is Newton's method.

    The Gaussian Fisher's output factor is estimated from sampled targets
    (a few percent of Monte-Carlo error with 4000 examples), so each step
    shrinks the gap to the optimum by about that error; 3 steps give well over
    1000x. SGD at step 1/L (L the largest Hessian eigenvalue) on the same
    problem (condition number 1e4) does not get 10x.
    """
    rng = np.random.default_rng(2)
    n, d = 4000, 6
    scales = np.logspace(0, -2, d)
    x = (rng.normal(size=(n, d)) * scales).astype("float32")
    w_true = rng.normal(size=(d, 1))
    y = (x @ w_true + 0.5 * rng.normal(size=(n, 1))).astype("float32")
    design = np.concatenate([x, np.ones((n, 1))], axis=1).astype(np.float64)
    w_opt = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)[0]

    def objective(weights):
        return np.mean((design @ weights - y) ** 2)

    def make():
        model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1)])
        model.layers[0].kernel.assign(np.zeros((d, 1)))
        return model

    def weights(model):
        layer = model.layers[0]
        return _augmented(layer.kernel.numpy(), layer.bias.numpy()).astype(np.float64)

    best = objective(w_opt)
    model = make()
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, step_rule="kl_clip", learning_rate=1.0, momentum=0.0, damping=1e-8,
                                cov_update_every=1, inv_update_every=1, seed=0)
    step = kfac_keras.make_train_step(model, optimizer, "mse")
    gap0 = objective(weights(model)) - best
    for _ in range(3):
        step(x, y)
    assert (objective(weights(model)) - best) < gap0 / 1000

    hessian = 2 * design.T @ design / n
    lr = 1.0 / np.linalg.eigvalsh(hessian).max()
    sgd_model = make()
    sgd_model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss="mse")
    sgd_model.fit(x, y, batch_size=n, epochs=3, verbose=0, shuffle=False)
    assert (objective(weights(sgd_model)) - best) > gap0 / 10


def _softmax_regression_optimum(design, labels, classes, l2=1e-4):
    """Newton's method in NumPy on the (lightly L2-regularized) softmax loss."""
    n, d = design.shape
    w = np.zeros((d, classes))
    onehot = np.eye(classes)[labels]

    def loss(w):
        z = design @ w
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -np.mean(np.sum(onehot * logp, 1)) + 0.5 * l2 * np.sum(w ** 2)

    for _ in range(50):
        z = design @ w
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = design.T @ (p - onehot) / n + l2 * w
        hess = np.zeros((d * classes, d * classes))
        for i in range(n):
            h_out = np.diag(p[i]) - np.outer(p[i], p[i])
            hess += np.kron(np.outer(design[i], design[i]), h_out) / n
        hess += l2 * np.eye(d * classes)
        w = w - np.linalg.solve(hess, grad.reshape(-1)).reshape(d, classes)
    return loss(w), loss


def test_softmax_regression_within_one_percent_in_20_steps():
    rng = np.random.default_rng(3)
    n, d, classes = 600, 5, 3
    x = rng.normal(size=(n, d)).astype("float32")
    logits = x @ rng.normal(size=(d, classes)) * 1.5
    labels = np.array([rng.choice(classes, p=np.exp(l) / np.exp(l).sum()) for l in logits])
    design = np.concatenate([x, np.ones((n, 1))], axis=1).astype(np.float64)
    best, _ = _softmax_regression_optimum(design, labels, classes)
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(classes)])
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, step_rule="kl_clip", learning_rate=1.0, momentum=0.0, damping=1e-4,
                                cov_update_every=1, inv_update_every=1, seed=4)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, labels, batch_size=n, epochs=20, verbose=0, shuffle=False,
              callbacks=[kfac_keras.KFACCallback(verbose=0)])
    final = model.evaluate(x, labels, batch_size=n, verbose=0)
    assert final <= best * 1.01, (final, best)
