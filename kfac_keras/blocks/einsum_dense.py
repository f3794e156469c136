"""Kronecker block for `keras.layers.EinsumDense` (and so `MultiHeadAttention`).

An `EinsumDense` computes `s = einsum(equation, x, K) (+ b)`. When every
kernel axis is either contracted with the input ("input feature" axes `I`) or
copied to the output ("output feature" axes `O`), and every other input axis
is carried to the output (batch and "location" axes `L`, e.g. the sequence
axis), the layer is a Dense layer applied at every location:

    s[l, O] = sum_I x[l, I] K[I, O] + b[O],

with `K` viewed as a `(prod |I|, prod |O|)` matrix (axes in kernel order).
This is what `MultiHeadAttention` uses: query/key/value projections
`"abc,cde->abde"` (`I = c`, `O = (heads, key_dim)`, `L = (batch, seq)`) and
the output projection `"abcd,cde->abe"` (`I = (heads, head_dim)`, `O = e`).
The block is then exactly `DenseBlock`'s on the flattened locations
(Martens & Grosse 2015; locations as in KFC, KFAC_NOTES section 6):

    A = (1/m) sum_{n,l} abar abar^T,   G = (1/(m |L|)) sum_{n,l} g g^T,

`abar = [x_{n,l,I}, 1]` when the bias spans exactly the output feature axes.

Not representable (registration falls back to a diagonal block and the
report says why): kernel axes that also appear in both input and output
(per-location weights), input axes summed out, repeated letters, a batch axis
that is contracted, LoRA or quantized layers. A bias over other axes than
`O` (a strict subset, or location axes) is left out of the Kronecker block
and gets its own diagonal block.

Shared layers: uses are pooled as locations (`|L|` counts all uses).

Memory: `A` is `(prod|I| + 1)^2`, `G` is `(prod|O|)^2` floats, plus inverses.
"""

import math
import re
import string

import tensorflow as tf

from kfac_keras.blocks.base import keras_variant_reason, layer_name, trainable_bias
from kfac_keras.blocks.errors import UnsupportedLayerError
from kfac_keras.blocks.kronecker import (KroneckerBlock, append_homogeneous,
                                         join_location_weights, split_capture)

_EQUATION = re.compile(
    r"^(\.\.\.)?([a-zA-Z]+)(\.\.\.)?,([a-zA-Z]+)->(\.\.\.)?([a-zA-Z]+)(\.\.\.)?$")


class EinsumStructure:
    """The Dense-like structure of an EinsumDense equation.

    Args:
        equation: the layer's einsum equation.
        kernel_shape: the kernel's shape.

    Raises:
        UnsupportedLayerError: if the equation is not a Dense layer applied
            at every location (see the module docstring).
    """

    def __init__(self, equation, kernel_shape):
        match = _EQUATION.match(equation.replace(" ", ""))
        if not match:
            raise UnsupportedLayerError(
                f"einsum equation {equation!r} is not of the form "
                "'X,Y->Z', '...X,Y->...Z' or 'X...,Y->Z...'")
        in_left, inputs, in_right, kernel, out_left, outputs, out_right = match.groups()
        if bool(in_left) != bool(out_left) or bool(in_right) != bool(out_right) or (
                in_left and in_right):
            raise UnsupportedLayerError(
                f"einsum equation {equation!r} has an ellipsis that is not carried "
                "from the input to the output on the same side")
        for spec in (inputs, kernel, outputs):
            if len(set(spec)) != len(spec):
                raise UnsupportedLayerError(
                    f"einsum equation {equation!r} repeats an index within one operand")
        self.equation = equation
        self.ellipsis = "left" if in_left else ("right" if in_right else None)
        self.input_spec, self.kernel_spec, self.output_spec = inputs, kernel, outputs
        shared = [c for c in kernel if c in inputs and c in outputs]
        if shared:
            raise UnsupportedLayerError(
                f"kernel axes {shared} of {equation!r} appear in both input and "
                "output (per-location weights are not Kronecker-factored)")
        summed = [c for c in inputs if c not in kernel and c not in outputs]
        if summed:
            raise UnsupportedLayerError(
                f"input axes {summed} of {equation!r} are summed out")
        if self.ellipsis != "left" and inputs[0] in kernel:
            raise UnsupportedLayerError(
                f"the batch axis of {equation!r} is contracted with the kernel")
        self.contracted = [c for c in kernel if c in inputs]
        self.output_features = [c for c in kernel if c in outputs]
        sizes = dict(zip(kernel, (int(d) for d in kernel_shape)))
        self.sizes = sizes
        self.input_dim = math.prod(sizes[c] for c in self.contracted)
        self.output_dim = math.prod(sizes[c] for c in self.output_features)
        order = self.contracted + self.output_features
        self.kernel_perm = [kernel.index(c) for c in order]
        self.kernel_inverse_perm = [order.index(c) for c in kernel]
        self.kernel_shape = tuple(int(d) for d in kernel_shape)

    def _full_specs(self, rank):
        """Input and output specs with the ellipsis spelled out for `rank`."""
        if self.ellipsis is None:
            return self.input_spec, self.output_spec
        unused = [c for c in string.ascii_letters
                  if c not in self.input_spec + self.kernel_spec + self.output_spec]
        elided = "".join(unused[:rank - len(self.input_spec)])
        if self.ellipsis == "left":
            return elided + self.input_spec, elided + self.output_spec
        return self.input_spec + elided, self.output_spec + elided

    def rows(self, inputs, grads):
        """`(rows, input_dim)` inputs and `(rows, output_dim)` gradient rows."""
        input_full, output_full = self._full_specs(len(inputs.shape))
        locations = [c for c in input_full if c not in self.kernel_spec]
        input_perm = [input_full.index(c) for c in locations + self.contracted]
        grad_perm = [output_full.index(c) for c in locations + self.output_features]
        input_rows = tf.reshape(tf.transpose(tf.cast(inputs, tf.float32), input_perm),
                                [-1, self.input_dim])
        grad_rows = tf.reshape(tf.transpose(tf.cast(grads, tf.float32), grad_perm),
                               [-1, self.output_dim])
        return input_rows, grad_rows

    def location_sizes(self, inputs):
        """Sizes of the non-batch location axes of `inputs`, in row order."""
        input_full, _ = self._full_specs(len(inputs.shape))
        locations = [c for c in input_full if c not in self.kernel_spec]
        axes = [input_full.index(c) for c in locations[1:]]
        return [inputs.shape[a] if inputs.shape[a] is not None else tf.shape(inputs)[a]
                for a in axes]

    def kernel_to_matrix(self, kernel):
        return tf.reshape(tf.transpose(kernel, self.kernel_perm),
                          [self.input_dim, self.output_dim])

    def matrix_to_kernel(self, matrix):
        permuted = [self.kernel_shape[i] for i in self.kernel_perm]
        return tf.transpose(tf.reshape(matrix, permuted), self.kernel_inverse_perm)


