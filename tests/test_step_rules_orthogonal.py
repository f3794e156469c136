"""`step_rule="orthogonal"` against independent NumPy computations.

Newton-Schulz against a NumPy loop and the SVD (its singular values follow
the scalar polynomial, and many iterations land near the polar factor); two
full training steps on a tiny Dense network against a dense NumPy K-FAC
(factors from the layer inputs and per-example gradients, factored Tikhonov
inverses, Newton-Schulz, Muon's scale, momentum); the learning rate's
linearity; the Levenberg-Marquardt rule on the update taken; one matrix per
Kronecker pair for multi-block layers; options (Embedding tables:
test_orthogonal_embedding.py);
the bfloat16 products (`orthogonal_dtype`) against the float64 loop.
"""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from kfac_keras import step_rules
from orthogonal_oracle import (COEFFICIENTS, augmented, numpy_direction, numpy_newton_schulz,
                               numpy_preconditioned, two_layer_model)

#: With at least 7 iterations every singular value s of P with s / ||P||_F >= 1e-3
#: ends in [0.6818, 1.1344] (iterate the scalar polynomial on a grid of s), so
#: the result is within this spectral-norm distance of the polar factor.
POLAR_TOLERANCE = 0.32
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _scalar_polynomial(s, iterations):
    a, b, c = COEFFICIENTS
    for _ in range(iterations):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


# ------------------------------------------------------------ Newton-Schulz
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)])
@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_newton_schulz_matches_numpy_loop(shape, iterations):
    matrix = np.random.default_rng(0).normal(size=shape)
    got = step_rules.newton_schulz(tf.constant(matrix, tf.float32), iterations).numpy()
    np.testing.assert_allclose(got, numpy_newton_schulz(matrix, iterations),
                               rtol=1e-4, atol=1e-5)


def test_newton_schulz_keeps_singular_vectors_and_maps_singular_values():
    """`NS_k(P) = U f^k(S / ||P||_F) V^T` for `P = U S V^T`."""
    matrix = np.random.default_rng(1).normal(size=(6, 4))
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    expected = u @ np.diag(_scalar_polynomial(s / np.linalg.norm(s), 3)) @ vt
    got = step_rules.newton_schulz(tf.constant(matrix, tf.float32), 3).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(7, 4), (4, 7)])
def test_enough_iterations_approach_the_polar_factor(shape):
    matrix = np.random.default_rng(2).normal(size=shape)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    assert s.min() / np.linalg.norm(s) > 1e-3  # the tolerance's premise
    polar = u @ vt
    got = step_rules.newton_schulz(tf.constant(matrix, tf.float32), 10).numpy()
    assert np.linalg.norm(got - polar, 2) < POLAR_TOLERANCE
    # Far closer than the normalised input, which is where iteration 0 starts.
    assert np.linalg.norm(matrix / np.linalg.norm(matrix) - polar, 2) > 0.5


def test_batched_matrices_are_orthogonalised_one_by_one():
    matrices = np.random.default_rng(3).normal(size=(3, 5, 2))
    got = step_rules.newton_schulz(tf.constant(matrices, tf.float32), 4).numpy()
    for index in range(3):
        np.testing.assert_allclose(got[index], numpy_newton_schulz(matrices[index], 4),
                                   rtol=1e-4, atol=1e-5)


def test_zero_matrix_gives_zero_step():
    got = step_rules.orthogonal_direction(tf.zeros((3, 2)), 3).numpy()
    np.testing.assert_array_equal(got, np.zeros((3, 2)))


@pytest.mark.parametrize("shape", [(6, 3), (3, 6)])
def test_orthogonal_direction_has_muons_rms(shape):
    """`0.2 sqrt(max(rows, cols)) NS_k`: an orthogonal matrix's RMS becomes 0.2."""
    matrix = np.random.default_rng(4).normal(size=shape)
    got = step_rules.orthogonal_direction(tf.constant(matrix, tf.float32), 3).numpy()
    np.testing.assert_allclose(got, 0.2 * np.sqrt(6.0) * numpy_newton_schulz(matrix, 3),
                               rtol=1e-4, atol=1e-5)
    polar = step_rules.orthogonal_direction(tf.constant(matrix, tf.float32), 30).numpy()
    assert 0.2 * 0.68 < np.sqrt(np.mean(polar ** 2)) < 0.2 * 1.14


