"""KFC blocks for `Conv1D`, `Conv2D` and `Conv3D` (Grosse & Martens 2016).

A convolution applies the same weights at every output location `t`:
`s_{n,t} = abar_{n,t} @ [K; b]`, where `abar_{n,t} = [x_{n,t}, 1]` is the input
patch at `t` (flattened in the order of the kernel, see
`kfac_keras.blocks.patches`) with the homogeneous coordinate for the bias, and
`K` is the kernel reshaped to `(prod(kernel_size) * in_channels, filters)`.
The per-example gradient is `sum_t abar_{n,t} g_{n,t}^T`, and KFC approximates
its second moment by (KFAC_NOTES section 6)

    A = (1/m) sum_{n,t} abar_{n,t} abar_{n,t}^T
    G = (1/(m |T|)) sum_{n,t} g_{n,t} g_{n,t}^T

over the `m` examples of the statistics subset and the `|T|` output locations.
This is exact when three assumptions hold: activations independent of
derivatives, spatial homogeneity, and spatially uncorrelated derivatives
(`E[g_t g_s^T] = 0` for `t != s`). Only the product `A (x) G` matters (and the
factored-Tikhonov split through `pi`); putting `1/|T|` on `G` matches
`DenseBlock` on sequences, so a 1x1 convolution and a Dense layer on the same
locations get identical factors.

Shared layers: every call is recorded; the uses' locations are pooled, so
`|T|` counts the locations of all uses (`sum_u |T_u|`) and `A` sums over all of
them. With a single use this is the formula above.

Padding (`valid`, `same`, and `causal` for Conv1D), strides, dilation and
`data_format` are the layer's own; `channels_first` inputs and gradients are
transposed to channels-last for the statistics.

Groups: a convolution with `groups > 1` is `groups` independent convolutions
(group `g` maps input channels `g*C_in/groups ...` to output channels
`g*filters/groups ...`), each exactly a KFC layer; it gets a
`GroupedConvBlock`, `blockdiag_g(A_g (x) G_g)` with one Kronecker pair per
group (`kfac_keras.blocks.grouped_kronecker`). The same block serves depthwise
convolutions (`kfac_keras.blocks.depthwise`).

Memory: the persistent state is `A` (`(k C_in + 1)^2` floats, `k =
prod(kernel_size)`) and `G` (`filters^2`) plus the same again for their
inverses or eigenvectors (grouped: `groups` times `(k C_in/groups + 1)^2` and
`(filters/groups)^2`). Computing a new estimate materialises the patches of
the statistics subset only, `m * |T| * k * C_in` floats, transiently, every
`cov_update_every` steps; lower `statistics_fraction` to bound it. For 1x1
kernels the patches are the (strided) input itself and nothing is copied
beyond one slice.
"""

import math

import tensorflow as tf

from kfac_keras.blocks.errors import UnsupportedLayerError
from kfac_keras.blocks.grouped_kronecker import GroupedKroneckerBlock, location_factors
from kfac_keras.blocks.kronecker import KroneckerBlock, append_homogeneous
from kfac_keras.blocks.patches import extract_patches, to_channels_last


def conv_unsupported_reason(layer):
    """Why a Keras convolution cannot get a KFC block, or None."""
    if getattr(layer, "lora_enabled", False):
        return "LoRA-enabled convolutions are not Kronecker-factored"
    if getattr(layer, "quantization_mode", None):
        return "quantized convolutions are not Kronecker-factored"
    return None


def _layer_name(layer):
    return getattr(layer, "path", None) or layer.name


def _trainable_bias(layer):
    bias = getattr(layer, "bias", None)
    return bias if bias is not None and bias.trainable else None


