"""KFC blocks for Conv1D/2D/3D against NumPy (patches by explicit loops).

Oracles: `block_helpers.numpy_patches` builds every patch with Python loops
over examples, output positions and kernel offsets (padding from TF's SAME
formula written out independently); exact Fishers come from per-example
Jacobians (separate tapes / `tape.jacobian`) and the analytic output Hessian
of squared error. Float32 code against float64 oracles: relative tolerance
1e-5 for factors and products unless stated.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from block_helpers import (built, channels_last, seeded_layer, exact_fisher, kfac_factors, kronecker_damped_solve,
                           numpy_patches, pseudo_sample_captures, relative_error, with_ones)
from kfac_keras.blocks.conv import ConvBlock, GroupedConvBlock, make_conv_block
from kfac_keras.blocks.patches import extract_patches

CONFIGS = [
    ("1d valid stride", keras.layers.Conv1D, (2, 9, 3), dict(kernel_size=3, strides=2)),
    ("1d causal dilated", keras.layers.Conv1D, (2, 9, 3),
     dict(kernel_size=3, padding="causal", dilation_rate=2)),
    ("1d same stride", keras.layers.Conv1D, (2, 9, 3),
     dict(kernel_size=4, padding="same", strides=2)),
    ("2d same stride", keras.layers.Conv2D, (2, 7, 6, 3),
     dict(kernel_size=3, padding="same", strides=2)),
    ("2d same dilated", keras.layers.Conv2D, (2, 7, 8, 3),
     dict(kernel_size=(2, 3), padding="same", dilation_rate=2)),
    ("2d valid strides", keras.layers.Conv2D, (2, 7, 8, 3),
     dict(kernel_size=(2, 3), strides=(2, 3))),
    ("2d channels_first", keras.layers.Conv2D, (2, 3, 6, 5),
     dict(kernel_size=3, padding="same", data_format="channels_first")),
    ("2d groups", keras.layers.Conv2D, (2, 6, 5, 4), dict(kernel_size=3, padding="same", groups=2)),
    ("3d same strides", keras.layers.Conv3D, (2, 4, 5, 4, 2),
     dict(kernel_size=(2, 3, 2), padding="same", strides=(1, 2, 2))),
    ("3d valid dilated", keras.layers.Conv3D, (2, 5, 5, 4, 2),
     dict(kernel_size=2, dilation_rate=(2, 1, 2))),
]


def _layer(cls, shape, kwargs, filters=4, seed=0):
    return seeded_layer(cls, shape, kwargs, filters, seed)


def _oracle_patches(layer, x):
    return numpy_patches(channels_last(x, layer), layer.kernel_size, layer.strides,
                         layer.dilation_rate, layer.padding)


@pytest.mark.parametrize("name,cls,shape,kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_patches_times_kernel_equal_layer_output(name, cls, shape, kwargs):
    layer, x = _layer(cls, shape, kwargs)
    patches = _oracle_patches(layer, x)
    kernel = layer.kernel.numpy().astype(np.float64)
    groups = layer.groups
    k = patches.shape[-2]
    c_in, filters = kernel.shape[-2], kernel.shape[-1]
    kernel = kernel.reshape(k, c_in, groups, filters // groups)
    parts = []
    for g in range(groups):
        group_patches = patches[..., g * c_in:(g + 1) * c_in]
        parts.append(np.einsum("...kc,kcf->...f", group_patches, kernel[:, :, g]))
    expected = np.concatenate(parts, axis=-1) + layer.bias.numpy()
    output = channels_last(layer(x), layer)
    np.testing.assert_allclose(expected, output, rtol=1e-5, atol=1e-5)
    library = extract_patches(tf.constant(x), layer.kernel_size, layer.strides,
                              layer.dilation_rate, layer.padding, layer.data_format)
    np.testing.assert_array_equal(library.numpy(), patches.astype(np.float32))


def _random_grads(layer, x, seed):
    out_shape = layer(x).shape
    return np.random.default_rng(seed).normal(size=out_shape).astype("float32")


@pytest.mark.parametrize("name,cls,shape,kwargs",
                         [c for c in CONFIGS if "groups" not in c[3]],
                         ids=[c[0] for c in CONFIGS if "groups" not in c[3]])
def test_conv_block_factors_match_numpy(name, cls, shape, kwargs):
    layer, x = _layer(cls, shape, kwargs)
    grads = _random_grads(layer, x, seed=3)
    block = built(make_conv_block(layer))
    assert isinstance(block, ConvBlock)
    a, g = block.compute_factors([(tf.constant(x), tf.constant(grads))], tf.constant(2.0))
    rows = with_ones(_oracle_patches(layer, x).reshape(-1, block.input_dim - 1))
    a_np, g_np = kfac_factors(rows, channels_last(grads, layer), num_examples=2)
    assert relative_error(a, a_np) < 1e-5
    assert relative_error(g, g_np) < 1e-5


def test_shared_conv_pools_uses_as_locations():
    """Two calls on inputs of different sizes: A sums over all locations of
    both uses, G divides by m * (|T_1| + |T_2|)."""
    layer = keras.layers.Conv2D(3, 2, strides=1, padding="valid")
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(2, 4, 4, 2)).astype("float32")
    x2 = rng.normal(size=(2, 5, 3, 2)).astype("float32")
    g1 = rng.normal(size=layer(x1).shape).astype("float32")
    g2 = rng.normal(size=layer(x2).shape).astype("float32")
    block = built(make_conv_block(layer))
    a, g = block.compute_factors([(x1, g1), (x2, g2)], tf.constant(2.0))
    rows = np.concatenate([
        with_ones(numpy_patches(x, (2, 2), (1, 1), (1, 1), "valid").reshape(2, -1, 8))
        for x in (x1, x2)], axis=1)
    grads = np.concatenate([g1.reshape(2, -1, 3), g2.reshape(2, -1, 3)], axis=1)
    assert rows.shape[1] == 9 + 8
    a_np = np.einsum("nti,ntj->ij", rows, rows) / 2
    g_np = np.einsum("nti,ntj->ij", grads, grads) / (2 * 17)
    assert relative_error(a, a_np) < 1e-5
    assert relative_error(g, g_np) < 1e-5


def test_grouped_conv_block_is_one_kronecker_pair_per_group():
    layer, x = _layer(keras.layers.Conv2D, (3, 5, 5, 4), dict(kernel_size=3, padding="same",
                                                             groups=2), filters=6)
    grads = _random_grads(layer, x, seed=5)
    block = built(make_conv_block(layer))
    assert isinstance(block, GroupedConvBlock)
    assert block.factor_shapes() == {"input_factor": (2, 19, 19),
                                     "output_grad_factor": (2, 3, 3)}
    a, g = block.compute_factors([(x, grads)], tf.constant(3.0))
    patches = numpy_patches(x, (3, 3), (1, 1), (1, 1), "same")
    for group in range(2):
        rows = with_ones(patches[..., 2 * group:2 * group + 2].reshape(-1, 18))
        a_np, g_np = kfac_factors(rows, grads[..., 3 * group:3 * group + 3], 3)
        assert relative_error(a[group], a_np) < 1e-5
        assert relative_error(g[group], g_np) < 1e-5


def _fill_factors(block, captures, num_examples):
    block.update_statistics(captures, None, tf.constant(float(num_examples)), 0.0)


@pytest.mark.parametrize("method", ["cholesky", "inverse", "eigh"])
def test_conv_damped_inverse_matches_dense_kronecker(method):
    layer, x = _layer(keras.layers.Conv2D, (4, 5, 5, 2), dict(kernel_size=2, strides=2))
    grads = _random_grads(layer, x, seed=1)
    block = built(ConvBlock(layer, inverse_method=method))
    _fill_factors(block, [(x, grads)], 4)
    damping = 0.03
    block.update_inverses(tf.constant(damping))
    rng = np.random.default_rng(2)
    dk = rng.normal(size=layer.kernel.shape).astype("float32")
    db = rng.normal(size=layer.bias.shape).astype("float32")
    out_k, out_b = block.multiply_damped_inverse([dk, db], damping)
    v = np.concatenate([dk.reshape(-1, 4), db[None]], axis=0)
    expected = kronecker_damped_solve(block.input_factor.numpy(),
                                      block.output_grad_factor.numpy(), v, damping, method)
    actual = np.concatenate([out_k.numpy().reshape(-1, 4), out_b.numpy()[None]], axis=0)
    assert relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_grouped_damped_inverse_matches_block_diagonal(method):
    layer, x = _layer(keras.layers.Conv1D, (3, 7, 4), dict(kernel_size=2, groups=2), filters=4)
    grads = _random_grads(layer, x, seed=4)
    block = built(make_conv_block(layer, method))
    _fill_factors(block, [(x, grads)], 3)
    damping = 0.05
    block.update_inverses(tf.constant(damping))
    rng = np.random.default_rng(7)
    dk = rng.normal(size=layer.kernel.shape).astype("float32")
    db = rng.normal(size=layer.bias.shape).astype("float32")
    out_k, out_b = block.multiply_damped_inverse([dk, db], damping)
    # Kernel (k, c_in_group, filters): group g owns output channels 2g, 2g+1.
    for group in range(2):
        cols = slice(2 * group, 2 * group + 2)
        v = np.concatenate([dk[:, :, cols].reshape(-1, 2), db[None, cols]], axis=0)
        expected = kronecker_damped_solve(block.input_factor.numpy()[group],
                                          block.output_grad_factor.numpy()[group],
                                          v, damping, method)
        actual = np.concatenate([out_k.numpy()[:, :, cols].reshape(-1, 2),
                                 out_b.numpy()[None, cols]], axis=0)
        assert relative_error(actual, expected) < 1e-4


def _captured_pass(model, layer, x, targets):
    """Forward under capture; returns (inputs, preact, d sum_n l_n / d preact)."""
    registration = kfac_keras.register(model)
    with tf.GradientTape() as tape:
        with registration.capture() as recorder:
            y = model(x, training=True)
        objective = tf.reduce_sum(tf.square(y - targets))
    (inputs, preact), = recorder.for_layer(layer)
    return inputs.numpy(), preact.numpy(), tape.gradient(objective, preact).numpy()


def test_captured_rows_give_per_example_gradients():
    """sum_t abar_{n,t} g_{n,t}^T (captured inputs, explicit-loop patches,
    gradients w.r.t. the captured pre-activation) equals example n's gradient
    from its own tape, for a strided conv with a tanh inside the layer."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 6, 6, 2)).astype("float32")
    targets = rng.normal(size=(3, 2)).astype("float32")
    conv = keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="tanh",
                               bias_initializer="random_normal", name="conv")
    model = keras.Sequential([keras.Input((6, 6, 2)), conv, keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    inputs, preact, grads = _captured_pass(model, conv, x, targets)
    patches = with_ones(numpy_patches(inputs, (3, 3), (2, 2), (1, 1), "same").reshape(3, -1, 18))
    kernel = np.concatenate([conv.kernel.numpy().reshape(18, 3), conv.bias.numpy()[None]])
    np.testing.assert_allclose(np.einsum("nti,io->nto", patches, kernel),
                               preact.reshape(3, -1, 3), rtol=1e-5, atol=1e-5)
    # The block's per-example rows (used by EKFAC) give the same matrices.
    rows_in, rows_grad = ConvBlock(conv).per_example_rows([(inputs, grads)])
    from_block = np.einsum("nti,nto->nio", rows_in.numpy(), rows_grad.numpy())
    for n in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x[n:n + 1], training=True) - targets[n]))
        dk, db = tape.gradient(loss, [conv.kernel, conv.bias])
        expected = np.concatenate([dk.numpy().reshape(18, 3), db.numpy()[None]])
        actual = patches[n].T @ grads[n].reshape(-1, 3)
        assert relative_error(actual, expected) < 1e-5
        assert relative_error(from_block[n], expected) < 1e-5


