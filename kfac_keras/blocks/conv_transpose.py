"""KFC blocks for `Conv1DTranspose`, `Conv2DTranspose` and `Conv3DTranspose`.

Derivation. A transposed convolution is the adjoint of a convolution. Write
`conv(z; W)` for the convolution with the layer's kernel size, strides,
dilation and padding that maps a tensor `z` shaped like the layer's *output*
(`F = filters` channels) to one shaped like its *input* (`C` channels); its
kernel has Keras's transposed-conv layout `(*kernel_size, F, C)`, which is
exactly a `Conv*D` kernel from `F` to `C` channels. With `P_s(z)` the patch
of `z` at location `s` (flattened offsets-major, channels-minor, see
`kfac_keras.blocks.patches`) and `K = reshape(W, (k F, C))`, `k =
prod(kernel_size)`:

    conv(z; W)[s, :] = P_s(z) @ K.

The layer computes `y = conv_transpose(x; W)`, defined (TensorFlow computes
it as the input gradient of `conv`) by `<z, y> = <conv(z; W), x>` for every
`z`, i.e.

    <z, y> = sum_s P_s(z) @ K @ x_s     (s over the INPUT locations).

Taking `z = g = dl/dy`, the output gradient, gives the kernel gradient of one
example:

    dl/dK = sum_s P_s(g) x_s^T,   i.e.   V := (dl/dK)^T = sum_s x_s P_s(g)^T.

This has the form of a convolution's gradient `sum_t abar_t g_t^T` with the
roles moved: the "locations" are the input locations `s`, the input side
is the plain input vector `x_s` (length `C`) and the output side is the
*patch of the output gradient* `P_s(g)` (length `k F`). So KFC (Grosse &
Martens 2016, KFAC_NOTES section 6) applies to `V`, with the same three
assumptions (independence of `x` and `g`, spatial homogeneity, spatially
uncorrelated `x_s P_s(g)^T` terms):

    A = (1/m) sum_{n,s} x_{n,s} x_{n,s}^T                       (C x C)
    G = (1/(m |S|)) sum_{n,s} P_s(g_n) P_s(g_n)^T               (kF x kF)

over the `m` examples of the statistics subset and the `|S|` input
locations, the same `1/|S|` convention as `ConvBlock` and `DenseBlock`. The
block's matrix is `V = reshape(dW, (k F, C))^T`, so its row-major `vec` is
`vec(V)` and `F ~= A (x) G` in that ordering.

Bias. The bias acts on the *output* locations, `y[u, f] += b[f]`, so
`dl/db = sum_u g_u`. A homogeneous coordinate on `x` would give
`sum_s P_s(g)`, which sums each offset's share of the output locations; it
equals `dl/db` (summed over offsets) only when every output location is
covered by the same number of (location, offset) pairs, which is false at
the borders and for most stride/kernel pairs. So the bias is left out of the
Kronecker block: the registration gives it a diagonal block (the diagonal
Fisher `E[(dl/db_f)^2]` from the same sampled backward pass; the report
says "not covered by the kronecker block"). The kernel-bias cross terms of
the Fisher are thereby dropped, as between layers.

Geometry. Padding `valid`/`same`, strides, dilation (Keras allows it with
stride 1 only), `output_padding` and `channels_first` are the layer's own:
the patches of `g` are those of the forward convolution on the output
shape, which is how TensorFlow defines the transposed convolution, so they
line up with `x` location by location. A layer whose output length is not
one that this forward convolution maps back to the input length (e.g.
`padding="same"`, an even kernel and `output_padding=0`) is rejected by
`conv_transpose_unsupported_reason` and gets the diagonal block.

Shared layers: every call is recorded and the uses' locations are pooled
(`|S|` counts all of them), as in `ConvBlock`.

Memory: `A` has `C^2` and `G` `(k F)^2` floats, plus the same again for the
inverses or eigenvectors. An estimate materialises the output-gradient
patches of the statistics subset, `m |S| k F` floats, transiently, every
`cov_update_every` steps.
"""

import tensorflow as tf

from kfac_keras.blocks.base import layer_name
from kfac_keras.blocks.errors import UnsupportedLayerError
from kfac_keras.blocks.factors import location_factors
from kfac_keras.blocks.kronecker import (KroneckerBlock, join_location_weights, split_capture,
                                         static_or_dynamic_sizes)
from kfac_keras.blocks.patches import ConvGeometry, extract_patches, to_channels_last

#: Input lengths checked per spatial axis by `conv_transpose_unsupported_reason`.
_CHECKED_LENGTHS = range(1, 33)