# ---------------------------------------------- bfloat16 Newton-Schulz
#: bfloat16 products, 3 iterations, against the float64 loop on an
#: ill-conditioned matrix (singular values 1 .. 1e-3): bounds on the relative
#: Frobenius error of `X_3`, and on `diag(U^T X_3 V)` (the singular values
#: along the input's own singular vectors, where the products' rounding
#: averages out) against the loop's. Measured: <= 0.011 and <= 0.0065 on
#: these shapes and seeds 0-2; with the coefficients rounded to bfloat16
#: (what `a * x` on a bfloat16 tensor would do) >= 0.023 and >= 0.037.
BF16_FROBENIUS_TOLERANCE = 0.015
BF16_SINGULAR_VALUE_TOLERANCE = 0.015
#: Muon's coefficients rounded to bfloat16 (8 significant bits), written out.
BF16_ROUNDED_COEFFICIENTS = (3.4375, -4.78125, 2.03125)


def _ill_conditioned(shape, seed):
    rng = np.random.default_rng(seed)
    rank = min(shape)
    u, _ = np.linalg.qr(rng.normal(size=(shape[0], rank)))
    v, _ = np.linalg.qr(rng.normal(size=(shape[1], rank)))
    return u @ np.diag(np.logspace(0, -3, rank)) @ v.T, u, v


def _bf16_errors(shape, seed):
    """(relative Frobenius error, max singular-value error) of the bfloat16
    `newton_schulz` against the float64 loop with Muon's coefficients."""
    matrix, u, v = _ill_conditioned(shape, seed)
    expected = numpy_newton_schulz(matrix, 3)
    got = step_rules.newton_schulz(tf.constant(matrix, tf.float32), 3, "bfloat16")
    assert got.dtype == tf.float32
    got = got.numpy()
    frobenius = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    singular = np.abs(np.diag(u.T @ got @ v) - np.diag(u.T @ expected @ v)).max()
    return frobenius, singular


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_newton_schulz_matches_the_float64_loop(shape, seed):
    frobenius, singular = _bf16_errors(shape, seed)
    assert frobenius < BF16_FROBENIUS_TOLERANCE
    assert singular < BF16_SINGULAR_VALUE_TOLERANCE
    # Not a no-op: the products really are rounded (float32 is ~1e-6 away).
    assert frobenius > 1e-3


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_bfloat16_tolerances_reject_bfloat16_rounded_coefficients(shape, monkeypatch):
    """The bounds above are tight enough to catch coefficients rounded to
    bfloat16 (as `3.4445 * bfloat16_tensor` rounds 3.4445 to 3.4375)."""
    monkeypatch.setattr(step_rules, "NEWTON_SCHULZ_COEFFICIENTS", BF16_ROUNDED_COEFFICIENTS)
    frobenius, singular = _bf16_errors(shape, 0)
    assert frobenius > BF16_FROBENIUS_TOLERANCE
    assert singular > 2 * BF16_SINGULAR_VALUE_TOLERANCE


def test_bfloat16_newton_schulz_batches_zero_and_bad_dtype():
    matrices = np.random.default_rng(11).normal(size=(3, 9, 6))
    matrices[1] = 0.0
    got = step_rules.newton_schulz(tf.constant(matrices, tf.float32), 3, "bfloat16").numpy()
    np.testing.assert_array_equal(got[1], np.zeros((9, 6)))
    for index in (0, 2):
        expected = numpy_newton_schulz(matrices[index], 3)
        assert np.linalg.norm(got[index] - expected) / np.linalg.norm(expected) < 0.03
    with pytest.raises(ValueError, match="float16"):
        step_rules.newton_schulz(tf.constant(matrices[0], tf.float32), 3, "float16")


