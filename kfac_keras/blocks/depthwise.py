"""KFC blocks for depthwise and separable convolutions.

Depthwise (`DepthwiseConv1D`, `DepthwiseConv2D`): channel `c` is convolved on
its own with `depth_multiplier = M` filters, writing output channels
`c*M ... c*M + M - 1`. That is a grouped convolution with `groups = C`, one
input channel and `M` output channels per group, so KFC applies to each channel
exactly as to an ordinary convolution (same assumptions, Grosse & Martens
2016): `blockdiag_c(A_c (x) G_c)` with `A_c` the `(k+1) x (k+1)` second moment
of channel `c`'s patches (`k = prod(kernel_size)`, `+1` for the bias) and `G_c`
the `M x M` second moment of its output gradients. With `M = 1` each `G_c` is
a scalar and the block is a full `(k+1) x (k+1)` block per channel.
Memory: `C (k+1)^2 + C M^2` floats, plus the same for inverses.

Separable (`SeparableConv1D`, `SeparableConv2D`): a depthwise convolution
(no bias) followed by a 1x1 pointwise convolution (with the bias), then the
activation. Both parts are linear maps applied at every location, so each gets
its own KFC block, treating the other as fixed (the two are block-diagonal
in the Fisher, like two consecutive layers):

* pointwise: inputs are the depthwise outputs `u_t` (recomputed from the
  patches and the depthwise kernel: exact), gradients are those w.r.t. the
  layer's pre-activation `g_t`;
  `A = (1/m) sum [u_t, 1][u_t, 1]^T`, `G = (1/(m |T|)) sum g_t g_t^T`.
* depthwise: inputs are the patches, gradients are those w.r.t. `u_t`,
  `P g_t` with `P` the pointwise kernel as a `(C M, filters)` matrix (exact:
  the pointwise map is linear and acts per location); per channel as above.

Shared layers: uses are pooled as extra locations, as for `ConvBlock`.
"""

import tensorflow as tf

from kfac_keras.blocks.base import FisherBlock, StatisticsSource, layer_name, trainable_bias
from kfac_keras.blocks.conv import GroupedConvBlock, conv_unsupported_reason
from kfac_keras.blocks.kronecker import (KroneckerBlock, append_homogeneous,
                                         join_location_weights, split_capture)
from kfac_keras.blocks.patches import ConvGeometry


class DepthwiseConvBlock(GroupedConvBlock):
    """Per-channel KFC block of a depthwise convolution's kernel and bias.

    Args:
        layer: a built `DepthwiseConv1D` or `DepthwiseConv2D`.
        inverse_method: see `KroneckerBlock`. Defaults to `"cholesky"`.
    """

    kind = "kronecker (depthwise conv, KFC per channel)"

    def __init__(self, layer, inverse_method="cholesky"):
        kernel = layer.kernel
        channels, multiplier = int(kernel.shape[-2]), int(kernel.shape[-1])
        super().__init__(layer, kernel, groups=channels, group_in_channels=1,
                         group_out_channels=multiplier, bias=trainable_bias(layer),
                         inverse_method=inverse_method)


class _DepthwisePart(GroupedConvBlock):
    """The depthwise half of a separable block; its one capture holds the
    per-example patch rows `(m, T, k, C)` and gradient rows `(m, T, C M)`."""

    kind = "kronecker (depthwise part)"

    def per_example_rows(self, captures):
        (patch_rows, grad_rows, _), = (split_capture(c) for c in captures)
        return self.group_rows(patch_rows, grad_rows)

    def per_example_weights(self, captures):
        """The `(m, T)` location weights the separable block passed, or None."""
        (_, _, weights), = (split_capture(c) for c in captures)
        return weights


class _PointwisePart(KroneckerBlock):
    """The pointwise half of a separable block; its one capture holds the
    per-example depthwise outputs `(m, T, C M)` and gradient rows `(m, T, F)`."""

    kind = "kronecker (pointwise part)"

    def __init__(self, name, layer, kernel, bias, inverse_method):
        self.kernel_shape = tuple(kernel.shape)
        self.has_bias = bias is not None
        super().__init__(
            name=name, variables=[kernel] + ([bias] if self.has_bias else []),
            layer=layer, input_dim=int(kernel.shape[-2]) + int(self.has_bias),
            output_dim=int(kernel.shape[-1]), inverse_method=inverse_method)

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
        (input_rows, grad_rows, _), = (split_capture(c) for c in captures)
        return (append_homogeneous(input_rows) if self.has_bias else input_rows), grad_rows

    def per_example_weights(self, captures):
        """The `(m, T)` location weights the separable block passed, or None."""
        (_, _, weights), = (split_capture(c) for c in captures)
        return weights


