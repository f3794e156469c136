"""KFC blocks for Conv1D/2D/3DTranspose against NumPy.

Oracles (float64, no kfac_keras code): `_numpy_conv_transpose` computes the
layer's output by scattering every input location through every kernel
offset with Python loops (padding from TF's SAME formula on the output
length); `block_helpers.numpy_patches` builds the output-gradient patches by
loops; per-example gradients come from one tape per example; exact Fishers
from per-example Jacobians and the squared-error output Hessian.

Vec ordering: the block's matrix is `V = reshape(dW, (k F, C))^T` (rows =
input channels `c`, columns = (kernel offset, filter)), and `F ~= A (x) G`
in the row-major `vec(V)`.
"""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from block_helpers import (built, channels_last, seeded_layer, exact_fisher, kfac_factors, kronecker_damped_solve,
                           numpy_patches, pseudo_sample_captures, relative_error,
                           same_padding)
from kfac_keras.blocks.conv_transpose import (ConvTransposeBlock,
                                              conv_transpose_unsupported_reason,
                                              make_conv_transpose_block)

CONFIGS = [
    ("1d valid stride", keras.layers.Conv1DTranspose, (2, 4, 3), dict(kernel_size=3, strides=2)),
    ("1d same stride", keras.layers.Conv1DTranspose, (2, 5, 3),
     dict(kernel_size=4, strides=2, padding="same")),
    ("1d valid output_padding", keras.layers.Conv1DTranspose, (2, 4, 2),
     dict(kernel_size=3, strides=3, output_padding=2)),
    ("1d same dilated", keras.layers.Conv1DTranspose, (2, 6, 2),
     dict(kernel_size=3, padding="same", dilation_rate=2)),
    ("2d same stride", keras.layers.Conv2DTranspose, (2, 3, 4, 3),
     dict(kernel_size=3, strides=2, padding="same")),
    ("2d valid strides", keras.layers.Conv2DTranspose, (2, 3, 2, 2),
     dict(kernel_size=(2, 3), strides=(2, 3))),
    ("2d same output_padding", keras.layers.Conv2DTranspose, (2, 3, 3, 2),
     dict(kernel_size=3, strides=2, padding="same", output_padding=(1, 0))),
    ("2d channels_first", keras.layers.Conv2DTranspose, (2, 3, 3, 4),
     dict(kernel_size=2, strides=2, padding="same", data_format="channels_first")),
    ("3d same strides", keras.layers.Conv3DTranspose, (2, 2, 3, 2, 2),
     dict(kernel_size=(2, 3, 2), strides=(1, 2, 2), padding="same")),
    ("3d valid dilated", keras.layers.Conv3DTranspose, (2, 2, 3, 2, 2),
     dict(kernel_size=2, dilation_rate=(2, 1, 2))),
]
IDS = [c[0] for c in CONFIGS]


def _layer(cls, shape, kwargs, filters=3, seed=0):
    return seeded_layer(cls, shape, kwargs, filters, seed)


def _pads_before(layer, output_spatial):
    pads = []
    for i, size in enumerate(output_spatial):
        if layer.padding == "valid":
            pads.append(0)
        else:
            pads.append(same_padding(size, layer.kernel_size[i], layer.strides[i],
                                     layer.dilation_rate[i])[0])
    return pads


def _numpy_conv_transpose(layer, x, output_spatial):
    """y[n, u, f] = sum over (s, o) with u = s*stride + o*dilation - pad of
    x[n, s, :] . W[o, f, :], plus the bias; channels-last, by loops."""
    x = channels_last(x, layer).astype(np.float64)
    kernel = layer.kernel.numpy().astype(np.float64)
    rank = len(layer.kernel_size)
    pads = _pads_before(layer, output_spatial)
    y = np.zeros((x.shape[0],) + tuple(output_spatial) + (kernel.shape[-2],))
    for s in itertools.product(*[range(n) for n in x.shape[1:-1]]):
        for o in itertools.product(*[range(k) for k in layer.kernel_size]):
            u = tuple(s[i] * layer.strides[i] + o[i] * layer.dilation_rate[i] - pads[i]
                      for i in range(rank))
            if all(0 <= u[i] < output_spatial[i] for i in range(rank)):
                y[(slice(None),) + u] += x[(slice(None),) + s] @ kernel[o].T
    return y + layer.bias.numpy()


def _oracle_patches(layer, grads):
    """Output-gradient patches `(B, *input_spatial, k, F)` by loops."""
    return numpy_patches(channels_last(grads, layer), layer.kernel_size, layer.strides,
                         layer.dilation_rate, layer.padding)