# ----------------------------------------------------- full step vs NumPy
def _numpy_orthogonal_kfac_direction(weights, x, y, damping, iterations):
    """Dense NumPy K-FAC, then Newton-Schulz and Muon's scale: the directions
    `[D1, D2]` of `[K; b]` for `weights = [K1, b1, K2, b2]`."""
    return [numpy_direction(p, iterations) for p in numpy_preconditioned(weights, x, y, damping)]


@pytest.mark.parametrize("nesterov", [False, True])
def test_two_steps_match_dense_numpy_kfac(nesterov):
    """Factors from this step's batch (`factor_decay=0`), fixed damping,
    momentum after the orthogonalisation (heavy ball, or Nesterov's update
    `mu v - lr D`), over three steps."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    lr, mu, damping, iterations = 0.05, 0.5, 0.03, 3
    model = two_layer_model()
    optimizer = kfac_keras.KFAC(
        step_rule="orthogonal", orthogonal_iterations=iterations, learning_rate=lr,
        momentum=mu, nesterov=nesterov, damping=damping, adaptive=None,
        estimation_mode="empirical", factor_decay=0.0, cov_update_every=1,
        inv_update_every=1, seed=0)
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    weights = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    velocity = [np.zeros_like(w) for w in augmented(weights)]
    for _ in range(3):
        directions = _numpy_orthogonal_kfac_direction(weights, x.astype(np.float64), y,
                                                      damping, iterations)
        velocity = [mu * v - lr * d for v, d in zip(velocity, directions)]
        updates = ([mu * v - lr * d for v, d in zip(velocity, directions)] if nesterov
                   else velocity)
        moved = [w + u for w, u in zip(augmented(weights), updates)]
        weights = [moved[0][:-1], moved[0][-1], moved[1][:-1], moved[1][-1]]
        logs = step(x, y)
        # `update_norm` is the norm of the update taken (Nesterov's, not the velocity).
        assert float(logs["update_norm"]) == pytest.approx(
            np.sqrt(sum(np.sum(u ** 2) for u in updates)), rel=1e-4)
        for got, expected in zip(model.trainable_variables, weights):
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=2e-6)


def _first_update(x, y, lr, damping, **options):
    """`(updates, weights)`: one momentum-free step of the orthogonal rule on
    `two_layer_model` (factors from this batch, fixed damping), the updates
    as `[K; b]` matrices and the weights before it (float64)."""
    model = two_layer_model()
    optimizer = kfac_keras.KFAC(
        step_rule="orthogonal", learning_rate=lr, momentum=0.0, damping=damping,
        adaptive=None, estimation_mode="empirical", factor_decay=0.0, cov_update_every=1,
        inv_update_every=1, seed=0, **options)
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    weights = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    step(x, y)
    return augmented([v.numpy() - w for v, w in zip(model.trainable_variables, weights)]), weights


def test_iterations_by_matrix_size_match_dense_numpy_kfac():
    """`orthogonal_iterations` as a dict: the 5x5 `[K1; b1]` (smaller side
    5 >= `large_min_dim`) takes `large_iterations` = 1, the 6x3 `[K2; b2]`
    takes 3; the NumPy directions with those counts, not with 3 for both."""
    rng = np.random.default_rng(13)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    lr, damping = 0.05, 0.03
    updates, weights = _first_update(
        x, y, lr, damping,
        orthogonal_iterations={"iterations": 3, "large_iterations": 1, "large_min_dim": 5})
    preconditioned = numpy_preconditioned(weights, x.astype(np.float64), y, damping)
    assert [p.shape for p in preconditioned] == [(5, 5), (6, 3)]
    for got, matrix, iterations in zip(updates, preconditioned, (1, 3)):
        np.testing.assert_allclose(got, -lr * numpy_direction(matrix, iterations),
                                   rtol=1e-4, atol=2e-6)
    uniform = -lr * numpy_direction(preconditioned[0], 3)
    assert np.linalg.norm(updates[0] - uniform) > 0.05 * np.linalg.norm(uniform)


def test_default_iterations_by_matrix_size():
    """None: 2 iterations where the smaller side is >= 500, 3 elsewhere, on
    the autoencoder's `[K; b]` shapes (and stacks of matrices)."""
    optimizer = kfac_keras.KFAC()
    expected = {"iterations": 3, "large_iterations": 2, "large_min_dim": 500}
    assert optimizer.get_config()["orthogonal_iterations"] == expected
    counts = {shape: optimizer._orthogonal_step.matrix_iterations(shape)
              for shape in [(785, 1000), (1001, 500), (501, 250), (251, 30), (31, 250),
                            (251, 500), (501, 1000), (1001, 784), (4, 499, 2000),
                            (4, 500, 500)]}
    assert [shape for shape, count in counts.items() if count == 2] == [
        (785, 1000), (1001, 500), (501, 1000), (1001, 784), (4, 500, 500)]
    assert all(count == 3 for count in counts.values() if count != 2)
    restored = kfac_keras.KFAC.from_config(optimizer.get_config())
    assert restored.get_config()["orthogonal_iterations"] == expected
    assert kfac_keras.KFAC(orthogonal_iterations=4)._orthogonal_step.matrix_iterations(
        (1001, 784)) == 4


