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
`A = E[abar abar^T]`, `G = E[g g^T]`.

Memory: `A` is `(d_in + 1)^2` and `G` is `d_out^2` floats, plus the same again
for their inverses (or eigenvectors).
"""

import tensorflow as tf

from kfac_keras.blocks.kronecker import KroneckerBlock, append_homogeneous, location_rows


class DenseBlock(KroneckerBlock):
    """Kronecker-factored Fisher block of a Dense layer's kernel and bias.

    Args:
        layer: a built `keras.layers.Dense`.
        inverse_method: see `KroneckerBlock`.
    """

    kind = "kronecker (dense)"

    def __init__(self, layer, inverse_method="cholesky"):
        self.has_bias = layer.bias is not None and layer.bias.trainable
        variables = [layer.kernel] + ([layer.bias] if self.has_bias else [])
        input_units, units = layer.kernel.shape
        super().__init__(
            name=layer.path if hasattr(layer, "path") else layer.name,
            variables=variables,
            layer=layer,
            input_dim=input_units + (1 if self.has_bias else 0),
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
        """`(examples, positions * uses, d)` rows for EKFAC's per-example gradients."""
        inputs = tf.concat(
            [_example_rows(x, self.input_units) for x, _ in captures], axis=1)
        grads = tf.concat(
            [_example_rows(g, self.output_dim) for _, g in captures], axis=1)
        if self.has_bias:
            inputs = tf.concat([inputs, tf.ones_like(inputs[..., :1])], axis=-1)
        return inputs, grads

    def compute_factors(self, captures, num_examples):
        inputs = tf.concat(
            [location_rows(x, self.input_units) for x, _ in captures], axis=0)
        grads = tf.concat(
            [location_rows(g, self.output_dim) for _, g in captures], axis=0)
        if self.has_bias:
            inputs = append_homogeneous(inputs)
        rows = tf.cast(tf.shape(grads)[0], tf.float32)
        locations = rows / num_examples
        input_factor = tf.matmul(inputs, inputs, transpose_a=True) / num_examples
        output_grad_factor = tf.matmul(grads, grads, transpose_a=True) / (
            num_examples * locations)
        return input_factor, output_grad_factor


def _example_rows(tensor, width):
    """Reshapes `(batch, ..., width)` to `(batch, locations, width)`, float32."""
    tensor = tf.cast(tensor, tf.float32)
    locations = 1
    for size in tensor.shape[1:-1]:
        locations = None if (locations is None or size is None) else locations * size
    if locations is None:
        locations = -1
    return tf.reshape(tensor, [tf.shape(tensor)[0], locations, width])