# ------------------------------------------------------------- vs exact Fisher
def test_kfc_equals_exact_fisher_for_single_linear_conv_with_squared_error():
    """Theory: with a linear conv whose every output is a squared-error target,
    derivatives are independent of activations (linear net), spatially
    uncorrelated and homogeneous (i.i.d. Gaussian noise per output), so all
    three KFC assumptions hold and `A (x) G` is the exact Fisher block."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4, 4, 2)).astype("float32")
    conv = keras.layers.Conv2D(2, 2, strides=1, padding="valid", name="conv")
    model = keras.Sequential([keras.Input((4, 4, 2)), conv, keras.layers.Flatten()])
    captures, _, _ = pseudo_sample_captures(model, conv, x)
    block = built(ConvBlock(conv))
    a, g = block.compute_factors(captures, tf.constant(5.0))
    exact = exact_fisher(model, [conv.kernel, conv.bias], x)
    assert relative_error(np.kron(a.numpy(), g.numpy()), exact) < 1e-5


def test_kfc_differs_from_exact_fisher_when_derivatives_are_spatially_correlated():
    """Conv -> Flatten -> Dense, all linear, squared error. Independence still
    holds (linear net), but a Dense layer reading every location correlates
    the derivatives across locations, so the *spatially uncorrelated
    derivatives* assumption fails (and homogeneity with it): `A (x) G` is not
    the exact block. Checked instead:
    (1) the exact block equals `mean_n sum_{t,s} abar_t abar_s^T (x) C_ts`
        with `C_ts = E[g_t g_s^T]` (independence is the only thing used);
    (2) the bias-bias part of `A (x) G` equals that of the SUD approximation,
        `sum_t C_tt` (no homogeneity is needed there because the homogeneous
        coordinate is 1 everywhere), while the exact one, `sum_{t,s} C_ts`,
        differs.
    """
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4, 4, 1)).astype("float32")
    conv = keras.layers.Conv2D(2, 2, strides=1, padding="valid", name="conv")
    model = keras.Sequential([keras.Input((4, 4, 1)), conv, keras.layers.Flatten(),
                              keras.layers.Dense(3, name="head")])
    captures, inputs, grad_rows = pseudo_sample_captures(model, conv, x)
    block = built(ConvBlock(conv))
    a, g = block.compute_factors(captures, tf.constant(6.0))
    kfc = np.kron(a.numpy(), g.numpy())
    exact = exact_fisher(model, [conv.kernel, conv.bias], x)
    assert relative_error(kfc, exact) > 0.05  # the approximation is not exact here

    patches = with_ones(numpy_patches(inputs, (2, 2), (1, 1), (1, 1), "valid").reshape(6, 9, 4))
    # Linear net: the derivatives do not depend on the example.
    rows = grad_rows.reshape(3, 6, 9, 2).astype(np.float64)
    np.testing.assert_allclose(rows, np.broadcast_to(rows[:, :1], rows.shape), atol=1e-6)
    cross = np.einsum("kti,ksj->tisj", rows[:, 0], rows[:, 0])  # C_ts[i, j]
    decomposed = np.einsum("nta,nsb,tisj->aibj", patches, patches, cross).reshape(10, 10) / 6
    assert relative_error(decomposed, exact) < 1e-5

    sud_bias = sum(cross[t, :, t, :] for t in range(9))
    exact_bias = cross.sum(axis=(0, 2))
    bias_rows = slice(8, 10)
    np.testing.assert_allclose(kfc[bias_rows, bias_rows], sud_bias, rtol=1e-5, atol=1e-7)
    assert relative_error(exact[bias_rows, bias_rows], sud_bias) > 0.05
    np.testing.assert_allclose(exact[bias_rows, bias_rows], exact_bias, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("padding", ["same", "valid", "causal"])
def test_patches_with_unknown_sequence_length(padding):
    """Inside a tf.function whose input length is unknown (variable-length
    sequences), the padding and output size are computed on tensors."""
    layer, x = _layer(keras.layers.Conv1D, (2, 9, 3),
                      dict(kernel_size=3, padding=padding, strides=2, dilation_rate=1))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3])])
    def patches(inputs):
        return extract_patches(inputs, layer.kernel_size, layer.strides,
                               layer.dilation_rate, layer.padding)

    expected = numpy_patches(x, (3,), (2,), (1,), padding)
    np.testing.assert_array_equal(patches(tf.constant(x)).numpy(), expected.astype(np.float32))