def test_bfloat16_step_matches_dense_numpy_kfac_and_differs_from_float32():
    """One step with `orthogonal_dtype="bfloat16"`: the dense NumPy K-FAC
    (float64 Newton-Schulz) within bfloat16 rounding, and not the float32
    step (the option reaches the update)."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    lr, damping, iterations = 0.05, 0.03, 3
    updates = {}
    for dtype in ("float32", "bfloat16"):
        updates[dtype], weights = _first_update(x, y, lr, damping,
                                                orthogonal_iterations=iterations,
                                                orthogonal_dtype=dtype)
    directions = _numpy_orthogonal_kfac_direction(weights, x.astype(np.float64), y, damping,
                                                  iterations)
    for got, exact, float32 in zip(updates["bfloat16"], directions, updates["float32"]):
        expected = -lr * exact
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error < 0.03, error
        assert np.linalg.norm(float32 - expected) / np.linalg.norm(expected) < 1e-4
        assert error > 1e-3  # bfloat16 was used


def test_learning_rate_scales_the_step_linearly():
    """Every variable's update (orthogonalised kernels and the KL-clipped
    LayerNormalization) doubles with the learning rate."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    updates, sizes = [], []
    for lr in (0.01, 0.02):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(5, activation="tanh")(inputs)
        hidden = keras.layers.LayerNormalization()(hidden)
        model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
        optimizer = kfac_keras.KFAC(step_rule="orthogonal", learning_rate=lr, adaptive=None,
                                    damping=0.05, cov_update_every=1, seed=0)
        step = kfac_keras.make_train_step(model, optimizer, LOSS)
        before = [v.numpy() for v in model.trainable_variables]
        logs = step(x, y)
        updates.append([v.numpy() - b for v, b in zip(model.trainable_variables, before)])
        sizes.append(float(logs["step_size"]))
    for small, large in zip(*updates):
        assert np.abs(small).max() > 0
        # atol: float32 spacing of weights ~1 (the update is a weight difference).
        np.testing.assert_allclose(large, 2 * small, rtol=1e-4, atol=2e-7)
    assert sizes[1] == pytest.approx(2 * sizes[0], rel=1e-5)


def test_step_size_is_the_rms_of_the_orthogonalised_update():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    model = two_layer_model()
    optimizer = kfac_keras.KFAC(step_rule="orthogonal", learning_rate=0.01, momentum=0.0,
                                adaptive=None, cov_update_every=1, seed=0)
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    before = [v.numpy() for v in model.trainable_variables]
    logs = step(x, y)
    update = np.concatenate([(v.numpy() - b).ravel()
                             for v, b in zip(model.trainable_variables, before)])
    assert float(logs["step_size"]) == pytest.approx(np.sqrt(np.mean(update ** 2)), rel=1e-4)