def _forward_conv_length(output_length, kernel, stride, dilation, padding):
    """Length of the forward convolution (the adjoint) on `output_length`."""
    effective = (kernel - 1) * dilation + 1
    if padding == "valid":
        return (output_length - effective) // stride + 1
    return -(-output_length // stride)


def _spatial_axes(layer):
    rank = len(layer.kernel_size)
    if layer.data_format == "channels_first":
        return list(range(2, 2 + rank))
    return list(range(1, 1 + rank))


def _mismatched_axis(layer):
    """First `(axis, input length)` whose output the adjoint convolution does
    not map back to the input length, or None."""
    rank = len(layer.kernel_size)
    axes = _spatial_axes(layer)
    channels = 1 if layer.data_format == "channels_first" else 1 + rank
    for i in range(rank):
        for length in _CHECKED_LENGTHS:
            shape = [1] + [1] * (rank + 1)
            shape[axes[i]] = length
            shape[channels] = int(layer.kernel.shape[-1])
            output_length = layer.compute_output_shape(tuple(shape))[axes[i]]
            if output_length is None or output_length < 1:
                continue
            back = _forward_conv_length(output_length, layer.kernel_size[i],
                                        layer.strides[i], layer.dilation_rate[i],
                                        layer.padding)
            if back != length:
                return i, length
    return None


def conv_transpose_unsupported_reason(layer):
    """Why a Keras transposed convolution cannot get a KFC block, or None."""
    if getattr(layer, "lora_enabled", False):
        return "LoRA-enabled transposed convolutions are not Kronecker-factored"
    if getattr(layer, "quantization_mode", None):
        return "quantized transposed convolutions are not Kronecker-factored"
    if layer.padding not in ("valid", "same"):
        return (f"padding={layer.padding!r} is not a transposed-convolution padding "
                "this block knows (valid, same)")
    if layer.data_format not in ("channels_last", "channels_first"):
        return f"data_format={layer.data_format!r} is unknown"
    mismatch = _mismatched_axis(layer)
    if mismatch is not None:
        axis, length = mismatch
        return (f"with padding={layer.padding!r}, kernel_size={layer.kernel_size}, "
                f"strides={layer.strides} and output_padding={layer.output_padding}, "
                f"spatial axis {axis} of length {length} gives an output that the "
                "adjoint convolution does not map back to the input, so its patches "
                "do not line up with the input locations; use the default "
                "output_padding=None or an odd kernel")
    return None


class ConvTransposeBlock(KroneckerBlock):
    """KFC block `A (x) G` of a transposed convolution's kernel.

    `A` is the second moment of the layer's input vectors (one per input
    location), `G` that of the output-gradient patches at the same locations
    (see the module docstring). The bias, if any, is not covered: the
    registration gives it a diagonal block.

    Args:
        layer: a built `Conv1DTranspose`, `Conv2DTranspose` or
            `Conv3DTranspose` that `conv_transpose_unsupported_reason`
            accepts.
        inverse_method: see `KroneckerBlock`. Defaults to `"cholesky"`.

    Raises:
        UnsupportedLayerError: if `conv_transpose_unsupported_reason` gives a
            reason.
    """

    kind = "kronecker (transposed conv, KFC on output-gradient patches)"

    def __init__(self, layer, inverse_method="cholesky"):
        reason = conv_transpose_unsupported_reason(layer)
        if reason is not None:
            raise UnsupportedLayerError(reason)
        # The patch geometry is the forward convolution's (the adjoint's patches
        # are taken on the output side with the same kernel, strides, dilation).
        geometry = ConvGeometry(layer)
        self.kernel_size, self.strides = geometry.kernel_size, geometry.strides
        self.dilation_rate, self.padding = geometry.dilation_rate, geometry.padding
        self.data_format, self.num_offsets = geometry.data_format, geometry.num_offsets
        kernel = layer.kernel
        self.kernel_shape = tuple(int(d) for d in kernel.shape)
        self.filters = self.kernel_shape[-2]
        self.in_channels = self.kernel_shape[-1]
        super().__init__(
            name=layer_name(layer),
            variables=[kernel],
            layer=layer,
            input_dim=self.in_channels,
            output_dim=self.num_offsets * self.filters,
            inverse_method=inverse_method,
        )

    def grads_to_matrix(self, grads):
        return tf.transpose(tf.reshape(grads[0], [self.output_dim, self.input_dim]))

    def matrix_to_grads(self, matrix):
        return [tf.reshape(tf.transpose(matrix), self.kernel_shape)]

    def per_example_rows(self, captures):
        """`(m, S, C)` input rows and `(m, S, k F)` output-gradient patch rows,
        the uses of a shared layer concatenated along the location axis `S`
        (for EKFAC, see `KroneckerBlock`)."""
        input_rows, patch_rows = [], []
        for inputs, grads, _ in (split_capture(c) for c in captures):
            inputs = to_channels_last(tf.cast(inputs, tf.float32), self.data_format)
            patches = extract_patches(tf.cast(grads, tf.float32), self.kernel_size,
                                      self.strides, self.dilation_rate, self.padding,
                                      self.data_format)
            examples = tf.shape(inputs)[0]
            input_rows.append(tf.reshape(inputs, [examples, -1, self.input_dim]))
            patch_rows.append(tf.reshape(patches, [examples, -1, self.output_dim]))
        return tf.concat(input_rows, axis=1), tf.concat(patch_rows, axis=1)

    def per_example_weights(self, captures):
        """Row weights `(m, S)` of the input locations (those of the rows), or None."""
        sizes = []
        for inputs, _, _ in (split_capture(c) for c in captures):
            inputs = to_channels_last(inputs, self.data_format)
            sizes.append((tf.shape(inputs)[0],
                          static_or_dynamic_sizes(inputs, range(1, len(inputs.shape) - 1))))
        return join_location_weights(captures, sizes)

    def compute_factors(self, captures, num_examples):
        input_rows, patch_rows = self.per_example_rows(captures)
        input_rows = tf.reshape(input_rows, [-1, self.input_dim])
        patch_rows = tf.reshape(patch_rows, [-1, self.output_dim])
        # `A` over input locations, `G` over the same locations' patches.
        return location_factors(input_rows, patch_rows, num_examples,
                                self._flat_weights(captures))


def make_conv_transpose_block(layer, inverse_method="cholesky"):
    """`ConvTransposeBlock` for a registered transposed convolution.

    Args:
        layer: a built `Conv1DTranspose`, `Conv2DTranspose` or
            `Conv3DTranspose`.
        inverse_method: the optimizer's inverse method. Defaults to
            `"cholesky"`.

    Returns:
        The block.

    Raises:
        UnsupportedLayerError: for a geometry the block cannot factor (see
            `conv_transpose_unsupported_reason`).
    """
    return ConvTransposeBlock(layer, inverse_method)


__all__ = ["ConvTransposeBlock", "conv_transpose_unsupported_reason",
           "make_conv_transpose_block"]
