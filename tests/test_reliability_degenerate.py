"""Degenerate curvature (issue 7, item 2).

Dead units, constant inputs, zero-variance features, rank-deficient factors,
an all-dead layer, and damping from 1e-8 to 1e3. One K-FAC step on a
4-5-3 network is compared with an independent float64 NumPy computation:
the empirical Fisher (`estimation_mode="empirical"`, so the factors are a
deterministic function of the batch) from a hand-written forward and
backward pass, `A = mean abar abar^T`, `G = mean g g^T`, and the damped
inverse by `np.linalg` (factored Tikhonov with the pi split, or the exact
`(A (x) G + damping I)^{-1}` for `eigh`). The step is read from the momentum
slot (momentum 0: `velocity = -lr * update`), which holds it without the
cancellation of `new_weight - old_weight`.

With damping far below float32 resolution (1e-8 on singular factors), float32
cannot reproduce the exact update in the factors' joint null space (round-off
of size 1e-7 is amplified by up to `1 / damping`). There the test checks what
is promised instead: finite values, a descent direction, agreement on the
well-determined subspace, and an error no larger than float32 round-off
amplified by the damped inverse's largest eigenvalue `1 / damping`:
`|step - exact| <= 30 eps32 lr |grad| / damping` (measured: at most 3x
`eps32 lr |grad| / damping` over several seeds, for `eigh`; Cholesky and
inverse stay below 0.5x).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from conftest import block_for_layer

LR = 0.1
CASES = ["normal", "dead_units", "all_dead", "constant_inputs", "zero_variance_feature",
         "rank_deficient"]
METHODS = ["cholesky", "inverse", "eigh"]
PI_FLOOR = 1e-12  # kfac_keras.linalg.pi_adjustment floors both traces here


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _data(case, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    if case == "constant_inputs":
        x[:] = x[0]
    elif case == "zero_variance_feature":
        x[:, 1] = 0.0
        x[:, 2] = 1.0  # collinear with the bias coordinate
    elif case == "rank_deficient":
        x, y = x[:2], y[:2]  # A is 5x5 of rank 2
    return x, y


def _model(case):
    keras.utils.set_random_seed(0)
    activation = "relu" if case in ("dead_units", "all_dead") else "tanh"
    inputs = keras.Input((4,))
    h = keras.layers.Dense(5, activation=activation, name="hidden")(inputs)
    out = keras.layers.Dense(3, name="out")(h)
    model = keras.Model(inputs, out)
    if case in ("dead_units", "all_dead"):
        bias = model.get_layer("hidden").bias.numpy()
        bias[: 3 if case == "dead_units" else 5] = -100.0  # never active
        model.get_layer("hidden").bias.assign(bias)
    return model


def _exact(case, x, y, weights):
    """Per layer `(A, G, V)` in float64: factors and the mean gradient."""
    k1, b1, k2, b2 = [w.astype(np.float64) for w in weights]
    x = x.astype(np.float64)
    count = len(x)
    s1 = x @ k1 + b1
    if case in ("dead_units", "all_dead"):
        h, dh = np.maximum(s1, 0.0), (s1 > 0).astype(np.float64)
    else:
        h, dh = np.tanh(s1), 1.0 - np.tanh(s1) ** 2
    g2 = _softmax(h @ k2 + b2) - np.eye(3)[y]  # d NLL_n / d logits
    g1 = (g2 @ k2.T) * dh
    layers = []
    for a, g in ((x, g1), (h, g2)):
        abar = np.concatenate([a, np.ones((count, 1))], axis=1)
        layers.append((abar.T @ abar / count, g.T @ g / count, abar.T @ g / count))
    return layers


def _exact_update(a, g, v, damping, method):
    if method == "eigh":
        flat = np.linalg.solve(np.kron(a, g) + damping * np.eye(len(a) * len(g)),
                               v.reshape(-1))
        return -LR * flat.reshape(v.shape)
    pi = np.sqrt(max(np.trace(a) / len(a), PI_FLOOR) / max(np.trace(g) / len(g), PI_FLOOR))
    gamma = np.sqrt(damping)
    return -LR * np.linalg.solve(a + pi * gamma * np.eye(len(a)), v) @ np.linalg.inv(
        g + gamma / pi * np.eye(len(g)))


def _one_step(case, damping, method):
    x, y = _data(case)
    model = _model(case)
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, step_rule="kl_clip", 
        learning_rate=LR, momentum=0.0, damping=damping, inverse_method=method,
        cov_update_every=1, inv_update_every=1, estimation_mode="empirical", seed=1)
    step = kfac_keras.make_train_step(
        model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    weights = [v.numpy() for v in model.trainable_variables]
    step(x, y)
    for variable in model.variables + optimizer.variables:
        assert np.isfinite(variable.numpy()).all(), variable.path
    assert int(optimizer.skipped_steps.numpy()) == 0
    velocities = [v.numpy().astype(np.float64) for v in optimizer.velocities]
    steps = [np.concatenate([velocities[2 * i], velocities[2 * i + 1][None]], axis=0)
             for i in range(2)]
    return steps, _exact(case, x, y, weights), optimizer


def _range_basis(matrix, relative=1e-4):
    values, vectors = np.linalg.eigh(matrix)
    return vectors[:, values > relative * values.max()]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("damping", [1e-3, 1e3])
@pytest.mark.parametrize("case", CASES)
def test_degenerate_curvature_matches_float64(case, damping, method):
    steps, layers, _ = _one_step(case, damping, method)
    for got, (a, g, v) in zip(steps, layers):
        expected = _exact_update(a, g, v, damping, method)
        scale = np.linalg.norm(expected)
        assert np.linalg.norm(got - expected) <= 2e-3 * scale + 1e-9, (
            np.linalg.norm(got - expected), scale)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_tiny_damping_gives_finite_descent_steps(case, method):
    damping = 1e-8
    steps, layers, optimizer = _one_step(case, damping, method)
    # No decomposition failed: the damping was not raised by the guard.
    assert float(optimizer.damping.numpy()) == pytest.approx(damping)
    for got, (a, g, v) in zip(steps, layers):
        expected = _exact_update(a, g, v, damping, method)
        if not np.any(v):  # all-dead layer: zero gradient, zero step
            np.testing.assert_array_equal(got, 0.0)
            continue
        assert np.sum(got * v) < 0.0  # a descent direction
        roundoff = np.finfo(np.float32).eps * LR * np.linalg.norm(v) / damping
        assert np.linalg.norm(got - expected) <= 30.0 * roundoff
        pa, pg = _range_basis(a), _range_basis(g)
        got_range, expected_range = pa.T @ got @ pg, pa.T @ expected @ pg
        assert np.linalg.norm(got_range - expected_range) <= 1e-2 * np.linalg.norm(
            expected_range)


def _block(method, damping=1e-3):
    model = _model("normal")
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, step_rule="kl_clip", learning_rate=LR, damping=damping, inverse_method=method,
                                cov_update_every=1, inv_update_every=1, seed=1)
    kfac_keras.make_train_step(model, optimizer, "sparse_categorical_crossentropy")
    return optimizer, block_for_layer(optimizer, model.get_layer("hidden"))


def test_eigenvalues_are_clipped_at_zero():
    """A factor with a small negative eigenvalue (as round-off produces):
    the stored eigenvalues are `max(eig, 0)`, and the step stays finite."""
    optimizer, block = _block("eigh", damping=1e-8)
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    eigenvalues = np.array([2.0, 1.0, -1e-3, 0.0, 0.0])
    block.input_factor.assign((q * eigenvalues) @ q.T)
    optimizer.update_inverses()
    stored = np.sort(block.input_eigenvalues.numpy())
    assert stored.min() >= 0.0
    np.testing.assert_allclose(stored, np.sort(np.maximum(eigenvalues, 0.0)), atol=1e-6)
    update = block.multiply_damped_inverse(
        [tf.ones((4, 5)), tf.ones((5,))], optimizer.total_damping())
    assert all(np.isfinite(u.numpy()).all() for u in update)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("damping", [1e-8, 1e3])
def test_zero_factors_are_damped_not_inverted(method, damping):
    """Exactly singular (zero) factors: the damped inverse exists and equals
    the NumPy value; nothing singular is inverted."""
    optimizer, block = _block(method, damping)
    block.input_factor.assign(np.zeros((5, 5), "float32"))
    block.output_grad_factor.assign(np.zeros((5, 5), "float32"))
    optimizer.update_inverses()
    assert float(optimizer.damping.numpy()) == pytest.approx(damping)  # no failure
    grads = [np.full((4, 5), 0.5, "float32"), np.full((5,), -0.5, "float32")]
    update = block.multiply_damped_inverse([tf.constant(g) for g in grads],
                                           optimizer.total_damping())
    v = np.concatenate([grads[0], grads[1][None]], axis=0).astype(np.float64)
    got = np.concatenate([update[0].numpy(), update[1].numpy()[None]], axis=0)
    # pi = 1 (both traces floored); factored or exact damping of zero factors
    # both give v / damping.
    np.testing.assert_allclose(got, v / damping, rtol=1e-5)