def _random_grads(layer, x, seed):
    return np.random.default_rng(seed).normal(size=layer(x).shape).astype("float32")


@pytest.mark.parametrize("name,cls,shape,kwargs", CONFIGS, ids=IDS)
def test_numpy_scatter_reproduces_layer(name, cls, shape, kwargs):
    """Pins the oracle's geometry (padding, output_padding, dilation) to the
    layer's: otherwise the gradient oracle below would test nothing."""
    layer, x = _layer(cls, shape, kwargs)
    output = channels_last(layer(x), layer)
    expected = _numpy_conv_transpose(layer, x, output.shape[1:-1])
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,cls,shape,kwargs", CONFIGS, ids=IDS)
def test_kernel_gradient_is_sum_of_input_times_gradient_patch(name, cls, shape, kwargs):
    """The derivation: dl/dW = sum_s P_s(g) x_s^T, per example, with `g` the
    gradient w.r.t. the layer's output (tape) and loop-built patches."""
    layer, x = _layer(cls, shape, kwargs)
    weights = tf.constant(_random_grads(layer, x, seed=5))
    for n in range(x.shape[0]):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(weights[n:n + 1] * tf.tanh(layer(x[n:n + 1])))
        y = layer(x[n:n + 1])
        with tf.GradientTape() as output_tape:
            output_tape.watch(y)
            same_loss = tf.reduce_sum(weights[n:n + 1] * tf.tanh(y))
        output_grad = output_tape.gradient(same_loss, y).numpy()
        kernel_grad = tape.gradient(loss, layer.kernel).numpy()
        k, filters, channels = np.prod(layer.kernel_size), kernel_grad.shape[-2], x.shape[
            1 if layer.data_format == "channels_first" else -1]
        patches = _oracle_patches(layer, output_grad).reshape(-1, k * filters)
        inputs = channels_last(x[n:n + 1], layer).reshape(-1, channels)
        expected = (patches.T @ inputs).reshape(kernel_grad.shape)
        assert relative_error(kernel_grad, expected) < 1e-5


@pytest.mark.parametrize("name,cls,shape,kwargs", CONFIGS, ids=IDS)
def test_factors_match_numpy(name, cls, shape, kwargs):
    layer, x = _layer(cls, shape, kwargs)
    grads = _random_grads(layer, x, seed=3)
    block = built(make_conv_transpose_block(layer))
    assert isinstance(block, ConvTransposeBlock)
    assert block.variables == [layer.kernel]
    a, g = block.compute_factors([(tf.constant(x), tf.constant(grads))], tf.constant(2.0))
    inputs = channels_last(x, layer).reshape(-1, block.input_dim)
    patches = _oracle_patches(layer, grads).reshape(-1, block.output_dim)
    a_np, g_np = kfac_factors(inputs, patches, num_examples=2)
    assert relative_error(a, a_np) < 1e-5
    assert relative_error(g, g_np) < 1e-5


def test_shared_layer_pools_uses_as_locations():
    layer = keras.layers.Conv2DTranspose(2, 2, strides=2)
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(2, 2, 2, 3)).astype("float32")
    x2 = rng.normal(size=(2, 3, 1, 3)).astype("float32")
    g1, g2 = (rng.normal(size=layer(x).shape).astype("float32") for x in (x1, x2))
    block = built(ConvTransposeBlock(layer))
    a, g = block.compute_factors([(x1, g1), (x2, g2)], tf.constant(2.0))
    inputs = np.concatenate([x1.reshape(-1, 3), x2.reshape(-1, 3)])
    patches = np.concatenate([_oracle_patches(layer, g1).reshape(-1, 8),
                              _oracle_patches(layer, g2).reshape(-1, 8)])
    a_np, g_np = kfac_factors(inputs, patches, num_examples=2)
    assert relative_error(a, a_np) < 1e-5
    assert relative_error(g, g_np) < 1e-5


@pytest.mark.parametrize("method", ["cholesky", "inverse", "eigh"])
def test_damped_inverse_matches_dense_kronecker(method):
    layer, x = _layer(keras.layers.Conv2DTranspose, (4, 3, 3, 2),
                      dict(kernel_size=2, strides=2))
    grads = _random_grads(layer, x, seed=1)
    block = built(ConvTransposeBlock(layer, inverse_method=method))
    block.update_statistics([(x, grads)], None, tf.constant(4.0), 0.0)
    damping = 0.03
    block.update_inverses(tf.constant(damping))
    dk = np.random.default_rng(2).normal(size=layer.kernel.shape).astype("float32")
    (out_k,) = block.multiply_damped_inverse([dk], damping)
    # V = reshape(dW, (k F, C))^T: rows input channels, columns (offset, filter).
    v = dk.reshape(-1, 2).T
    expected = kronecker_damped_solve(block.input_factor.numpy(),
                                      block.output_grad_factor.numpy(), v, damping, method)
    assert relative_error(out_k.numpy().reshape(-1, 2).T, expected) < 1e-4