def _exact_fisher(model, x):
    params = model.trainable_variables
    total = 0.0
    for n in range(len(x)):
        for k in range(3):
            with tf.GradientTape() as tape:
                logq = tf.nn.log_softmax(tf.cast(model(x[n:n + 1]), tf.float64))[0]
                chosen = logq[k]
            grad = np.concatenate([np.asarray(g, np.float64).ravel()
                                   for g in tape.gradient(chosen, params)])
            total = total + np.exp(logq.numpy()[k]) * np.outer(grad, grad)
    return total / len(x)


def test_levenberg_marquardt_judges_the_update_taken():
    """`qmodel_change = 1/2 delta^T F delta + grad^T delta` for the update
    `delta` the step applied (exact Fisher by enumerating the classes)."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(10, 4)).astype("float32")
    y = rng.integers(0, 3, size=10)
    model = two_layer_model()
    optimizer = kfac_keras.KFAC(
        step_rule="orthogonal", learning_rate=0.02, momentum=0.5, damping=0.1,
        adaptive=dict(adapt_damping=True, damping_update_every=1, min_damping=1e-4),
        cov_update_every=1, inv_update_every=1, seed=1)
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    variables = model.trainable_variables
    for _ in range(2):  # the second update includes momentum
        theta = np.concatenate([v.numpy().ravel() for v in variables]).astype(np.float64)
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x))
        grad = np.concatenate([np.asarray(g, np.float64).ravel()
                               for g in tape.gradient(loss, variables)])
        fisher = _exact_fisher(model, x)
        logs = step(x, y)
        delta = np.concatenate([v.numpy().ravel() for v in variables]) - theta
        predicted = 0.5 * delta @ fisher @ delta + grad @ delta
        np.testing.assert_allclose(float(logs["qmodel_change"]), predicted, rtol=2e-3)


# ---------------------------------------------------- multi-block layers
#: Each layer kind's Kronecker matrices, written out independently of the
#: blocks: a function of the update (by variable) -> list of matrices.
LAYOUTS = {
    "chain": lambda u: [np.concatenate([u[0], u[1][None]], 0),
                        np.concatenate([u[2], u[3][None]], 0)],
    "lstm": lambda u: [np.concatenate([u[0], u[1], u[2][None]], 0)],
    "gru": lambda u: [np.concatenate([u[0], u[2][:1]], 0),
                      np.concatenate([u[1], u[2][1:]], 0)],
    # groups=2 of Conv2D(4 -> 6): group g = output channels 3g..3g+2 (its
    # rows' order does not change the singular values).
    "grouped_conv": lambda u: [
        np.concatenate([u[0][..., 3 * g:3 * g + 3].reshape(-1, 3),
                        u[1][None, 3 * g:3 * g + 3]], 0) for g in range(2)],
    # DepthwiseConv2D(depth_multiplier=2) on 3 channels: channel c writes 2c, 2c+1.
    "depthwise": lambda u: [
        np.concatenate([u[0][:, :, c, :].reshape(-1, 2), u[1][None, 2 * c:2 * c + 2]], 0)
        for c in range(3)],
    "separable": lambda u: [u[0][:, :, c, :].reshape(-1, 2) for c in range(3)]
    + [np.concatenate([u[1].reshape(-1, 4), u[2][None]], 0)],
}


def _multi_block_model(kind):
    keras.utils.set_random_seed(0)
    if kind == "chain":
        inputs = keras.Input((3,))
        h = keras.layers.Dense(4, activation="tanh", name="first")(inputs)
        h = keras.layers.Dense(3, activation="tanh", name="second")(h)
        return keras.Model(inputs, h), (32, 3)
    if kind in ("lstm", "gru"):
        inputs = keras.Input((5, 2))
        layer = (keras.layers.LSTM(2, name="rnn") if kind == "lstm"
                 else keras.layers.GRU(2, name="rnn"))
        return keras.Model(inputs, layer(inputs)), (32, 5, 2)
    inputs = keras.Input((6, 6, 4 if kind == "grouped_conv" else 3))
    if kind == "grouped_conv":
        layer = keras.layers.Conv2D(6, 2, groups=2, name="conv")
    elif kind == "depthwise":
        layer = keras.layers.DepthwiseConv2D(2, depth_multiplier=2, name="conv")
    else:
        layer = keras.layers.SeparableConv2D(4, 2, depth_multiplier=2, name="conv")
    h = keras.layers.GlobalAveragePooling2D()(layer(inputs))
    return keras.Model(inputs, h), (32, 6, 6, inputs.shape[-1])


@pytest.mark.parametrize("kind", ["chain", "lstm", "gru", "grouped_conv", "depthwise",
                                  "separable"])
def test_each_kronecker_matrix_is_orthogonalised(kind):
    """With many iterations each matrix of the update (in the layout written
    out above) is `lr * 0.2 sqrt(max dims)` times a matrix whose singular
    values lie in Newton-Schulz's band; orthogonalising the layer's variables
    together, or in another split, would not give that."""
    model, x_shape = _multi_block_model(kind)
    rng = np.random.default_rng(9)
    x = rng.normal(size=x_shape).astype("float32")
    y = rng.normal(size=(x_shape[0],) + tuple(model.output.shape[1:])).astype("float32")
    lr = 0.01
    optimizer = kfac_keras.KFAC(
        step_rule="orthogonal", orthogonal_iterations=12, learning_rate=lr, momentum=0.0,
        adaptive=None, cov_update_every=1, seed=0,
        approximation="tridiagonal" if kind == "chain" else "block_diagonal")
    step = kfac_keras.make_train_step(model, optimizer, "mse")
    kinds = {type(b).__name__ for b in optimizer.registration.blocks}
    assert not kinds & {"DiagonalBlock", "IdentityBlock"}, kinds
    before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    step(x, y)
    update = [v.numpy() - b for v, b in zip(model.trainable_variables, before)]
    matrices = LAYOUTS[kind](update)
    for matrix in matrices:
        scale = lr * 0.2 * np.sqrt(max(matrix.shape))
        singular = np.linalg.svd(-matrix / scale, compute_uv=False)
        assert singular.min() > 0.66 and singular.max() < 1.15, (matrix.shape, singular)


# ---------------------------------------------------------------- options
def test_orthogonal_is_the_default_and_kl_clip_resolves_its_own():
    kl_clip = kfac_keras.KFAC(step_rule="kl_clip")
    assert kl_clip.get_config()["orthogonal_iterations"] is None
    assert float(kl_clip.learning_rate) == 1.0
    assert kl_clip.norm_constraint == 1e-4
    restored = kfac_keras.KFAC.from_config(kl_clip.get_config())
    assert restored.step_rule == "kl_clip" and float(restored.learning_rate) == 1.0
    orthogonal = kfac_keras.KFAC()
    assert orthogonal.step_rule == "orthogonal"
    assert orthogonal.get_config()["orthogonal_iterations"]["iterations"] == 3
    assert orthogonal.nesterov and orthogonal.get_config()["nesterov"] is True
    assert kl_clip.nesterov is False and kl_clip.get_config()["nesterov"] is False
    assert not kfac_keras.KFAC(step_rule="kl_clip", adaptive=dict(
        quadratic_model_step=True)).nesterov
    assert kfac_keras.KFAC.from_config(kfac_keras.KFAC(nesterov=False).get_config()).nesterov \
        is False
    assert float(orthogonal.learning_rate) == pytest.approx(1e-2)
    assert orthogonal.norm_constraint == 1e-4  # for the variables it does not orthogonalise
    config = kfac_keras.KFAC(step_rule="orthogonal", orthogonal_iterations=5).get_config()
    restored = kfac_keras.KFAC.from_config(config)
    assert restored.step_rule == "orthogonal"
    assert restored.get_config()["orthogonal_iterations"] == 5


def test_orthogonal_dtype_resolves_and_round_trips():
    assert kfac_keras.KFAC(step_rule="kl_clip").get_config()["orthogonal_dtype"] is None
    assert kfac_keras.KFAC(step_rule="orthogonal").get_config()["orthogonal_dtype"] == "float32"
    config = kfac_keras.KFAC(step_rule="orthogonal", orthogonal_dtype="bfloat16").get_config()
    assert config["orthogonal_dtype"] == "bfloat16"
    restored = kfac_keras.KFAC.from_config(config)
    assert restored.get_config()["orthogonal_dtype"] == "bfloat16"
    assert restored._orthogonal_step.dtype == "bfloat16"


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(step_rule="muon"), ValueError, "step_rule"),
    (dict(step_rule="orthogonal", orthogonal_iterations=0), ValueError,
     "orthogonal_iterations"),
    (dict(step_rule="orthogonal", orthogonal_iterations=2.5), TypeError,
     "orthogonal_iterations"),
    (dict(step_rule="orthogonal", orthogonal_iterations=True), TypeError,
     "orthogonal_iterations"),
    (dict(nesterov="yes"), TypeError, "`nesterov` must be a bool"),
    (dict(step_rule="kl_clip", nesterov=True, adaptive=dict(quadratic_model_step=True)),
     ValueError, "nesterov=True cannot be combined"),
    (dict(orthogonal_iterations={"iterations": 3, "large_iterations": 2}), ValueError,
     "exactly the keys.*large_min_dim"),
    (dict(orthogonal_iterations={"iterations": 3, "large_iterations": 0,
                                 "large_min_dim": 500}), ValueError,
     r"orthogonal_iterations\['large_iterations'\]"),
    (dict(orthogonal_iterations={"iterations": 3, "large_iterations": 2,
                                 "large_min_dim": 5e2}), TypeError,
     r"orthogonal_iterations\['large_min_dim'\].*integer"),
    (dict(step_rule="kl_clip", orthogonal_iterations={"iterations": 3}), ValueError,
     "only applies to step_rule='orthogonal'"),
    (dict(step_rule="kl_clip", orthogonal_iterations=3), ValueError,
     "only applies to step_rule='orthogonal'"),
    (dict(step_rule="kl_clip", orthogonal_dtype="bfloat16"), ValueError,
     "orthogonal_dtype.*only applies to step_rule='orthogonal'"),
    (dict(step_rule="kl_clip", orthogonal_dtype="float32"), ValueError,
     "orthogonal_dtype.*only applies"),
    (dict(step_rule="orthogonal", orthogonal_dtype="float16"), ValueError,
     r"orthogonal_dtype.*one of \('float32', 'bfloat16'\).*'float16'"),
    (dict(step_rule="orthogonal", orthogonal_dtype=tf.bfloat16), TypeError,
     "orthogonal_dtype.*must be a string"),
    (dict(step_rule="orthogonal", adaptive=dict(quadratic_model_step=True)), ValueError,
     "quadratic_model_step"),
    (dict(adaptive=dict(quadratic_model_step=True)), ValueError, "step_rule='kl_clip'"),
])
def test_orthogonal_options_are_validated(kwargs, error, message):
    with pytest.raises(error, match=message):
        kfac_keras.KFAC(**kwargs)


def test_two_replicas_match_one_device():
    """Under MirroredStrategy (2 CPU replicas), with the Levenberg-Marquardt
    rule: weights, optimizer state and logs equal a one-device run
    (`tests/distributed_scenarios.py`)."""
    from distributed_scenarios import run_scenario

    output = run_scenario("mirrored_equivalence", ["orthogonal"], timeout=220)
    assert "PASS orthogonal/loop" in output, output
    assert "PASS orthogonal/loop/damping_adapted" in output, output


# ------------------------------------------- the benchmarks' Muon variant
def test_benchmark_muon_bfloat16_matches_the_float64_loop_and_muon():
    """`benchmarks.optimizers.MuonBfloat16` (Muon with bfloat16 products, the
    baseline raced against `orthogonal_dtype="bfloat16"`): its Newton-Schulz
    against the float64 loop within the bounds above (not float32's ~1e-6),
    and one training step close to Keras's Muon."""
    from benchmarks.optimizers import MuonBfloat16

    matrix, u, v = _ill_conditioned((40, 24), 0)
    expected = numpy_newton_schulz(matrix, 3)
    got = MuonBfloat16().zeropower_via_newtonschulz5(tf.constant(matrix, tf.float32), 3)
    assert got.dtype == tf.float32
    got = got.numpy()
    frobenius = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert 1e-3 < frobenius < BF16_FROBENIUS_TOLERANCE
    assert (np.abs(np.diag(u.T @ got @ v) - np.diag(u.T @ expected @ v)).max()
            < BF16_SINGULAR_VALUE_TOLERANCE)
    rng = np.random.default_rng(13)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    updates = []
    for optimizer_class in (keras.optimizers.Muon, MuonBfloat16):
        model = two_layer_model()
        optimizer = optimizer_class(learning_rate=0.01, exclude_layers=["out"])
        before = [v.numpy() for v in model.trainable_variables]
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))
        updates.append(np.concatenate([(v.numpy() - b).ravel()
                                       for v, b in zip(model.trainable_variables, before)]))
    error = np.linalg.norm(updates[1] - updates[0]) / np.linalg.norm(updates[0])
    assert 1e-4 < error < 0.05, error


