"""Kronecker block for `keras.layers.Dense` (Martens & Grosse 2015).

With `s = a @ K + b`, the augmented weight `[K; b]` has per-example gradient
`abar g^T` with `abar = [a, 1]`. On inputs of rank > 2 (sequences
`(B, T, d)`, images `(B, H, W, d)`) the layer is applied at every position and
positions are treated like convolution locations (KFAC_NOTES section 6):

    A = (1/B) sum_{n,t} abar_{n,t} abar_{n,t}^T
    G = (1/(B |T|)) sum_{n,t} g_{n,t} g_{n,t}^T

A layer called several times in one forward pass (a shared layer) has its uses
treated as extra locations in the same way: `|T|` counts positions times uses.
For a plain rank-2 Dense called once these are the paper's
`A = E[abar abar^T]`, `G = E[g g^T]`. With row weights (sample weights,
masks) `A` is their weighted mean (`KroneckerBlock`).

Memory: `A` is `(d_in + 1)^2` and `G` is `d_out^2` floats, plus the same again
for their inverses (or eigenvectors).
"""

import tensorflow as tf

from kfac_keras.blocks.base import keras_variant_reason, layer_name, trainable_bias
from kfac_keras.blocks.kronecker import (KroneckerBlock, append_homogeneous, example_rows,
                                         join_location_weights, split_capture,
                                         static_or_dynamic_sizes)


def dense_unsupported_reason(layer):
    """Why a Dense layer cannot get a Kronecker block, or None."""
    return keras_variant_reason(layer, "Dense layers")


class DenseBlock(KroneckerBlock):
    """Kronecker-factored Fisher block of a Dense layer's kernel and bias.

    Args:
        layer: a built `keras.layers.Dense`.
        inverse_method: see `KroneckerBlock`. Defaults to `"cholesky"`.
    """

    kind = "kronecker (dense)"

    def __init__(self, layer, inverse_method="cholesky"):
        bias = trainable_bias(layer)
        self.has_bias = bias is not None
        input_units, units = layer.kernel.shape
        super().__init__(
            name=layer_name(layer),
            variables=[layer.kernel] + ([bias] if self.has_bias else []),
            layer=layer,
            input_dim=input_units + int(self.has_bias),
            output_dim=units,
            inverse_method=inverse_method,
        )
        self.input_units = int(input_units)

    def grads_to_matrix(self, grads):
        if self.has_bias:
            return tf.concat([grads[0], grads[1][None, :]], axis=0)
        return grads[0]

    def matrix_to_grads(self, matrix):
        if self.has_bias:
            return [matrix[:-1], matrix[-1]]
        return [matrix]

    def per_example_rows(self, captures):
        """`(examples, positions * uses, d)` rows; uses of a shared layer are
        concatenated along the location axis."""
        captures = [split_capture(c) for c in captures]
        inputs = tf.concat([example_rows(x, self.input_units) for x, _, _ in captures], axis=1)
        grads = tf.concat([example_rows(g, self.output_dim) for _, g, _ in captures], axis=1)
        if self.has_bias:
            inputs = append_homogeneous(inputs)
        return inputs, grads

    def per_example_weights(self, captures):
        """Row weights `(examples, positions * uses)`, aligned with
        `per_example_rows` (per-position weights on `(batch, T, d)` inputs)."""
        return join_location_weights(captures, [
            (tf.shape(x)[0], static_or_dynamic_sizes(x, range(1, len(x.shape) - 1)))
            for x, _, _ in (split_capture(c) for c in captures)])


def make_dense_block(layer, inverse_method="cholesky"):
    """`DenseBlock` for `layer`."""
    return DenseBlock(layer, inverse_method)