def _captured(model, layer, x, targets):
    registration = kfac_keras.register(model)
    with tf.GradientTape() as tape:
        with registration.capture() as recorder:
            y = model(x, training=True)
        objective = tf.reduce_sum(tf.square(y - targets))
    (inputs, preact), = recorder.for_layer(layer)
    return inputs, tape.gradient(objective, preact)


def _tiny_decoder(activation="tanh"):
    layer = keras.layers.Conv2DTranspose(2, 3, strides=2, padding="same",
                                         activation=activation, name="deconv")
    model = keras.Sequential([keras.Input((3, 3, 2)), layer, keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    return model, layer


def test_per_example_rows_give_per_example_gradients():
    """The block's rows (from a real capture, activation inside the layer)
    rebuild each example's kernel gradient from its own tape."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 3, 3, 2)).astype("float32")
    targets = rng.normal(size=(3, 3)).astype("float32")
    model, layer = _tiny_decoder()
    inputs, grads = _captured(model, layer, x, targets)
    block = ConvTransposeBlock(layer)
    rows_in, rows_grad = block.per_example_rows([(inputs, grads)])
    from_rows = np.einsum("nsi,nso->nio", rows_in.numpy(), rows_grad.numpy())
    for n in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x[n:n + 1], training=True) - targets[n]))
        dk = tape.gradient(loss, layer.kernel).numpy()
        assert relative_error(from_rows[n], dk.reshape(-1, 2).T) < 1e-5


def test_ekfac_scalings_match_numpy_per_example_gradients():
    """EKFAC's corrected diagonal mean_n (Q_A^T dW_n Q_G)^2, with dW_n from
    per-example tapes and the eigenbases from NumPy."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 3, 2)).astype("float32")
    targets = rng.normal(size=(4, 3)).astype("float32")
    model, layer = _tiny_decoder()
    inputs, grads = _captured(model, layer, x, targets)
    block = built(ConvTransposeBlock(layer, inverse_method="ekfac"))
    block.update_statistics([(inputs, grads)], None, tf.constant(4.0), 0.0)
    block.update_inverses(tf.constant(0.01))
    block.update_scalings([(inputs, grads)], tf.constant(4.0), 0.95)
    q_a = block.input_eigenvectors.numpy().astype(np.float64)
    q_g = block.output_grad_eigenvectors.numpy().astype(np.float64)
    # The library's bases must be eigenbases of the NumPy factors.
    a_np, g_np = kfac_factors(inputs.numpy().reshape(-1, 2),
                              _oracle_patches(layer, grads.numpy()).reshape(-1, 18), 4)
    for q, factor in ((q_a, a_np), (q_g, g_np)):
        rotated = q.T @ factor @ q
        off_diagonal = rotated - np.diag(np.diag(rotated))
        assert np.linalg.norm(off_diagonal) < 1e-4 * np.linalg.norm(factor)
    expected = np.zeros((2, 18))
    for n in range(4):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x[n:n + 1], training=True) - targets[n]))
        dk = tape.gradient(loss, layer.kernel).numpy().astype(np.float64)
        expected += (q_a.T @ dk.reshape(-1, 2).T @ q_g) ** 2 / 4
    assert relative_error(block.eigenbasis_scalings.numpy(), expected) < 1e-4


def _exact_kernel_fisher_in_block_order(model, layer, x):
    """Exact Fisher of the kernel, permuted from the kernel's row-major
    (offset, filter, channel) order to vec(V)'s (channel, offset, filter)."""
    exact = exact_fisher(model, [layer.kernel], x)
    shape = layer.kernel.shape
    order = np.arange(np.prod(shape)).reshape(-1, shape[-1]).T.reshape(-1)
    return exact[np.ix_(order, order)]