def test_blocks_declare_their_kronecker_matrices():
    """The block contract's hook (`kronecker_matrices` and its inverse)
    against the layouts written out with NumPy: `[K; b]` for Dense and each
    layer of a tridiagonal chain, `[W; b_input]` and `[U; b_recurrent]` for a
    GRU, the depthwise kernel per channel and `[P; b]` for a separable
    convolution; None for a LayerNormalization block."""
    sequence = keras.Input((4, 3))
    hidden = keras.layers.GRU(5, name="gru")(sequence)
    hidden = keras.layers.LayerNormalization(name="norm")(hidden)
    hidden = keras.layers.Dense(6, name="first")(hidden)
    output = keras.layers.Dense(2, name="second")(hidden)
    model = keras.Model(sequence, output)
    image = keras.Input((5, 5, 2))
    separable = keras.Sequential([image, keras.layers.SeparableConv2D(
        3, 3, depth_multiplier=2, name="separable")])
    chain = kfac_keras.register(model, approximation="tridiagonal")
    blocks = {b.name: b for b in kfac_keras.register(model).blocks + chain.blocks
              + kfac_keras.register(separable).blocks}
    rng = np.random.default_rng(0)

    def check(block, expected):
        grads = [tf.constant(rng.normal(size=v.shape), tf.float32) for v in block.variables]
        values = [g.numpy() for g in grads]
        matrices = block.kronecker_matrices(grads)
        assert len(matrices) == len(expected(values))
        for matrix, want in zip(matrices, expected(values)):
            np.testing.assert_array_equal(np.asarray(matrix), want)
        for back, grad in zip(block.grads_from_kronecker_matrices(matrices), values):
            np.testing.assert_array_equal(np.asarray(back), grad)

    gru = next(b for name, b in blocks.items() if name.endswith("gru"))
    check(gru, lambda g: [np.vstack([g[0], g[2][:1]]), np.vstack([g[1], g[2][1:]])])
    dense = next(b for name, b in blocks.items() if name.endswith("second"))
    check(dense, lambda g: [np.vstack([g[0], g[1][None]])])
    tridiagonal = next(b for name, b in blocks.items() if name.startswith("chain["))
    check(tridiagonal, lambda g: [np.vstack([g[0], g[1][None]]), np.vstack([g[2], g[3][None]])])
    separable_block = next(b for name, b in blocks.items() if name.endswith("separable"))
    # Depthwise kernel (3, 3, 2, 2): one (9 offsets, 2 multipliers) matrix per channel.
    check(separable_block, lambda g: [np.transpose(g[0].reshape(9, 2, 2), (1, 0, 2)),
                                      np.vstack([g[1].reshape(4, 3), g[2][None]])])
    norm = next(b for name, b in blocks.items() if name.endswith("norm"))
    grads = [tf.ones_like(v) for v in norm.variables]
    assert norm.kronecker_matrices(grads) is None
    with pytest.raises(ValueError, match="no Kronecker matrices"):
        norm.grads_from_kronecker_matrices([])
