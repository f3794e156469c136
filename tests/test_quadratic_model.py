"""Quadratic model (paper section 7) against a dense exact Fisher.

Oracles (float64 NumPy):

* The exact mini-batch Fisher of the objective `mean_n c_n NLL_n`, built
  densely. For the categorical and Bernoulli losses by *enumerating outputs*:
  `F = mean_n c_n sum_y p(y|x_n) grad log p(y|x_n) grad log p(y|x_n)^T`, one
  `tf.GradientTape` per (example, outcome). For squared error from per-example
  Jacobians (tapes) and the analytic output Fisher `2 I` (NLL `||y - f||^2`,
  `c_n = 1/d`). `u^T F v` from the code's forward-mode products must match to
  1e-4 relative.
* `alpha`, `mu` must solve the 2x2 system built from that dense Fisher, the
  dense `Fhat^{-1}` of the `"eigh"` blocks (`(A (x) G + lambda I)^{-1}` from the
  code's factors), the gradient from a tape and the previous update read off
  the weights (1e-3 relative: float32 products against float64).
"""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from kfac_keras import losses as losses_lib
from kfac_keras import quadratic_model
from kfac_keras import step_rules
from conftest import block_for_layer


def _flat(tensors):
    return np.concatenate([np.asarray(t, np.float64).reshape(-1) for t in tensors])


def _unflat(vector, variables):
    out, position = [], 0
    for v in variables:
        size = int(np.prod(v.shape))
        out.append(vector[position:position + size].reshape(v.shape).astype("float32"))
        position += size
    return out


def _model(outputs, final_activation=None, batch_norm=False):
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="hidden")(inputs)
    if batch_norm:
        h = keras.layers.BatchNormalization(name="bn")(h)
    out = keras.layers.Dense(outputs, activation=final_activation, name="out")(h)
    return keras.Model(inputs, out)


def _exact_fisher(model, x, kind, sample_weight=None):
    """Dense exact Fisher of the Keras objective (see module docstring)."""
    params = model.trainable_variables
    weights = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    total = None
    for n in range(len(x)):
        xn = x[n:n + 1]
        term = 0.0
        if kind in ("softmax_logits", "softmax_probs"):
            probs = None
            classes = model(xn).shape[-1]
            for k in range(classes):
                with tf.GradientTape() as tape:
                    out = tf.cast(model(xn), tf.float64)
                    if kind == "softmax_logits":
                        logq = tf.nn.log_softmax(out)[0]
                    else:
                        logq = tf.math.log(out[0] / tf.reduce_sum(out[0]))
                    log_k = logq[k]
                g = _flat(tape.gradient(log_k, params))
                probs = np.exp(logq.numpy())
                term = term + probs[k] * np.outer(g, g)
            scale = 1.0
        elif kind in ("sigmoid_logits", "sigmoid_probs"):
            d = model(xn).shape[-1]
            for outcome in itertools.product([0.0, 1.0], repeat=d):
                target = tf.constant([outcome], tf.float64)
                with tf.GradientTape() as tape:
                    out = tf.cast(model(xn), tf.float64)
                    p = tf.sigmoid(out) if kind == "sigmoid_logits" else out
                    logp = tf.reduce_sum(target * tf.math.log(p)
                                         + (1 - target) * tf.math.log(1 - p))
                g = _flat(tape.gradient(logp, params))
                term = term + np.exp(logp.numpy()) * np.outer(g, g)
            scale = 1.0 / d
        elif kind == "gaussian":
            with tf.GradientTape(persistent=True) as tape:
                out = model(xn)[0]
            d = out.shape[0]
            jac = np.concatenate([np.asarray(j, np.float64).reshape(d, -1)
                                  for j in tape.jacobian(out, params)], axis=1)
            term = jac.T @ (2.0 * np.eye(d)) @ jac
            scale = 1.0 / d
        else:
            raise ValueError(kind)
        term = scale * weights[n] * term
        total = term if total is None else total + term
    return total / len(x)


