"""Levenberg-Marquardt damping (paper section 6.5) and damping/momentum schedules.

Oracles: the rule written out in plain Python for a scripted sequence of
`rho` values; `rho` recomputed in float64 from losses evaluated with the
model before and after a step, the dense exact Fisher (enumerating the
categorical outputs, one tape per example and class) and a tape gradient;
the update with schedules against `(A (x) G + lambda_k I)^{-1}` in NumPy.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from kfac_keras import step_rules
from conftest import block_for_layer


def _rule(damping, rho, factor, low, high):
    if rho > 0.75:
        damping *= factor
    elif rho < 0.25 or math.isnan(rho):
        damping /= factor
    return min(max(damping, low), high)


def test_scripted_rho_sequence_follows_the_rule_exactly():
    factor = step_rules.adjustment_factor(5)
    assert factor == pytest.approx((19 / 20) ** 5, rel=1e-15)
    rhos = [0.9, 0.76, 0.75, 0.5, 0.25, 0.2499, -3.0, float("nan"), 1.7, 0.1,
            0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9]
    low, high = 0.5, 2.0
    damping = 1.0
    expected = 1.0
    for rho in rhos:
        damping = float(step_rules.levenberg_marquardt_update(
            tf.constant(damping), tf.constant(rho), factor, low, high))
        expected = _rule(expected, rho, factor, low, high)
        assert damping == pytest.approx(expected, rel=1e-6), rho
    assert expected == pytest.approx(high * factor)  # hit the upper bound, then came back down


def test_reduction_ratio():
    assert float(step_rules.reduction_ratio(-0.5, -1.0)) == pytest.approx(0.5)
    assert float(step_rules.reduction_ratio(0.5, -1.0)) == pytest.approx(-0.5)
    assert math.isnan(float(step_rules.reduction_ratio(-0.5, 0.0)))   # no predicted decrease
    assert math.isnan(float(step_rules.reduction_ratio(float("nan"), -1.0)))


def _model():
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(h))


def _flat(tensors):
    return np.concatenate([np.asarray(t, np.float64).reshape(-1) for t in tensors])


def _exact_fisher(model, x):
    params = model.trainable_variables
    total = 0.0
    for n in range(len(x)):
        for k in range(3):
            with tf.GradientTape() as tape:
                logq = tf.nn.log_softmax(tf.cast(model(x[n:n + 1]), tf.float64))[0]
                chosen = logq[k]
            g = _flat(tape.gradient(chosen, params))
            total = total + np.exp(logq.numpy()[k]) * np.outer(g, g)
    return total / len(x)


def test_rho_and_damping_in_training_match_independent_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3)).astype("float32")
    y = rng.integers(0, 3, size=10)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _model()
    l2, every = 0.01, 2
    options = kfac_keras.AdaptiveOptions(adapt_damping=True, damping_update_every=every,
                                         min_damping=1e-4, max_damping=10.0)
    optimizer = kfac_keras.KFAC(norm_constraint=None, step_rule="kl_clip", learning_rate=0.5, momentum=0.5, damping=0.1, l2_reg=l2,
                                cov_update_every=1, inv_update_every=1, seed=1,
                                adaptive=options)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    variables = model.trainable_variables
    factor = (19 / 20) ** every
    checked = 0
    for index in range(6):
        theta = _flat([v.numpy() for v in variables])
        with tf.GradientTape() as tape:
            before = loss(y, model(x))
        grad = _flat(tape.gradient(before, variables)) + l2 * theta
        fisher = _exact_fisher(model, x) if index % every == 0 else None
        damping_before = float(optimizer.damping.numpy())
        logs = step(x, y)
        new_theta = _flat([v.numpy() for v in variables])
        if index % every:
            assert float(logs["damping"]) == damping_before  # not due: unchanged
            continue
        delta = new_theta - theta
        after = float(loss(y, model(x)))
        actual = (after - float(before)
                  + 0.5 * l2 * (new_theta @ new_theta - theta @ theta))
        predicted = 0.5 * delta @ (fisher + l2 * np.eye(len(delta))) @ delta + grad @ delta
        rho = actual / predicted
        np.testing.assert_allclose(float(logs["qmodel_change"]), predicted, rtol=1e-3)
        np.testing.assert_allclose(float(logs["rho"]), rho, rtol=2e-3, atol=2e-3)
        expected = _rule(damping_before, float(logs["rho"]), factor, 1e-4, 10.0)
        assert float(logs["damping"]) == pytest.approx(expected, rel=1e-6)
        checked += 1
    assert checked == 3


@pytest.mark.parametrize("learning_rate,direction", [(8.0, "up"), (1e-3, "down")])
def test_damping_moves_in_the_right_direction(learning_rate, direction):
    """Steps far too long (lr 8) make rho small: damping grows. Tiny steps
    (lr 1e-3) are predicted well (rho ~ 1): damping shrinks."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32") + (x[:, 2] > 1).astype("int32")
    model = _model()
    optimizer = kfac_keras.KFAC(norm_constraint=None, step_rule="kl_clip",
        learning_rate=learning_rate, momentum=0.0, damping=0.01, inverse_method="eigh",
        cov_update_every=1, inv_update_every=5, seed=2,
        adaptive=kfac_keras.AdaptiveOptions(adapt_damping=True, damping_update_every=1))
    step = kfac_keras.make_train_step(
        model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rhos = []
    for _ in range(8):
        rhos.append(float(step(x, y)["rho"]))
    final = float(optimizer.damping.numpy())
    if direction == "up":
        assert final > 0.01 * 1.5
        assert np.nanmedian(rhos) < 0.25 or np.isnan(rhos).sum() > 4
    else:
        assert final < 0.01 / 1.5
        assert np.median(rhos) > 0.75


def test_damping_options_are_validated():
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5)
    options = kfac_keras.AdaptiveOptions(adapt_damping=True, min_damping=0.1, max_damping=1.0)
    with pytest.raises(ValueError, match="schedule"):
        kfac_keras.KFAC(damping=schedule, adaptive=options)
    with pytest.raises(ValueError, match="min_damping"):
        kfac_keras.KFAC(damping=5.0, adaptive=options)
    with pytest.raises(ValueError, match="max_damping"):
        kfac_keras.AdaptiveOptions(adapt_damping=True, min_damping=1.0, max_damping=0.5)
    with pytest.raises(ValueError, match="damping_update_every"):
        kfac_keras.AdaptiveOptions(adapt_damping=True, damping_update_every=0)
    with pytest.raises(ValueError, match="min_damping"):
        kfac_keras.AdaptiveOptions(adapt_damping=True, min_damping=-1.0)


