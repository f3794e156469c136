"""The step rules (`kfac_keras.step_rules`) against NumPy.

Each rule is a pure function; here each is compared with the formula of the
module docstring evaluated in float64 NumPy on random lists of tensors, and
checked to assign nothing (no variable changes).
"""

import numpy as np
import pytest
import tensorflow as tf

from kfac_keras import step_rules

RNG = np.random.default_rng(0)
SHAPES = [(3, 2), (2,)]


def _tensors(scale=1.0):
    return [RNG.normal(scale=scale, size=shape).astype("float32") for shape in SHAPES]


def _flat(arrays):
    return np.concatenate([np.ravel(a).astype(np.float64) for a in arrays])


def test_dot_is_the_inner_product_of_the_concatenation():
    first, second = _tensors(), _tensors()
    assert float(step_rules.dot(first, second)) == pytest.approx(
        _flat(first) @ _flat(second), rel=1e-6)
    assert float(step_rules.dot([], [])) == 0.0


@pytest.mark.parametrize("norm_constraint", [1e-4, 1e3])
def test_kl_clipping_scale(norm_constraint):
    grads = _tensors()
    preconditioned = [2.0 * g for g in grads]  # Delta^T grad > 0
    size = _flat(preconditioned) @ _flat(grads)
    expected = min(1.0, np.sqrt(norm_constraint / size))
    scale = step_rules.kl_clipping_scale(grads, preconditioned, norm_constraint)
    assert float(scale) == pytest.approx(expected, rel=1e-5)
    # No positive curvature along Delta: no clipping.
    negative = step_rules.kl_clipping_scale(grads, [-p for p in preconditioned],
                                            norm_constraint)
    assert float(negative) == 1.0


def test_fixed_step_and_its_predicted_change():
    preconditioned, previous, grads = _tensors(), _tensors(), _tensors()
    learning_rate, momentum, l2_reg, step_fisher = 0.3, 0.8, 0.01, 2.5
    step = step_rules.fixed_step(preconditioned, previous, learning_rate, momentum)
    expected = momentum * _flat(previous) - learning_rate * _flat(preconditioned)
    # Entries near zero come from cancellation, so float32 rounding is bounded in absolute terms.
    np.testing.assert_allclose(_flat([s.numpy() for s in step]), expected, rtol=1e-6,
                               atol=1e-6 * np.abs(expected).max())
    change = step_rules.predicted_change(step, step_fisher, grads, l2_reg)
    assert float(change) == pytest.approx(
        0.5 * (step_fisher + l2_reg * expected @ expected) + _flat(grads) @ expected, rel=1e-5)


def test_nesterov_fixed_step_is_the_look_ahead_update():
    """Nesterov: `v = mu v0 - lr Delta`, the update `mu v - lr Delta` =
    `mu^2 v0 - (1 + mu) lr Delta`; not the heavy-ball `v`."""
    preconditioned, previous = _tensors(), _tensors()
    learning_rate, momentum = 0.3, 0.8
    step = step_rules.fixed_step(preconditioned, previous, learning_rate, momentum,
                                 nesterov=True)
    expected = momentum ** 2 * _flat(previous) - (1 + momentum) * learning_rate * _flat(
        preconditioned)
    np.testing.assert_allclose(_flat([s.numpy() for s in step]), expected, rtol=1e-6,
                               atol=1e-6 * np.abs(expected).max())


def test_quadratic_model_step_minimises_the_damped_model():
    direction, previous, grads = _tensors(), _tensors(), _tensors()
    jacobian = RNG.normal(size=(5, _flat(direction).size))
    fisher_matrix = jacobian.T @ jacobian  # an exact Fisher stand-in (PSD)
    basis = np.stack([_flat(direction), _flat(previous)], axis=1)
    fisher = basis.T @ fisher_matrix @ basis
    total_damping, l2_reg = 0.1, 0.02
    alpha, mu, change = step_rules.quadratic_model_step(
        direction, previous, grads, tf.constant(fisher, tf.float32), total_damping, l2_reg)
    # argmin over (alpha, mu) of g^T d + 1/2 d^T (F + damping I) d, d = basis @ x.
    damped = basis.T @ (fisher_matrix + total_damping * np.eye(len(fisher_matrix))) @ basis
    linear = basis.T @ _flat(grads)
    x = np.linalg.solve(damped, -linear)
    np.testing.assert_allclose([float(alpha), float(mu)], x, rtol=1e-3)
    # The reported change is that of the undamped model (shift eta) at x.
    delta = basis @ x
    undamped = 0.5 * delta @ (fisher_matrix + l2_reg * np.eye(len(delta))) @ delta
    assert float(change) == pytest.approx(undamped + _flat(grads) @ delta, rel=1e-3)


def test_first_quadratic_model_step_uses_alpha_only():
    direction, grads = _tensors(), _tensors()
    previous = [np.zeros(shape, "float32") for shape in SHAPES]
    fisher = np.array([[3.0, 0.0], [0.0, 0.0]], "float32")
    alpha, mu, _ = step_rules.quadratic_model_step(direction, previous, grads, fisher, 0.5, 0.0)
    d = _flat(direction)
    assert float(mu) == 0.0
    assert float(alpha) == pytest.approx(-(_flat(grads) @ d) / (3.0 + 0.5 * d @ d), rel=1e-5)


def test_actual_change_adds_the_l2_term():
    new_weights, updates = _tensors(), _tensors(0.1)
    l2_reg = 0.05
    change = step_rules.actual_change(1.5, 1.2, new_weights, updates, l2_reg)
    theta_after = _flat(new_weights)
    theta_before = theta_after - _flat(updates)
    expected = (1.2 - 1.5) + 0.5 * l2_reg * (theta_after @ theta_after
                                             - theta_before @ theta_before)
    assert float(change) == pytest.approx(expected, rel=1e-5)
    assert float(step_rules.actual_change(1.5, 1.2, new_weights, updates, 0.0)) == (
        pytest.approx(-0.3))


def test_rules_assign_no_variable():
    variable = tf.Variable(np.ones((3, 2), "float32"))
    before = variable.numpy().copy()
    grads = [variable, tf.ones((2,))]
    step_rules.kl_clipping_scale(grads, grads, 1e-3)
    step_rules.actual_change(1.0, 0.5, grads, grads, 0.1)
    step_rules.levenberg_marquardt_update(tf.constant(1.0), 0.9, 0.5, 1e-3, 10.0)
    np.testing.assert_array_equal(variable.numpy(), before)
