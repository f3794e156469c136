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
group (a leading group axis on the factors of `KroneckerBlock`). The same block serves depthwise
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

from kfac_keras.blocks.base import keras_variant_reason, layer_name, trainable_bias
from kfac_keras.blocks.errors import UnsupportedLayerError
from kfac_keras.blocks.kronecker import (KroneckerBlock, append_homogeneous,
                                         join_location_weights)
from kfac_keras.blocks.patches import ConvGeometry


def conv_unsupported_reason(layer):
    """Why a Keras convolution (plain, depthwise or separable) cannot get a
    KFC block, or None."""
    return keras_variant_reason(layer, "convolutions")


class GroupedConvBlock(KroneckerBlock):
    """KFC per group: `blockdiag_g(A_g (x) G_g)` for grouped/depthwise convs.

    Group `g` reads input channels `[g c_in, (g+1) c_in)` and writes output
    channels `[g c_out, (g+1) c_out)` (`c_in`, `c_out` per group). Its kernel
    `K_g` has shape `(k c_in, c_out)` (`k = prod(kernel_size)`), offsets major
    and channels minor, like the patches. The factors have a leading group
    axis: `(groups, k c_in + 1, k c_in + 1)` and `(groups, c_out, c_out)`.

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
            Defaults to None.
        inverse_method: see `KroneckerBlock`. Defaults to `"cholesky"`.
        grouped: keep the group axis. Defaults to True; `ConvBlock` passes
            False for its single group.
    """

    kind = "kronecker (grouped conv, KFC per group)"

    def __init__(self, layer, kernel, groups, group_in_channels, group_out_channels,
                 bias=None, inverse_method="cholesky", grouped=True):
        self.geometry = ConvGeometry(layer)
        self.has_bias = bias is not None
        self.kernel_shape = tuple(kernel.shape)
        self.groups = int(groups)
        self.group_in_channels = int(group_in_channels)
        if math.prod(self.kernel_shape) != (self.geometry.num_offsets * group_in_channels
                                            * groups * group_out_channels):
            raise ValueError(
                f"Kernel shape {self.kernel_shape} does not match "
                f"{groups} groups of {group_in_channels} -> {group_out_channels} "
                f"channels with kernel_size {self.geometry.kernel_size}.")
        super().__init__(
            name=layer_name(layer),
            variables=[kernel] + ([bias] if self.has_bias else []),
            layer=layer,
            input_dim=self.geometry.num_offsets * group_in_channels + int(self.has_bias),
            output_dim=group_out_channels,
            inverse_method=inverse_method,
            num_groups=self.groups if grouped else None,
        )

    def _matrix_shape(self):
        return [self.groups] if self.num_groups is not None else []

    def grads_to_matrix(self, grads):
        if self.groups == 1:  # no group axis to move
            kernel = tf.reshape(grads[0], [-1, self.output_dim])
            if self.has_bias:
                kernel = tf.concat([kernel, tf.reshape(grads[1], [1, -1])], axis=0)
            return tf.reshape(kernel, self._matrix_shape() + [self.input_dim, self.output_dim])
        k, c_in = self.geometry.num_offsets, self.group_in_channels
        kernel = tf.reshape(grads[0], [k, c_in, self.groups, self.output_dim])
        kernel = tf.reshape(tf.transpose(kernel, [2, 0, 1, 3]),
                            [self.groups, k * c_in, self.output_dim])
        if self.has_bias:
            bias = tf.reshape(grads[1], [self.groups, 1, self.output_dim])
            kernel = tf.concat([kernel, tf.cast(bias, kernel.dtype)], axis=1)
        return tf.reshape(kernel, self._matrix_shape() + [self.input_dim, self.output_dim])

    def matrix_to_grads(self, matrix):
        if self.groups == 1:
            matrix = tf.reshape(matrix, [self.input_dim, self.output_dim])
            kernel = tf.reshape(matrix[:self.input_dim - int(self.has_bias)], self.kernel_shape)
            return [kernel, matrix[-1]] if self.has_bias else [kernel]
        k, c_in = self.geometry.num_offsets, self.group_in_channels
        matrix = tf.reshape(matrix, [self.groups, self.input_dim, self.output_dim])
        kernel = tf.reshape(matrix[:, :k * c_in], [self.groups, k, c_in, self.output_dim])
        kernel = tf.reshape(tf.transpose(kernel, [1, 2, 0, 3]), self.kernel_shape)
        if self.has_bias:
            return [kernel, tf.reshape(matrix[:, -1], [-1])]
        return [kernel]

    def group_rows(self, patch_rows, grad_rows):
        """Per-group per-example rows from `ConvGeometry.example_rows`:
        `([groups,] m, T, input_dim)` and `([groups,] m, T, c_out)`."""
        k, c_in, groups = self.geometry.num_offsets, self.group_in_channels, self.groups
        examples = tf.shape(patch_rows)[0]
        if groups == 1 and self.num_groups is None:
            inputs = tf.reshape(patch_rows, [examples, -1, k * c_in])
            return (append_homogeneous(inputs) if self.has_bias else inputs), grad_rows
        patches = tf.reshape(patch_rows, [examples, -1, k, groups, c_in])
        inputs = tf.reshape(tf.transpose(patches, [3, 0, 1, 2, 4]),
                            [groups, examples, -1, k * c_in])
        grads = tf.reshape(grad_rows, [examples, -1, groups, self.output_dim])
        grads = tf.transpose(grads, [2, 0, 1, 3])
        if self.has_bias:
            inputs = append_homogeneous(inputs)
        if self.num_groups is None:
            return inputs[0], grads[0]
        return inputs, grads

    def per_example_rows(self, captures):
        return self.group_rows(*self.geometry.example_rows(captures))

    def per_example_weights(self, captures):
        """Row weights `(m, T)` of the output locations (shared by the groups)."""
        return self.geometry.example_weights(captures, join_location_weights)


class ConvBlock(GroupedConvBlock):
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
        kernel = layer.kernel
        super().__init__(layer, kernel, groups=1, group_in_channels=int(kernel.shape[-2]),
                         group_out_channels=int(kernel.shape[-1]),
                         bias=trainable_bias(layer), inverse_method=inverse_method,
                         grouped=False)
        self.in_channels = self.group_in_channels


def make_conv_block(layer, inverse_method="cholesky"):
    """`ConvBlock` for `groups == 1`, else `GroupedConvBlock`.

    Args:
        layer: a built `Conv1D`, `Conv2D` or `Conv3D`.
        inverse_method: the optimizer's inverse method. Defaults to
            `"cholesky"`.

    Returns:
        The block.
    """
    groups = int(getattr(layer, "groups", 1))
    if groups == 1:
        return ConvBlock(layer, inverse_method)
    kernel = layer.kernel
    filters = int(kernel.shape[-1])
    return GroupedConvBlock(
        layer, kernel, groups=groups, group_in_channels=int(kernel.shape[-2]),
        group_out_channels=filters // groups, bias=trainable_bias(layer),
        inverse_method=inverse_method)


__all__ = ["ConvBlock", "GroupedConvBlock", "UnsupportedLayerError",
           "conv_unsupported_reason", "make_conv_block"]