class SeparableConvBlock(FisherBlock):
    """KFC blocks for both kernels of a separable convolution.

    The block is `blockdiag(depthwise per-channel KFC, pointwise KFC)`; see
    the module docstring. Variables, in order: depthwise kernel, pointwise
    kernel, bias (if trainable).

    Args:
        layer: a built `SeparableConv1D` or `SeparableConv2D`.
        inverse_method: see `KroneckerBlock` (both parts use it). Defaults
            to `"cholesky"`.
    """

    kind = "kronecker (separable conv: depthwise per channel + pointwise)"
    statistics_source = StatisticsSource.CAPTURES

    def __init__(self, layer, inverse_method="cholesky"):
        name = layer_name(layer)
        depthwise = layer.depthwise_kernel
        pointwise = layer.pointwise_kernel
        self.geometry = ConvGeometry(layer)
        self.channels = int(depthwise.shape[-2])
        self.multiplier = int(depthwise.shape[-1])
        self.depthwise_part = _DepthwisePart(
            layer, depthwise, groups=self.channels, group_in_channels=1,
            group_out_channels=self.multiplier, bias=None,
            inverse_method=inverse_method)
        self.depthwise_part.name = f"{name}/depthwise"
        self.pointwise_part = _PointwisePart(
            f"{name}/pointwise", layer, pointwise, trainable_bias(layer), inverse_method)
        super().__init__(name, [depthwise] + self.pointwise_part.variables, layer)
        self.inverse_method = inverse_method
        self.parts = (self.depthwise_part, self.pointwise_part)

    @property
    def uses_eigenbasis_scalings(self):
        return self.pointwise_part.uses_eigenbasis_scalings

    def build(self, optimizer):
        if self.built:
            return
        for part in self.parts:
            part.build(optimizer)
        self.built = True

    def state_variables(self):
        return self.depthwise_part.state_variables() + self.pointwise_part.state_variables()

    def factor_shapes(self):
        shapes = {}
        for prefix, part in (("depthwise", self.depthwise_part),
                             ("pointwise", self.pointwise_part)):
            for key, shape in part.factor_shapes().items():
                shapes[f"{prefix}_{key}"] = shape
        return shapes

    def part_captures(self, captures):
        """Each part's one capture: `([(patches, grads_u, r)], [(u, grads_s, r)])`.

        `patches`: `(m, T, k, C)`; `u`: `(m, T, C M)` depthwise outputs;
        `grads_s`: `(m, T, filters)` pre-activation gradients;
        `grads_u = grads_s P^T`; `r`: `(m, T)` row weights of the output
        locations, or None.
        """
        patch_rows, grad_rows = self.geometry.example_rows(captures)
        k = self.geometry.num_offsets
        depthwise = tf.reshape(tf.cast(self.depthwise_part.variables[0], tf.float32),
                               [k, self.channels, self.multiplier])
        pointwise = tf.reshape(tf.cast(self.pointwise_part.variables[0], tf.float32),
                               [self.channels * self.multiplier, -1])
        examples = tf.shape(patch_rows)[0]
        middle = tf.reshape(tf.einsum("ntkc,kcj->ntcj", patch_rows, depthwise),
                            [examples, -1, self.channels * self.multiplier])
        middle_grads = tf.matmul(grad_rows, pointwise, transpose_b=True)
        weights = self.geometry.example_weights(captures, join_location_weights)
        return [(patch_rows, middle_grads, weights)], [(middle, grad_rows, weights)]

    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        for part, part_captures in zip(self.parts, self.part_captures(captures)):
            part.update_statistics(part_captures, None, num_examples, decay)

    def update_scalings(self, captures, num_examples, factor_decay):
        for part, part_captures in zip(self.parts, self.part_captures(captures)):
            part.update_scalings(part_captures, num_examples, factor_decay)

    def set_damping_mode(self, mode):
        """Each part is damped relative to its own curvature (see
        `FisherBlock.set_damping_mode`)."""
        super().set_damping_mode(mode)
        for part in self.parts:
            part.set_damping_mode(mode)

    def update_inverses(self, damping):
        for part in self.parts:
            part.update_inverses(damping)

    def multiply_damped_inverse(self, grads, damping):
        return (self.depthwise_part.multiply_damped_inverse(grads[:1], damping)
                + self.pointwise_part.multiply_damped_inverse(grads[1:], damping))

    def kronecker_matrices(self, grads):
        """The depthwise kernel's (one pair per channel) and the pointwise `[K; b]`."""
        return (self.depthwise_part.kronecker_matrices(grads[:1])
                + self.pointwise_part.kronecker_matrices(grads[1:]))

    def grads_from_kronecker_matrices(self, matrices):
        """Inverse of `kronecker_matrices`."""
        depthwise, pointwise = matrices
        return (self.depthwise_part.grads_from_kronecker_matrices([depthwise])
                + self.pointwise_part.grads_from_kronecker_matrices([pointwise]))


#: Why a depthwise/separable layer cannot get a KFC block (the conv check).
depthwise_unsupported_reason = conv_unsupported_reason


def make_depthwise_block(layer, inverse_method="cholesky"):
    """`DepthwiseConvBlock` for a depthwise layer."""
    return DepthwiseConvBlock(layer, inverse_method)


def make_separable_block(layer, inverse_method="cholesky"):
    """`SeparableConvBlock` for a separable layer."""
    return SeparableConvBlock(layer, inverse_method)


__all__ = ["DepthwiseConvBlock", "SeparableConvBlock", "depthwise_unsupported_reason",
           "make_depthwise_block", "make_separable_block"]