class _ConvGeometry:
    """The layer's patch geometry, read once at registration."""

    def __init__(self, layer):
        self.kernel_size = tuple(int(k) for k in layer.kernel_size)
        self.strides = tuple(int(s) for s in layer.strides)
        self.dilation_rate = tuple(int(d) for d in layer.dilation_rate)
        self.padding = layer.padding
        self.data_format = layer.data_format
        self.num_offsets = math.prod(self.kernel_size)

    def example_rows(self, captures):
        """Per-example patch rows `(m, T, num_offsets, C_in)` and gradient rows
        `(m, T, C_out)`; the uses of a shared layer are concatenated along the
        location axis `T`."""
        patch_rows, grad_rows = [], []
        for inputs, grads in captures:
            patches = extract_patches(
                tf.cast(inputs, tf.float32), self.kernel_size, self.strides,
                self.dilation_rate, self.padding, self.data_format)
            examples = tf.shape(patches)[0]
            patch_rows.append(tf.reshape(
                patches, [examples, -1, self.num_offsets, patches.shape[-1]]))
            grads = to_channels_last(tf.cast(grads, tf.float32), self.data_format)
            grad_rows.append(tf.reshape(grads, [examples, -1, grads.shape[-1]]))
        return tf.concat(patch_rows, axis=1), tf.concat(grad_rows, axis=1)

    def rows(self, captures):
        """Patch rows `(R, num_offsets, C_in)` and gradient rows `(R, C_out)`,
        `R` = examples x locations (all uses)."""
        patch_rows, grad_rows = self.example_rows(captures)
        return (tf.reshape(patch_rows, [-1] + patch_rows.shape[-2:].as_list()),
                tf.reshape(grad_rows, [-1, grad_rows.shape[-1]]))


class ConvBlock(KroneckerBlock):
    """KFC block of a `Conv1D`/`Conv2D`/`Conv3D` kernel and bias (groups=1).

    Args:
        layer: a built Keras convolution with `groups == 1`.
        inverse_method: see `KroneckerBlock`. Defaults to `"cholesky"`.
    """

    kind = "kronecker (conv, KFC)"

    def __init__(self, layer, inverse_method="cholesky"):
        if getattr(layer, "groups", 1) != 1:
            raise ValueError(
                f"ConvBlock covers convolutions with groups=1; layer "
                f"{layer.name!r} has groups={layer.groups} (use GroupedConvBlock).")
        self.geometry = _ConvGeometry(layer)
        bias = _trainable_bias(layer)
        self.has_bias = bias is not None
        kernel = layer.kernel
        self.kernel_shape = tuple(kernel.shape)
        self.in_channels = int(kernel.shape[-2])
        filters = int(kernel.shape[-1])
        super().__init__(
            name=_layer_name(layer),
            variables=[kernel] + ([bias] if self.has_bias else []),
            layer=layer,
            input_dim=self.geometry.num_offsets * self.in_channels + int(self.has_bias),
            output_dim=filters,
            inverse_method=inverse_method,
        )

    def grads_to_matrix(self, grads):
        kernel = tf.reshape(grads[0], [-1, self.output_dim])
        if self.has_bias:
            return tf.concat([kernel, tf.reshape(grads[1], [1, -1])], axis=0)
        return kernel

    def matrix_to_grads(self, matrix):
        kernel = tf.reshape(matrix[:self.input_dim - int(self.has_bias)], self.kernel_shape)
        if self.has_bias:
            return [kernel, matrix[-1]]
        return [kernel]

    def per_example_rows(self, captures):
        """`(m, T, input_dim)` patch rows (with the homogeneous coordinate) and
        `(m, T, filters)` gradient rows, for EKFAC (see `KroneckerBlock`)."""
        patch_rows, grad_rows = self.geometry.example_rows(captures)
        examples = tf.shape(patch_rows)[0]
        inputs = tf.reshape(patch_rows, [examples, -1,
                                         self.geometry.num_offsets * self.in_channels])
        if self.has_bias:
            inputs = tf.concat([inputs, tf.ones_like(inputs[..., :1])], axis=-1)
        return inputs, grad_rows

    def compute_factors(self, captures, num_examples):
        patch_rows, grad_rows = self.geometry.rows(captures)
        inputs = tf.reshape(patch_rows, [-1, self.geometry.num_offsets * self.in_channels])
        if self.has_bias:
            inputs = append_homogeneous(inputs)
        return location_factors(inputs, grad_rows, num_examples)


