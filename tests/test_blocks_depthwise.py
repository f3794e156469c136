"""Per-channel KFC blocks for depthwise and separable convolutions vs NumPy.

Oracles: explicit-loop patches (`block_helpers.numpy_patches`), depthwise
and pointwise outputs recomputed in NumPy, per-example gradients from
separate tapes, dense `np.kron` solves per channel. Tolerance: 1e-5 relative
for factors and gradients, 1e-4 for damped-inverse products (float32 code).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from block_helpers import (built, kfac_factors, kronecker_damped_solve, numpy_patches,
                           relative_error, with_ones)
from kfac_keras.blocks.depthwise import DepthwiseConvBlock, SeparableConvBlock


def _depthwise(shape=(3, 6, 5, 3), **kwargs):
    kwargs.setdefault("depth_multiplier", 2)
    layer = keras.layers.DepthwiseConv2D(
        bias_initializer=keras.initializers.RandomNormal(seed=1),
        depthwise_initializer=keras.initializers.RandomNormal(seed=0), **kwargs)
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    return layer, x, layer(x).numpy()


def _depthwise_numpy(patches, kernel):
    """`out[..., c*M + j] = sum_k P[..., k, c] W[k, c, j]`."""
    out = np.einsum("...kc,kcj->...cj", patches, kernel)
    return out.reshape(out.shape[:-2] + (-1,))


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, strides=2, padding="same"),
    dict(kernel_size=(2, 3), dilation_rate=2, padding="same", depth_multiplier=1),
    dict(kernel_size=2, padding="valid", depth_multiplier=3),
])
def test_depthwise_factors_per_channel_match_numpy(kwargs):
    layer, x, output = _depthwise(**kwargs)
    patches = numpy_patches(x, layer.kernel_size, layer.strides, layer.dilation_rate,
                            layer.padding)
    k = patches.shape[-2]
    multiplier = layer.depth_multiplier
    kernel = layer.kernel.numpy().reshape(k, 3, multiplier)
    np.testing.assert_allclose(_depthwise_numpy(patches, kernel) + layer.bias.numpy(),
                               output, rtol=1e-5, atol=1e-5)
    grads = np.random.default_rng(1).normal(size=output.shape).astype("float32")
    block = built(DepthwiseConvBlock(layer))
    a, g = block.compute_factors([(x, grads)], tf.constant(3.0))
    assert a.shape == (3, k + 1, k + 1) and g.shape == (3, multiplier, multiplier)
    for c in range(3):
        a_np, g_np = kfac_factors(with_ones(patches[..., c].reshape(-1, k)),
                                  grads[..., c * multiplier:(c + 1) * multiplier], 3)
        assert relative_error(a[c], a_np) < 1e-5
        assert relative_error(g[c], g_np) < 1e-5


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_depthwise_damped_inverse_is_block_diagonal_kronecker(method):
    layer, x, output = _depthwise(kernel_size=2, padding="valid")
    grads = np.random.default_rng(2).normal(size=output.shape).astype("float32")
    block = built(DepthwiseConvBlock(layer, inverse_method=method))
    block.update_statistics([(x, grads)], None, tf.constant(3.0), 0.0)
    damping = 0.02
    block.update_inverses(tf.constant(damping))
    rng = np.random.default_rng(3)
    dk = rng.normal(size=layer.kernel.shape).astype("float32")
    db = rng.normal(size=layer.bias.shape).astype("float32")
    out_k, out_b = block.multiply_damped_inverse([dk, db], damping)
    for c in range(3):
        v = np.concatenate([dk[:, :, c, :].reshape(4, 2), db[None, 2 * c:2 * c + 2]])
        expected = kronecker_damped_solve(block.input_factor.numpy()[c],
                                          block.output_grad_factor.numpy()[c],
                                          v, damping, method)
        actual = np.concatenate([out_k.numpy()[:, :, c, :].reshape(4, 2),
                                 out_b.numpy()[None, 2 * c:2 * c + 2]])
        assert relative_error(actual, expected) < 1e-4


def _captured(model, layer, x, targets):
    registration = kfac_keras.register(model)
    with tf.GradientTape() as tape:
        with registration.capture() as recorder:
            y = model(x, training=True)
        objective = tf.reduce_sum(tf.square(y - targets))
    (inputs, preact), = recorder.for_layer(layer)
    return inputs.numpy(), preact.numpy(), tape.gradient(objective, preact).numpy()


def _per_example_grads(model, variables, x, targets, n):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(x[n:n + 1], training=True) - targets[n]))
    return [g.numpy() for g in tape.gradient(loss, variables)]


def test_depthwise_captures_give_per_example_gradients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 5, 2)).astype("float32")
    targets = rng.normal(size=(3, 2)).astype("float32")
    layer = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2,
                                         activation="tanh", bias_initializer="random_normal")
    model = keras.Sequential([keras.Input((5, 5, 2)), layer, keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    inputs, preact, grads = _captured(model, layer, x, targets)
    patches = numpy_patches(inputs, (3, 3), (2, 2), (1, 1), "same").reshape(3, -1, 9, 2)
    kernel = layer.kernel.numpy().reshape(9, 2, 2)
    np.testing.assert_allclose(_depthwise_numpy(patches, kernel) + layer.bias.numpy(),
                               preact.reshape(3, -1, 4), rtol=1e-5, atol=1e-5)
    grads = grads.reshape(3, -1, 2, 2)  # (n, t, channel, multiplier)
    for n in range(3):
        dk, db = _per_example_grads(model, [layer.kernel, layer.bias], x, targets, n)
        expected_k = np.einsum("tkc,tcj->kcj", patches[n], grads[n])
        assert relative_error(dk.reshape(9, 2, 2), expected_k) < 1e-5
        assert relative_error(db, grads[n].sum(0).reshape(-1)) < 1e-5


def _separable(x_shape=(3, 6, 6, 2)):
    layer = keras.layers.SeparableConv2D(
        3, 3, strides=2, padding="same", depth_multiplier=2, activation="tanh",
        bias_initializer=keras.initializers.RandomNormal(seed=2),
        depthwise_initializer=keras.initializers.RandomNormal(seed=3),
        pointwise_initializer=keras.initializers.RandomNormal(seed=4), name="separable")
    model = keras.Sequential([keras.Input(x_shape[1:]), layer, keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    return layer, model


def test_separable_captures_give_per_example_gradients():
    """Both kernels: depthwise outputs u and their gradients P g recomputed in
    NumPy from the captured input and pre-activation gradient reproduce each
    example's gradients from its own tape."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 6, 6, 2)).astype("float32")
    targets = rng.normal(size=(3, 2)).astype("float32")
    layer, model = _separable()
    inputs, preact, grads = _captured(model, layer, x, targets)
    patches = numpy_patches(inputs, (3, 3), (2, 2), (1, 1), "same").reshape(3, -1, 9, 2)
    depthwise = layer.depthwise_kernel.numpy().reshape(9, 2, 2)
    pointwise = layer.pointwise_kernel.numpy().reshape(4, 3)
    middle = _depthwise_numpy(patches, depthwise)  # (n, t, 4)
    np.testing.assert_allclose(middle @ pointwise + layer.bias.numpy(),
                               preact.reshape(3, -1, 3), rtol=1e-5, atol=1e-5)
    grads = grads.reshape(3, -1, 3)
    middle_grads = (grads @ pointwise.T).reshape(3, -1, 2, 2)
    variables = [layer.depthwise_kernel, layer.pointwise_kernel, layer.bias]
    for n in range(3):
        dd, dp, db = _per_example_grads(model, variables, x, targets, n)
        assert relative_error(dd.reshape(9, 2, 2),
                              np.einsum("tkc,tcj->kcj", patches[n], middle_grads[n])) < 1e-5
        assert relative_error(np.concatenate([dp.reshape(4, 3), db[None]]),
                              with_ones(middle[n]).T @ grads[n]) < 1e-5


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_separable_block_factors_and_products(method):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 6, 6, 2)).astype("float32")
    layer, model = _separable()
    model(x)
    grads = rng.normal(size=(3, 3, 3, 3)).astype("float32")  # pre-activation gradients
    block = built(SeparableConvBlock(layer, inverse_method=method))
    block.update_statistics([(x, grads)], None, tf.constant(3.0), 0.0)
    patches = numpy_patches(x, (3, 3), (2, 2), (1, 1), "same").reshape(-1, 9, 2)
    depthwise = layer.depthwise_kernel.numpy().reshape(9, 2, 2)
    pointwise = layer.pointwise_kernel.numpy().reshape(4, 3)
    middle = _depthwise_numpy(patches, depthwise)
    rows = grads.reshape(-1, 3)
    a_np, g_np = kfac_factors(with_ones(middle), rows, 3)
    part = block.pointwise_part
    assert relative_error(part.input_factor.numpy(), a_np) < 1e-5
    assert relative_error(part.output_grad_factor.numpy(), g_np) < 1e-5
    middle_grads = (rows @ pointwise.T).reshape(-1, 2, 2)
    for c in range(2):
        a_c, g_c = kfac_factors(patches[:, :, c], middle_grads[:, c], 3)
        assert relative_error(block.depthwise_part.input_factor.numpy()[c], a_c) < 1e-5
        assert relative_error(block.depthwise_part.output_grad_factor.numpy()[c], g_c) < 1e-5

    damping = 0.05
    block.update_inverses(tf.constant(damping))
    dd = rng.normal(size=layer.depthwise_kernel.shape).astype("float32")
    dp = rng.normal(size=layer.pointwise_kernel.shape).astype("float32")
    db = rng.normal(size=layer.bias.shape).astype("float32")
    out_d, out_p, out_b = block.multiply_damped_inverse([dd, dp, db], damping)
    expected = kronecker_damped_solve(part.input_factor.numpy(),
                                      part.output_grad_factor.numpy(),
                                      np.concatenate([dp.reshape(4, 3), db[None]]),
                                      damping, method)
    assert relative_error(np.concatenate([out_p.numpy().reshape(4, 3), out_b.numpy()[None]]),
                          expected) < 1e-4
    for c in range(2):
        expected = kronecker_damped_solve(block.depthwise_part.input_factor.numpy()[c],
                                          block.depthwise_part.output_grad_factor.numpy()[c],
                                          dd.reshape(9, 2, 2)[:, c], damping, method)
        assert relative_error(out_d.numpy().reshape(9, 2, 2)[:, c], expected) < 1e-4


def test_depthwise_and_separable_train_with_kfac():
    """A tiny model with both layer kinds trains under model.fit + K-FAC
    (loss decreases) and is registered with the per-channel blocks."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 8, 8, 2)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32")
    model = keras.Sequential([
        keras.Input((8, 8, 2)),
        keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw"),
        keras.layers.SeparableConv2D(4, 3, strides=2, activation="relu", name="sep"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2, name="head")])
    model.compile(optimizer=kfac_keras.KFAC(learning_rate=0.05, damping=0.05, seed=0,
                                            cov_update_every=1, inv_update_every=5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    kinds = {info["layer_class"]: info["kind"]
             for info in model.optimizer.registration.describe()}
    assert kinds["DepthwiseConv2D"] == DepthwiseConvBlock.kind
    assert kinds["SeparableConv2D"] == SeparableConvBlock.kind
