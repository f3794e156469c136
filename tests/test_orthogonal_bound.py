"""The orthogonal rule's Newton bound (`KFAC(orthogonal_step_bound=...)`) and
the scale-free Newton-Schulz normalisation, against independent NumPy
computations.

* Newton-Schulz of a matrix with entries ~1e-20 or ~1e20 equals the NumPy
  float64 loop of the same matrix (the polar direction does not depend on
  the scale); before the power-of-two rescaling the float32 Frobenius norm
  flushed the squares to zero (a zero step, or a diverged one ~1e34).
* `newton_bound_scale` equals `min(1, bound ||P||_F / (lr ||D||_F))`.
* Two training steps of a tiny Dense network against a dense NumPy K-FAC with
  the bound (which binds on one matrix and not on the other), and the logged
  `orthogonal_bound` fraction.
* A small classifier fitted to ~0 loss: with the default bound its weights
  stop growing; with `orthogonal_step_bound=None` (the fixed-RMS step) they
  keep growing (the defect of tools/keras_programs/FINDINGS.md, S6-bilstm).
* Options: default, validation, round trip.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from kfac_keras import step_rules
from orthogonal_oracle import augmented, numpy_direction, numpy_preconditioned, two_layer_model

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ------------------------------------------------- scale-free Newton-Schulz
@pytest.mark.parametrize("shape", [(65, 2), (6, 4), (3, 7)])
@pytest.mark.parametrize("scale", [1e-20, 1e-30, 1e20, 1e30])
def test_direction_of_a_tiny_or_huge_matrix_matches_numpy(shape, scale):
    matrix = np.random.default_rng(0).normal(size=shape)
    scaled = (matrix * scale).astype(np.float32)
    got = step_rules.orthogonal_direction(tf.constant(scaled), 3).numpy()
    np.testing.assert_allclose(got, numpy_direction(matrix), rtol=1e-4, atol=1e-5)


def test_power_of_two_rescaling_leaves_ordinary_matrices_bit_for_bit():
    """The rescaling is exact: `NS(P)` and `NS(2^-40 P)` agree bit for bit
    (so the steps of every run whose matrices never underflow are unchanged)."""
    matrix = np.random.default_rng(1).normal(size=(9, 5)).astype(np.float32)
    first = step_rules.newton_schulz(tf.constant(matrix), 3).numpy()
    second = step_rules.newton_schulz(tf.constant(matrix * np.float32(2.0 ** -40)), 3).numpy()
    np.testing.assert_array_equal(first, second)


def test_frobenius_norm_of_tiny_and_batched_matrices():
    matrices = np.random.default_rng(2).normal(size=(3, 4, 5))
    matrices[1] *= 1e-21
    matrices[2] = 0.0
    got = step_rules.frobenius_norm(tf.constant(matrices, tf.float32)).numpy()
    np.testing.assert_allclose(got[:, 0, 0], np.linalg.norm(matrices, axis=(1, 2)), rtol=1e-5)


# ------------------------------------------------------------ the bound
def test_newton_bound_scale_matches_numpy():
    rng = np.random.default_rng(3)
    matrices = rng.normal(size=(4, 6, 3))
    matrices[0] *= 1e-3   # short P: the bound binds
    matrices[1] *= 1e3    # long P: it does not
    directions = rng.normal(size=(4, 6, 3))
    directions[3] = 0.0   # zero direction: scale 1
    lr, bound = 0.01, 1.0
    got = step_rules.newton_bound_scale(tf.constant(matrices, tf.float32),
                                        tf.constant(directions, tf.float32), lr, bound).numpy()
    step = lr * np.linalg.norm(directions, axis=(1, 2))
    expected = np.ones(4)
    positive = step > 0
    expected[positive] = np.minimum(
        1.0, bound * np.linalg.norm(matrices, axis=(1, 2))[positive] / step[positive])
    np.testing.assert_allclose(got[:, 0, 0], expected, rtol=1e-5)
    assert got[0, 0, 0] < 1.0 and got[1, 0, 0] == 1.0


def _numpy_bounded_directions(weights, x, y, damping, lr, bound):
    """Dense NumPy K-FAC, Newton-Schulz and Muon's scale, then the Newton bound
    per `[K; b]` matrix. Returns `(directions, scales)`."""
    directions, scales = [], []
    for preconditioned in numpy_preconditioned(weights, x, y, damping):
        direction = numpy_direction(preconditioned)
        scale = min(1.0, bound * np.linalg.norm(preconditioned) / (lr * np.linalg.norm(direction)))
        directions.append(scale * direction)
        scales.append(scale)
    return directions, scales


def test_bounded_steps_match_dense_numpy_kfac():
    """Two steps, (Nesterov, the default) momentum after the bound; the
    learning rate is chosen so that the bound shortens one matrix's step and
    not the other's."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    lr, mu, damping, bound = 1.15, 0.5, 0.03, 1.0
    model = two_layer_model()
    optimizer = kfac_keras.KFAC(
        learning_rate=lr, momentum=mu, damping=damping, adaptive=None,
        estimation_mode="empirical", factor_decay=0.0, cov_update_every=1, inv_update_every=1,
        orthogonal_step_bound=bound, seed=0)
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    weights = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    velocity = [np.zeros_like(w) for w in augmented(weights)]
    bound_fractions = []
    for _ in range(2):
        directions, scales = _numpy_bounded_directions(weights, x.astype(np.float64), y,
                                                       damping, lr, bound)
        bound_fractions.append(np.mean([s < 1.0 for s in scales]))
        velocity = [mu * v - lr * d for v, d in zip(velocity, directions)]
        moved = [w + mu * v - lr * d for w, v, d in zip(augmented(weights), velocity,
                                                         directions)]
        weights = [moved[0][:-1], moved[0][-1], moved[1][:-1], moved[1][-1]]
        logs = step(x, y)
        for got, expected in zip(model.trainable_variables, weights):
            # float32 Newton-Schulz on steps of RMS ~0.3 (Nesterov's 1.5x of lr 1.15 D)
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)
        assert float(logs["orthogonal_bound"]) == pytest.approx(bound_fractions[-1])
    assert 0.0 < bound_fractions[0] < 1.0  # the case exercises both branches