class GroupedConvBlock(GroupedKroneckerBlock):
    """KFC per group: `blockdiag_g(A_g (x) G_g)` for grouped/depthwise convs.

    Group `g` reads input channels `[g c_in, (g+1) c_in)` and writes output
    channels `[g c_out, (g+1) c_out)` (`c_in`, `c_out` per group). Its kernel
    `K_g` has shape `(k c_in, c_out)` (`k = prod(kernel_size)`), offsets major
    and channels minor, like the patches.

    Args:
        layer: a built Keras convolution.
        kernel: the kernel variable; its row-major flattening must index as
            `(offset, c_in index, group, c_out index)`: true for a grouped
            `Conv*D` kernel `(*kernel_size, c_in, groups * c_out)` and for a
            depthwise kernel `(*kernel_size, channels, depth_multiplier)` (a
            grouped conv with `groups = channels`, `c_in = 1`).
        groups: number of groups.
        group_in_channels: `c_in`.
        group_out_channels: `c_out`.
        bias: the trainable bias variable of length `groups * c_out`, or None.
        inverse_method: one of `GROUPED_INVERSE_METHODS`. Defaults to
            `"cholesky"`.
    """

    kind = "kronecker (grouped conv, KFC per group)"

    def __init__(self, layer, kernel, groups, group_in_channels, group_out_channels,
                 bias=None, inverse_method="cholesky"):
        self.geometry = _ConvGeometry(layer)
        self.has_bias = bias is not None
        self.kernel_shape = tuple(kernel.shape)
        self.group_in_channels = int(group_in_channels)
        if math.prod(self.kernel_shape) != (self.geometry.num_offsets * group_in_channels
                                            * groups * group_out_channels):
            raise ValueError(
                f"Kernel shape {self.kernel_shape} does not match "
                f"{groups} groups of {group_in_channels} -> {group_out_channels} "
                f"channels with kernel_size {self.geometry.kernel_size}.")
        super().__init__(
            name=_layer_name(layer),
            variables=[kernel] + ([bias] if self.has_bias else []),
            layer=layer,
            num_groups=groups,
            input_dim=self.geometry.num_offsets * group_in_channels + int(self.has_bias),
            output_dim=group_out_channels,
            inverse_method=inverse_method,
        )

    def grads_to_matrices(self, grads):
        k, c_in = self.geometry.num_offsets, self.group_in_channels
        kernel = tf.reshape(grads[0], [k, c_in, self.num_groups, self.output_dim])
        kernel = tf.reshape(tf.transpose(kernel, [2, 0, 1, 3]),
                            [self.num_groups, k * c_in, self.output_dim])
        if self.has_bias:
            bias = tf.reshape(grads[1], [self.num_groups, 1, self.output_dim])
            return tf.concat([kernel, tf.cast(bias, kernel.dtype)], axis=1)
        return kernel

    def matrices_to_grads(self, matrices):
        k, c_in = self.geometry.num_offsets, self.group_in_channels
        kernel = tf.reshape(matrices[:, :k * c_in],
                            [self.num_groups, k, c_in, self.output_dim])
        kernel = tf.reshape(tf.transpose(kernel, [1, 2, 0, 3]), self.kernel_shape)
        if self.has_bias:
            return [kernel, tf.reshape(matrices[:, -1], [-1])]
        return [kernel]

    def group_rows(self, patch_rows, grad_rows):
        """Per-group rows: `(groups, R, input_dim)` and `(groups, R, c_out)`."""
        k, c_in = self.geometry.num_offsets, self.group_in_channels
        patches = tf.reshape(patch_rows, [-1, k, self.num_groups, c_in])
        inputs = tf.reshape(tf.transpose(patches, [2, 0, 1, 3]),
                            [self.num_groups, -1, k * c_in])
        if self.has_bias:
            inputs = tf.concat([inputs, tf.ones_like(inputs[:, :, :1])], axis=2)
        grads = tf.reshape(grad_rows, [-1, self.num_groups, self.output_dim])
        return inputs, tf.transpose(grads, [1, 0, 2])

    def compute_factors(self, captures, num_examples):
        patch_rows, grad_rows = self.geometry.rows(captures)
        inputs, grads = self.group_rows(patch_rows, grad_rows)
        return location_factors(inputs, grads, num_examples)


def make_conv_block(layer, inverse_method="cholesky"):
    """`ConvBlock` for `groups == 1`, else `GroupedConvBlock`.

    Args:
        layer: a built `Conv1D`, `Conv2D` or `Conv3D`.
        inverse_method: the optimizer's inverse method. Defaults to
            `"cholesky"`.

    Returns:
        The block.

    Raises:
        UnsupportedLayerError: for a grouped convolution with an inverse
            method grouped blocks do not implement.
    """
    groups = int(getattr(layer, "groups", 1))
    if groups == 1:
        return ConvBlock(layer, inverse_method)
    kernel = layer.kernel
    filters = int(kernel.shape[-1])
    return GroupedConvBlock(
        layer, kernel, groups=groups, group_in_channels=int(kernel.shape[-2]),
        group_out_channels=filters // groups, bias=_trainable_bias(layer),
        inverse_method=inverse_method)


__all__ = ["ConvBlock", "GroupedConvBlock", "UnsupportedLayerError",
           "conv_unsupported_reason", "make_conv_block"]