CASES = [
    ("softmax_logits", None, 3, keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
    ("softmax_probs", "softmax", 3, keras.losses.SparseCategoricalCrossentropy()),
    ("sigmoid_logits", None, 2, keras.losses.BinaryCrossentropy(from_logits=True)),
    ("sigmoid_probs", "sigmoid", 2, keras.losses.BinaryCrossentropy()),
    ("gaussian", None, 2, keras.losses.MeanSquaredError()),
]


@pytest.mark.parametrize("kind,activation,outputs,loss", CASES, ids=[c[0] for c in CASES])
def test_fisher_products_match_dense_exact_fisher(kind, activation, outputs, loss):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3)).astype("float32")
    sample_weight = rng.uniform(0.5, 2.0, size=6).astype("float32") if kind == "softmax_logits" else None
    model = _model(outputs, activation)
    variables = model.trainable_variables
    dense = _exact_fisher(model, x, kind, sample_weight)
    size = dense.shape[0]
    u, v = rng.normal(size=size), rng.normal(size=size)
    batch = quadratic_model.BatchQuadraticModel(
        model, losses_lib.distribution_for_loss(loss), x, None, sample_weight, None)
    gram = batch.fisher_gram([_unflat(u, variables), _unflat(v, variables)], variables).numpy()
    expected = np.array([[u @ dense @ u, u @ dense @ v], [v @ dense @ u, v @ dense @ v]])
    np.testing.assert_allclose(gram, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_step_coefficients_solve_the_dense_two_by_two_system():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.integers(0, 3, size=8)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _model(3)
    damping, l2 = 0.3, 0.01
    optimizer = kfac_keras.KFAC(
        damping=damping, l2_reg=l2, inverse_method="eigh", cov_update_every=1,
        inv_update_every=1, seed=4, step_rule="kl_clip",
        adaptive=kfac_keras.AdaptiveOptions(quadratic_model_step=True))
    step = kfac_keras.make_train_step(model, optimizer, loss)
    variables = model.trainable_variables
    previous = np.zeros(sum(int(np.prod(v.shape)) for v in variables))
    for step_index in range(3):
        theta = _flat([v.numpy() for v in variables])
        with tf.GradientTape() as tape:
            value = loss(y, model(x))
        grad = _flat(tape.gradient(value, variables)) + l2 * theta
        fisher = _exact_fisher(model, x, "softmax_logits")
        logs = step(x, y)
        # Fhat^{-1} of the eigh blocks from the factors this step used.
        blocks = [block_for_layer(optimizer, model.get_layer(n)) for n in ("hidden", "out")]
        direction_parts, position = [], 0
        for block in blocks:
            a = block.input_factor.numpy().astype(np.float64)
            g = block.output_grad_factor.numpy().astype(np.float64)
            rows, cols = a.shape[0], g.shape[0]
            count = rows * cols
            kernel = grad[position:position + (rows - 1) * cols].reshape(rows - 1, cols)
            bias = grad[position + (rows - 1) * cols:position + count]
            v = np.concatenate([kernel, bias[None]], 0).reshape(-1)
            solved = np.linalg.solve(np.kron(a, g) + (damping + l2) * np.eye(count), v)
            solved = solved.reshape(rows, cols)
            direction_parts += [-solved[:-1].reshape(-1), -solved[-1]]
            position += count
        direction = np.concatenate(direction_parts)
        curvature = fisher + (damping + l2) * np.eye(len(theta))
        if step_index == 0:
            alpha_expected = -(grad @ direction) / (direction @ curvature @ direction)
            mu_expected = 0.0
        else:
            matrix = np.array([[direction @ curvature @ direction, direction @ curvature @ previous],
                               [previous @ curvature @ direction, previous @ curvature @ previous]])
            alpha_expected, mu_expected = np.linalg.solve(
                matrix, -np.array([grad @ direction, grad @ previous]))
        np.testing.assert_allclose(float(logs["alpha"]), alpha_expected, rtol=1e-3)
        np.testing.assert_allclose(float(logs["mu"]), mu_expected, rtol=1e-3, atol=1e-6)
        update = _flat([v.numpy() for v in variables]) - theta
        expected_update = alpha_expected * direction + mu_expected * previous
        assert np.linalg.norm(update - expected_update) <= 1e-3 * np.linalg.norm(expected_update)
        # The logged change is the undamped model's M(delta) - M(0).
        model_change = 0.5 * update @ (fisher + l2 * np.eye(len(theta))) @ update + grad @ update
        np.testing.assert_allclose(float(logs["qmodel_change"]), model_change, rtol=1e-3)
        np.testing.assert_allclose(float(logs["update_norm"]), np.linalg.norm(update), rtol=1e-4)
        previous = update
    assert abs(float(logs["mu"])) > 1e-4  # momentum was actually used


def test_solve_step_coefficients_against_numpy():
    rng = np.random.default_rng(2)
    root = rng.normal(size=(2, 2))
    matrix = root @ root.T + 0.1 * np.eye(2)
    linear = rng.normal(size=2)
    alpha, mu, change = step_rules.solve_step_coefficients(
        tf.constant(matrix, tf.float32), tf.constant(linear, tf.float32), tf.constant(False))
    solution = np.linalg.solve(matrix, -linear)
    np.testing.assert_allclose([float(alpha), float(mu)], solution, rtol=1e-5)
    np.testing.assert_allclose(float(change), 0.5 * linear @ solution, rtol=1e-5)
    alpha, mu, _ = step_rules.solve_step_coefficients(
        tf.constant(matrix, tf.float32), tf.constant(linear, tf.float32), tf.constant(True))
    np.testing.assert_allclose([float(alpha), float(mu)], [-linear[0] / matrix[0, 0], 0.0],
                               rtol=1e-6)
    singular = np.array([[2.0, 2.0], [2.0, 2.0]])  # delta0 parallel to Delta
    alpha, mu, _ = step_rules.solve_step_coefficients(
        tf.constant(singular, tf.float32), tf.constant([-1.0, -1.0]), tf.constant(False))
    np.testing.assert_allclose([float(alpha), float(mu)], [0.5, 0.0], rtol=1e-6)


def test_extra_passes_leave_batch_norm_statistics_alone():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.integers(0, 3, size=16)
    model = _model(3, batch_norm=True)
    hidden = model.get_layer("hidden")
    h = np.tanh(x @ hidden.kernel.numpy() + hidden.bias.numpy())
    optimizer = kfac_keras.KFAC(
        damping=1.0, seed=5, step_rule="kl_clip",
        adaptive=kfac_keras.AdaptiveOptions(quadratic_model_step=True, adapt_damping=True,
                                            damping_update_every=1))
    step = kfac_keras.make_train_step(
        model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    step(x, y)  # one K-FAC forward pass, two forward-mode passes, one loss pass
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.01 * h.mean(0), rtol=1e-4, atol=1e-7)


def test_options_are_validated():
    adaptive = kfac_keras.AdaptiveOptions(quadratic_model_step=True)
    with pytest.raises(ValueError, match="learning_rate"):
        kfac_keras.KFAC(learning_rate=0.1, adaptive=adaptive, step_rule="kl_clip")
    with pytest.raises(ValueError, match="momentum"):
        kfac_keras.KFAC(momentum=0.5, adaptive=adaptive, step_rule="kl_clip")
    with pytest.raises(ValueError, match="norm_constraint"):
        kfac_keras.KFAC(norm_constraint=0.1, adaptive=adaptive, step_rule="kl_clip")
    with pytest.raises(ValueError, match="weight_decay"):
        kfac_keras.KFAC(adaptive=adaptive, weight_decay=0.1, step_rule="kl_clip")
    with pytest.raises(ValueError, match="enables nothing"):
        kfac_keras.AdaptiveOptions()
    with pytest.raises(TypeError, match="unknown keys"):
        kfac_keras.KFAC(adaptive={"quadratic_model": True})
    with pytest.raises(TypeError, match="adaptive"):
        kfac_keras.KFAC(adaptive="yes")
    with pytest.raises(TypeError, match="quadratic_model_step"):
        kfac_keras.AdaptiveOptions(quadratic_model_step=1)
    optimizer = kfac_keras.KFAC(adaptive={"quadratic_model_step": True, "adapt_damping": True},
                                damping=2.0, step_rule="kl_clip")
    config = optimizer.get_config()
    assert config["learning_rate"] is None and config["momentum"] is None
    restored = kfac_keras.KFAC.from_config(config)
    assert restored.adaptive == optimizer.adaptive


def test_apply_without_the_training_step_explains_what_to_do():
    model = _model(3)
    optimizer = kfac_keras.KFAC(adaptive=kfac_keras.AdaptiveOptions(quadratic_model_step=True),
                                step_rule="kl_clip")
    optimizer.attach(model)
    grads = [tf.zeros_like(v) for v in model.trainable_variables]
    with pytest.raises(RuntimeError, match="make_train_step"):
        optimizer.apply(grads, model.trainable_variables)


@pytest.mark.parametrize("mode", ["eager", "graph", "jit"])
def test_logged_values_in_fit_and_custom_loop(mode):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = rng.integers(0, 3, size=32)
    model = _model(3)
    optimizer = kfac_keras.KFAC(
        damping=1.0, cov_update_every=1, inv_update_every=2, seed=6, step_rule="kl_clip",
        adaptive=kfac_keras.AdaptiveOptions(quadratic_model_step=True, adapt_damping=True,
                                            damping_update_every=1))
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=mode == "eager", jit_compile=mode == "jit")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    for key in ("damping", "rho", "alpha", "mu", "qmodel_change", "update_norm"):
        assert key in history.history, key
        assert np.all(np.isfinite(history.history[key])), (key, history.history[key])
    assert history.history["damping"][-1] != 1.0  # the LM rule ran
    step = tf.function(kfac_keras.make_train_step(model, optimizer))
    logs = step(x[:8], y[:8])
    assert {"alpha", "mu", "rho", "damping", "qmodel_change", "update_norm"} <= set(logs)