def test_kfc_is_exact_for_non_overlapping_linear_transposed_conv():
    """Linear layer, every output a squared-error target, kernel == stride
    ('valid'): the output-gradient patches at different input locations are
    disjoint sets of i.i.d. noise, so they are uncorrelated and homogeneous,
    and independent of the inputs: `A (x) G` is the exact kernel block."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 2, 3, 2)).astype("float32")
    layer = keras.layers.Conv2DTranspose(2, 2, strides=2, use_bias=False, name="deconv")
    model = keras.Sequential([keras.Input((2, 3, 2)), layer, keras.layers.Flatten()])
    captures, _, _ = pseudo_sample_captures(model, layer, x)
    a, g = built(ConvTransposeBlock(layer)).compute_factors(captures, tf.constant(5.0))
    exact = _exact_kernel_fisher_in_block_order(model, layer, x)
    assert relative_error(np.kron(a.numpy(), g.numpy()), exact) < 1e-5


def test_kfc_is_not_exact_when_patches_overlap():
    """Stride 1, kernel 2: neighbouring patches share output locations, so
    their gradients are correlated and KFC is an approximation (this test
    fails if the exactness test above is vacuous)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 2, 3, 2)).astype("float32")
    layer = keras.layers.Conv2DTranspose(2, 2, strides=1, use_bias=False, name="deconv")
    model = keras.Sequential([keras.Input((2, 3, 2)), layer, keras.layers.Flatten()])
    captures, _, _ = pseudo_sample_captures(model, layer, x)
    a, g = built(ConvTransposeBlock(layer)).compute_factors(captures, tf.constant(5.0))
    exact = _exact_kernel_fisher_in_block_order(model, layer, x)
    assert relative_error(np.kron(a.numpy(), g.numpy()), exact) > 0.05


def test_unsupported_geometry_has_a_reason_and_gets_the_diagonal_block():
    """'same' padding, an even kernel and output_padding=0: the output is one
    element shorter than the adjoint convolution needs."""
    layer = keras.layers.Conv1DTranspose(2, 2, strides=2, padding="same", output_padding=0)
    layer.build((None, 4, 3))
    reason = conv_transpose_unsupported_reason(layer)
    assert reason is not None and "output_padding" in reason
    with pytest.raises(kfac_keras.blocks.errors.UnsupportedLayerError, match="output_padding"):
        ConvTransposeBlock(layer)
    supported = keras.layers.Conv1DTranspose(2, 2, strides=2, padding="same")
    supported.build((None, 4, 3))
    assert conv_transpose_unsupported_reason(supported) is None


@pytest.mark.parametrize("cls,shape", [(keras.layers.Conv1DTranspose, (4, 2)),
                                       (keras.layers.Conv2DTranspose, (3, 3, 2)),
                                       (keras.layers.Conv3DTranspose, (2, 2, 2, 2))])
def test_registration_gives_kernel_kronecker_and_bias_diagonal(cls, shape):
    model = keras.Sequential([keras.Input(shape), cls(3, 2, strides=2, name="deconv")])
    registration = kfac_keras.register(model)
    kinds = {info["kind"]: info for info in registration.describe()}
    kernel_info = next(i for k, i in kinds.items() if k.startswith("kronecker"))
    assert kernel_info["variables"] == [model.layers[0].kernel.path]
    bias_info = kinds["diagonal"]
    assert bias_info["variables"] == [model.layers[0].bias.path]
    assert "not covered by the kronecker" in bias_info["note"]


def test_fit_with_defaults_trains_conv_autoencoder():
    rng = np.random.default_rng(0)
    # Smooth 8x8 images: a learnable low-dimensional structure.
    grid = np.linspace(-1, 1, 8)
    centres = rng.uniform(-0.6, 0.6, size=(128, 2))
    x = np.exp(-((grid[None, :, None] - centres[:, 0, None, None]) ** 2
                 + (grid[None, None, :] - centres[:, 1, None, None]) ** 2) / 0.2)
    x = x[..., None].astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", activation="relu",
                                     name="decoder_1"),
        keras.layers.Conv2DTranspose(1, 3, strides=2, padding="same", name="decoder_2"),
    ])
    model.compile(optimizer=kfac_keras.KFAC(), loss="mse")
    initial = model.evaluate(x, x, verbose=0)
    model.fit(x, x, batch_size=32, epochs=24, verbose=0,
              callbacks=[kfac_keras.KFACCallback(verbose=0)])
    final = model.evaluate(x, x, verbose=0)
    # The orthogonal default moves every matrix by a fixed RMS, small on these
    # 4-channel kernels: a standalone run reached 0.85x the initial loss after
    # 8 epochs and 0.77x after 24 (Adam at its defaults: 0.89x, 0.69x; the
    # KL-clipped rule, the default before, 0.18-0.39x after 8); this bound
    # leaves room for the noise of the sampled targets.
    assert final < 0.85 * initial, (initial, final)
    kinds = {}
    for info in model.optimizer.registration.describe():
        kinds.setdefault(info["block"].split("/")[-1], set()).add(info["kind"].split(" (")[0])
    assert kinds["decoder_1"] == kinds["decoder_2"] == {"kronecker", "diagonal"}
