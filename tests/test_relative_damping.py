"""`KFAC(damping_mode="relative")`: each block damped with `lambda` times its
curvature's mean eigenvalue, so the steps do not change with the loss's scale.

Oracles: dense NumPy `kron` / `inv` with `lambda_l = lambda (tr A/dim A)
(tr G/dim G)` (Kronecker blocks), `lambda mean(diag F)` (diagonal blocks);
for the invariance, the same model trained with the loss and with 784 times
the loss (the mean vs the sum over outputs), which must take the same steps.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from block_helpers import built, kronecker_damped_solve, relative_error, with_ones
from kfac_keras.blocks.dense import DenseBlock
from kfac_keras.blocks.diagonal import DiagonalBlock


def _dense_layer(seed=0):
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    rng = np.random.default_rng(seed)
    layer.kernel.assign(rng.normal(size=(4, 3)).astype("float32"))
    layer.bias.assign(rng.normal(size=(3,)).astype("float32"))
    return layer


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
@pytest.mark.parametrize("loss_scale", [1.0, 784.0])
def test_kronecker_block_matches_dense_kron_with_relative_lambda(method, loss_scale):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4)).astype("float32")
    # Output gradients of `loss_scale` times a loss scale G by loss_scale^2.
    grads = (loss_scale * rng.normal(size=(6, 3))).astype("float32")
    block = built(DenseBlock(_dense_layer(), inverse_method=method))
    block.set_damping_mode("relative")
    block.update_statistics([(x, grads)], None, tf.constant(6.0), 0.0)
    damping = 0.05
    block.update_inverses(tf.constant(damping))
    dk = rng.normal(size=(4, 3)).astype("float32")
    db = rng.normal(size=(3,)).astype("float32")
    out_k, out_b = block.multiply_damped_inverse([dk, db], tf.constant(damping))
    # Independent factors and lambda_l, in float64.
    rows = with_ones(x)
    a = rows.T @ rows / 6.0
    g = grads.astype(np.float64).T @ grads.astype(np.float64) / 6.0
    block_lambda = damping * (np.trace(a) / 5) * (np.trace(g) / 3)
    expected = kronecker_damped_solve(a, g, np.concatenate([dk, db[None]]), block_lambda,
                                      method)
    actual = np.concatenate([out_k.numpy(), out_b.numpy()[None]])
    assert relative_error(actual, expected) < 1e-4
    if method == "cholesky":
        # The factored split: each factor gets sqrt(lambda) times its own mean eigenvalue.
        damped_a = a + np.sqrt(damping) * np.trace(a) / 5 * np.eye(5)
        damped_g = g + np.sqrt(damping) * np.trace(g) / 3 * np.eye(3)
        split = np.linalg.solve(damped_a, np.concatenate([dk, db[None]])) @ np.linalg.inv(
            damped_g)
        assert relative_error(actual, split) < 1e-4


def test_absolute_mode_is_unchanged_and_differs_from_relative():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4)).astype("float32")
    grads = (30.0 * rng.normal(size=(6, 3))).astype("float32")
    v = rng.normal(size=(5, 3))
    outputs = {}
    for mode in ("absolute", "relative"):
        block = built(DenseBlock(_dense_layer(), inverse_method="cholesky"))
        block.set_damping_mode(mode)
        block.update_statistics([(x, grads)], None, tf.constant(6.0), 0.0)
        block.update_inverses(tf.constant(0.05))
        out_k, out_b = block.multiply_damped_inverse(
            [v[:4].astype("float32"), v[4].astype("float32")], tf.constant(0.05))
        outputs[mode] = np.concatenate([out_k.numpy(), out_b.numpy()[None]])
    rows = with_ones(x)
    a, g = rows.T @ rows / 6.0, grads.astype(np.float64).T @ grads.astype(np.float64) / 6.0
    assert relative_error(outputs["absolute"],
                          kronecker_damped_solve(a, g, v, 0.05, "cholesky")) < 1e-4
    assert relative_error(outputs["absolute"], outputs["relative"]) > 1e-2


def test_diagonal_block_damped_with_mean_diagonal():
    variable = keras.Variable(np.zeros((2, 3), np.float32))
    block = built(DiagonalBlock("diag", [variable]))
    block.set_damping_mode("relative")
    rng = np.random.default_rng(4)
    summed = (100.0 * rng.normal(size=(2, 3))).astype("float32")
    block.update_statistics(None, [summed], tf.constant(4.0), 0.0)
    g = rng.normal(size=(2, 3)).astype("float32")
    (out,) = block.multiply_damped_inverse([g], tf.constant(0.1))
    fisher = summed.astype(np.float64) ** 2 / 4.0
    expected = g / (fisher + 0.1 * fisher.mean())
    assert relative_error(out.numpy(), expected) < 1e-5


def _autoencoder(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12,))
    h = keras.layers.Dense(6, activation="tanh")(inputs)
    code = keras.layers.Dense(3)(h)
    h = keras.layers.Dense(6, activation="tanh")(code)
    return keras.Model(inputs, keras.layers.Dense(12)(h))


def _weights_after_fit_steps(reduction, damping_mode, steps=6):
    """The weights after each of `steps` fit steps at the defaults (besides the
    mode), with the cross-entropy averaged over the batch (`"sum_over_batch_size"`)
    or summed (`"sum"`: 32 x the loss)."""
    rng = np.random.default_rng(0)
    x = (rng.random((32, 12)) > 0.5).astype("float32")
    model = _autoencoder(0)
    model.compile(optimizer=kfac_keras.KFAC(damping_mode=damping_mode, seed=1),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True, reduction=reduction))
    callback = kfac_keras.KFACCallback(verbose=0)
    weights = []
    for _ in range(steps):
        model.fit(x, x, batch_size=32, epochs=1, verbose=0, shuffle=False, callbacks=[callback])
        weights.append(np.concatenate([w.numpy().ravel() for w in model.trainable_weights]))
    return np.array(weights)


def _update_difference(damping_mode):
    initial = np.concatenate([w.numpy().ravel() for w in _autoencoder(0).trainable_weights])
    mean = _weights_after_fit_steps("sum_over_batch_size", damping_mode) - initial
    summed = _weights_after_fit_steps("sum", damping_mode) - initial
    return np.max(np.abs(mean - summed)) / np.max(np.abs(mean))


def test_loss_times_32_takes_the_same_steps_at_the_defaults():
    # damping_mode=None is KFAC()'s default: relative damping for the orthogonal rule.
    assert _update_difference(None) < 1e-5
    assert _update_difference("relative") < 1e-5


def test_loss_times_32_changes_the_steps_with_absolute_damping():
    # The check above can fail: with absolute damping the same runs differ.
    assert _update_difference("absolute") > 1e-3


def test_damping_mode_is_validated_and_in_the_config():
    with pytest.raises(ValueError, match="damping_mode"):
        kfac_keras.KFAC(damping_mode="scaled")
    with pytest.raises(ValueError, match="quadratic-model step"):
        kfac_keras.KFAC(damping_mode="relative", learning_rate=None, momentum=None,
                        step_rule="kl_clip",
                        adaptive=kfac_keras.AdaptiveOptions(quadratic_model_step=True))
    assert kfac_keras.KFAC(damping_mode="relative").get_config()["damping_mode"] == "relative"
    assert kfac_keras.KFAC(damping=1e-2).get_config()["damping_mode"] == "absolute"
    assert kfac_keras.KFAC().get_config()["damping_mode"] == "relative"


def test_scale_shift_block_damped_with_its_mean_second_moment():
    from kfac_keras.blocks.scale_shift import ScaleShiftBlock
    rng = np.random.default_rng(5)
    norm = keras.layers.BatchNormalization()
    norm.build((None, 3, 4))
    block = built(ScaleShiftBlock(norm))
    block.set_damping_mode("relative")
    tangent = rng.normal(size=(6, 3, 4)).astype("float32")
    grads = (50.0 * rng.normal(size=(6, 3, 4))).astype("float32")
    block.update_statistics([(tangent, grads)], None, tf.constant(6.0), 0.0)
    per_example = [(tangent * grads).sum(1), grads.sum(1)]  # dscale, dshift: (n, c)
    v = [rng.normal(size=(4,)).astype("float32") for _ in range(2)]
    out = block.multiply_damped_inverse(v, tf.constant(0.07))
    block_lambda = 0.07 * np.mean([np.mean(np.square(p.astype(np.float64)), 0)
                                   for p in per_example])
    for c in range(4):
        rows = np.stack([p[:, c] for p in per_example], axis=1).astype(np.float64)
        expected = np.linalg.solve(rows.T @ rows / 6 + block_lambda * np.eye(2),
                                   [vi[c] for vi in v])
        assert relative_error([o.numpy()[c] for o in out], expected) < 1e-5


@pytest.mark.parametrize("method", ["cholesky", "eigh", "ekfac"])
def test_relative_mode_trains_grouped_composite_and_normalization_blocks(method):
    """Grouped convolution (one scale per group), separable convolution and GRU
    (per part), LayerNorm (scale-shift): finite steps that lower the loss."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(4, 3, groups=2, activation="tanh")(inputs)
    h = keras.layers.SeparableConv2D(4, 2, activation="tanh")(h)
    h = keras.layers.Reshape((9, 4))(h)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.GRU(5)(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6, 6, 4)).astype("float32")
    y = rng.integers(0, 3, size=32)
    model.compile(optimizer=kfac_keras.KFAC(damping_mode="relative", damping=1.0,
                                            inverse_method=method, seed=0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, batch_size=32, epochs=8, verbose=0, shuffle=False,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.evaluate(x, y, verbose=0) < before