def test_damping_and_momentum_schedules_drive_the_update():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 3)).astype("float32")
    y = rng.integers(0, 3, size=12)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _model()
    damping = keras.optimizers.schedules.ExponentialDecay(0.5, 1, 0.5)    # 0.5 * 0.5^k
    momentum = keras.optimizers.schedules.PolynomialDecay(0.2, 4, 0.8)   # 0.2 -> 0.8
    lr = keras.optimizers.schedules.ExponentialDecay(0.3, 1, 0.9)
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, step_rule="kl_clip", learning_rate=lr, momentum=momentum, damping=damping,
                                inverse_method="eigh", cov_update_every=1,
                                inv_update_every=1, seed=3)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    variables = model.trainable_variables
    previous = None
    for k in range(3):
        theta = [v.numpy().astype(np.float64) for v in variables]
        with tf.GradientTape() as tape:
            value = loss(y, model(x))
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(value, variables)]
        logs = step(x, y)
        lam = 0.5 * 0.5 ** k
        assert float(logs["damping"]) == pytest.approx(lam, rel=1e-6)
        change = [v.numpy().astype(np.float64) - t for v, t in zip(variables, theta)]
        mom = float(momentum(k))
        for index, name in enumerate(("hidden", "out")):
            block = block_for_layer(optimizer, model.get_layer(name))
            a = block.input_factor.numpy().astype(np.float64)
            g = block.output_grad_factor.numpy().astype(np.float64)
            v = np.concatenate([grads[2 * index], grads[2 * index + 1][None]], 0)
            solved = np.linalg.solve(np.kron(a, g) + lam * np.eye(v.size), v.reshape(-1))
            expected = -0.3 * 0.9 ** k * solved.reshape(v.shape)
            if previous is not None:
                expected = expected + mom * np.concatenate(
                    [previous[2 * index], previous[2 * index + 1][None]], 0)
            actual = np.concatenate([change[2 * index], change[2 * index + 1][None]], 0)
            assert np.linalg.norm(actual - expected) <= 2e-4 * np.linalg.norm(expected)
        previous = change
    config = optimizer.get_config()
    restored = kfac_keras.KFAC.from_config(config)
    assert float(restored.damping_schedule(3)) == pytest.approx(float(damping(3)))
    assert float(restored.momentum(2)) == pytest.approx(float(momentum(2)))