def test_step_size_is_the_rms_of_the_bounded_update():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    model = two_layer_model()
    # A small bound, so that it shortens both matrices' steps.
    optimizer = kfac_keras.KFAC(learning_rate=0.05, momentum=0.0, adaptive=None,
                                cov_update_every=1, orthogonal_step_bound=1e-3, seed=0)
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    before = [v.numpy() for v in model.trainable_variables]
    logs = step(x, y)
    assert float(logs["orthogonal_bound"]) == 1.0
    update = np.concatenate([(v.numpy() - b).ravel()
                             for v, b in zip(model.trainable_variables, before)])
    assert float(logs["step_size"]) == pytest.approx(np.sqrt(np.mean(update ** 2)), rel=1e-4)


# ------------------------------------------- regression: weights stop growing
def _fitted_weight_norms(bound, steps=120):
    """Full-batch training of a separable 2-class problem at the defaults
    (but `orthogonal_step_bound`); the total weight norm after each step."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int32")
    margin = np.where(y[:, None] == 1, 2.0, -2.0) * np.array([1.0, 0.5, 0.0, 0.0])
    x = (x + margin).astype("float32")  # a wide margin: the loss reaches ~0 quickly
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    optimizer = kfac_keras.KFAC(orthogonal_step_bound=bound, seed=0)
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    norms, losses = [], []
    for _ in range(steps):
        losses.append(float(step(x, y)["loss"]))
        norms.append(np.sqrt(sum(float(np.sum(v.numpy() ** 2))
                                 for v in model.trainable_variables)))
    return np.array(norms), np.array(losses)


def test_weights_stop_growing_once_the_loss_is_zero():
    """From step 60 (loss < 1e-3 in both runs) to 120: the fixed-RMS step
    (bound None) grows the weight norm by > 1.2 (measured 1.7), the default
    bound by < 0.5 (measured 0.3)."""
    bounded, bounded_loss = _fitted_weight_norms("auto")
    fixed, fixed_loss = _fitted_weight_norms(None)
    assert bounded_loss[60] < 1e-3 and fixed_loss[60] < 1e-3
    assert fixed[-1] - fixed[60] > 1.2
    assert bounded[-1] - bounded[60] < 0.5
    assert bounded_loss[-1] < 1e-4


# ------------------------------------------------------------------ options
def test_bound_defaults_validates_and_round_trips():
    assert kfac_keras.KFAC().options.orthogonal_step_bound == 1.0
    assert kfac_keras.KFAC(orthogonal_step_bound=None).options.orthogonal_step_bound is None
    assert kfac_keras.KFAC(step_rule="kl_clip").options.orthogonal_step_bound is None
    optimizer = kfac_keras.KFAC(orthogonal_step_bound=0.25)
    config = optimizer.options.get_config()
    assert config["orthogonal_step_bound"] == 0.25
    rebuilt = kfac_keras.KFAC(**config)
    assert rebuilt.options.orthogonal_step_bound == 0.25
    kl_config = kfac_keras.KFAC(step_rule="kl_clip").options.get_config()
    assert kfac_keras.KFAC(**kl_config).options.orthogonal_step_bound is None
    with pytest.raises(ValueError, match="only applies to step_rule='orthogonal'"):
        kfac_keras.KFAC(step_rule="kl_clip", orthogonal_step_bound=1.0)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="orthogonal_step_bound"):
            kfac_keras.KFAC(orthogonal_step_bound=bad)