def einsum_unsupported_reason(layer):
    """Why an EinsumDense cannot get a Kronecker block, or None."""
    return keras_variant_reason(layer, "EinsumDense layers")


class EinsumDenseBlock(KroneckerBlock):
    """Kronecker block of an `EinsumDense` kernel (and bias, when it fits).

    Args:
        layer: a built `keras.layers.EinsumDense`.
        inverse_method: see `KroneckerBlock`. Defaults to `"cholesky"`.

    Raises:
        UnsupportedLayerError: for equations that are not a Dense layer at
            every location.
    """

    kind = "kronecker (einsum dense)"

    def __init__(self, layer, inverse_method="cholesky"):
        kernel = layer.kernel
        self.structure = structure = EinsumStructure(layer.equation, kernel.shape)
        bias = trainable_bias(layer)
        self.has_bias = False
        if bias is not None:
            bias_axes = layer.bias_axes or ""
            if sorted(bias_axes) == sorted(structure.output_features):
                self.has_bias = True
                first = min(structure.output_spec.index(c) for c in bias_axes)
                self.bias_order = [c for c in structure.output_spec[first:] if c in bias_axes]
                self.bias_perm = [self.bias_order.index(c) for c in structure.output_features]
                self.bias_inverse_perm = [structure.output_features.index(c)
                                          for c in self.bias_order]
                self.bias_shape = tuple(int(d) for d in bias.shape)
        super().__init__(
            name=layer_name(layer),
            variables=[kernel] + ([bias] if self.has_bias else []),
            layer=layer,
            input_dim=structure.input_dim + int(self.has_bias),
            output_dim=structure.output_dim,
            inverse_method=inverse_method,
        )

    def _bias_to_row(self, bias):
        sizes = [self.structure.sizes[c] for c in self.bias_order]
        return tf.reshape(tf.transpose(tf.reshape(bias, sizes), self.bias_perm), [1, -1])

    def _row_to_bias(self, row):
        sizes = [self.structure.sizes[c] for c in self.structure.output_features]
        return tf.reshape(tf.transpose(tf.reshape(row, sizes), self.bias_inverse_perm),
                          self.bias_shape)

    def grads_to_matrix(self, grads):
        kernel = self.structure.kernel_to_matrix(grads[0])
        if self.has_bias:
            return tf.concat([kernel, tf.cast(self._bias_to_row(grads[1]), kernel.dtype)],
                             axis=0)
        return kernel

    def matrix_to_grads(self, matrix):
        kernel = self.structure.matrix_to_kernel(matrix[:self.structure.input_dim])
        if self.has_bias:
            return [kernel, self._row_to_bias(matrix[-1])]
        return [kernel]

    def per_example_rows(self, captures):
        """`(m, L, input_dim)` and `(m, L, output_dim)` rows for EKFAC (see
        `KroneckerBlock`); the batch axis leads the location axes, and the
        uses of a shared layer are concatenated along `L`."""
        input_rows, grad_rows = [], []
        for inputs, grads, _ in (split_capture(c) for c in captures):
            rows_in, rows_grad = self.structure.rows(inputs, grads)
            examples = tf.shape(inputs)[0]
            input_rows.append(tf.reshape(rows_in, [examples, -1, self.structure.input_dim]))
            grad_rows.append(tf.reshape(rows_grad, [examples, -1, self.output_dim]))
        inputs = tf.concat(input_rows, axis=1)
        if self.has_bias:
            inputs = append_homogeneous(inputs)
        return inputs, tf.concat(grad_rows, axis=1)

    def per_example_weights(self, captures):
        """Row weights `(m, L)` aligned with `per_example_rows`, or None."""
        return join_location_weights(captures, [
            (tf.shape(inputs)[0], self.structure.location_sizes(inputs))
            for inputs, _, _ in (split_capture(c) for c in captures)])


def make_einsum_dense_block(layer, inverse_method="cholesky"):
    """`EinsumDenseBlock` for `layer` (raises `UnsupportedLayerError`)."""
    return EinsumDenseBlock(layer, inverse_method)
