"""Kronecker block for `keras.layers.Embedding`: `diag(freq) (x) G`.

An embedding lookup `s_{n,t} = E[id_{n,t}]` is a Dense layer without bias on
one-hot inputs `e_{id}`, applied at every position `t`. One-hot vectors make
the input factor diagonal, the token frequencies (KFAC_NOTES section 6;
Martens & Grosse 2015 with positions as locations, as in `DenseBlock`):

    A = (1/m) sum_{n,t} e_{id} e_{id}^T = diag(count_v / m)
    G = (1/(m |T|)) sum_{n,t} g_{n,t} g_{n,t}^T

(`g` the gradient w.r.t. the looked-up vector). `A` is stored as a vector of
length `vocab`; no `vocab x vocab` matrix is ever formed.

Inverse methods (same meaning as `KroneckerBlock`):

* `"cholesky"` / `"inverse"`: factored Tikhonov,
  `row_v(V) (G + gamma/pi I)^{-1} / (freq_v + pi gamma)`,
  `pi = sqrt(mean(freq) / (tr G / dim G))`, `gamma = sqrt(damping)`.
* `"eigh"`: exact damping, `G = Q diag(d) Q^T`,
  `row_v -> (row_v Q / (freq_v d + damping)) Q^T`.

Sparse gradients: the lookup's gradient is a `tf.IndexedSlices` (only the rows
of tokens in the batch). Both products act row by row, so the block
preconditions just those rows (cost `O(nnz d^2)` instead of `O(vocab d^2)`) and
returns `IndexedSlices` again; the optimizer densifies them only for the
momentum update, which touches every row anyway.

Shared layers (one Embedding called on several inputs): uses are pooled as
locations (`|T|` counts positions of all uses; counts add up over uses).
Weight tying across *different* layers (e.g. the embedding matrix reused by a
custom output layer) is not seen: only this layer's lookups enter the factors.
The lookup ids must be batched like the model inputs (first axis = examples).

Memory: `vocab + d^2` floats (plus `d^2`, or `d^2 + d`, for the inverse).
"""

import tensorflow as tf

from kfac_keras import linalg
from kfac_keras.blocks.base import FisherBlock, ema_assign
from kfac_keras.blocks.errors import UnsupportedLayerError

#: Inverse methods the embedding block implements.
EMBEDDING_INVERSE_METHODS = ("cholesky", "inverse", "eigh")


def embedding_unsupported_reason(layer):
    """Why an Embedding cannot get a Kronecker block, or None."""
    if getattr(layer, "lora_enabled", False):
        return "LoRA-enabled Embedding layers are not Kronecker-factored"
    if getattr(layer, "quantization_mode", None):
        return "quantized Embedding layers are not Kronecker-factored"
    return None


class EmbeddingBlock(FisherBlock):
    """`diag(token frequency) (x) G` block of an Embedding table.

    Args:
        layer: a built `keras.layers.Embedding`.
        inverse_method: one of `EMBEDDING_INVERSE_METHODS`. Defaults to
            `"cholesky"`.

    Raises:
        UnsupportedLayerError: for an inverse method this block does not
            implement.
    """

    kind = "kronecker (embedding, diagonal A)"
    needs_capture = True
    #: Record `(token ids, looked-up vectors)`; differentiate w.r.t. the latter.
    capture_mode = "output"
    #: `multiply_damped_inverse` accepts and returns `tf.IndexedSlices`.
    accepts_indexed_slices = True

    def __init__(self, layer, inverse_method="cholesky"):
        if inverse_method not in EMBEDDING_INVERSE_METHODS:
            raise UnsupportedLayerError(
                f"inverse_method={inverse_method!r} is not implemented for "
                f"embedding blocks (available: {EMBEDDING_INVERSE_METHODS})")
        embeddings = layer.embeddings
        super().__init__(getattr(layer, "path", None) or layer.name, [embeddings], layer)
        self.vocabulary_size, self.output_dim = (int(d) for d in embeddings.shape)
        self.inverse_method = inverse_method

    def build(self, optimizer):
        if self.built:
            return
        prefix = self.name.replace("/", "_")
        vocab, dim = self.vocabulary_size, self.output_dim
        self.token_frequencies = optimizer.add_variable(
            (vocab,), initializer="zeros", dtype="float32",
            name=f"{prefix}_token_frequencies")
        self.output_grad_factor = optimizer.add_variable(
            (dim, dim), initializer="zeros", dtype="float32",
            name=f"{prefix}_output_grad_factor")
        if self.inverse_method == "eigh":
            self.output_grad_eigenvalues = optimizer.add_variable(
                (dim,), initializer="ones", dtype="float32",
                name=f"{prefix}_output_grad_eigenvalues")
            self.output_grad_eigenvectors = optimizer.add_variable(
                (dim, dim), initializer="identity", dtype="float32",
                name=f"{prefix}_output_grad_eigenvectors")
        else:
            self.frequency_damping = optimizer.add_variable(
                (), initializer="ones", dtype="float32",
                name=f"{prefix}_frequency_damping")
            self.output_grad_factor_inverse = optimizer.add_variable(
                (dim, dim), initializer="identity", dtype="float32",
                name=f"{prefix}_output_grad_factor_inverse")
        self.built = True

    def state_variables(self):
        names = ["token_frequencies", "output_grad_factor"]
        if self.inverse_method == "eigh":
            names += ["output_grad_eigenvalues", "output_grad_eigenvectors"]
        else:
            names += ["frequency_damping", "output_grad_factor_inverse"]
        return [getattr(self, n) for n in names]

    def factor_shapes(self):
        return {"input_factor_diagonal": (self.vocabulary_size,),
                "output_grad_factor": (self.output_dim, self.output_dim)}

    def compute_factors(self, captures, num_examples):
        """This estimate's `(freq, G)` from `(ids, grads)` captures."""
        ids = tf.concat([tf.reshape(tf.cast(i, tf.int32), [-1]) for i, _ in captures], 0)
        grads = tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1, self.output_dim])
                           for _, g in captures], 0)
        counts = tf.math.unsorted_segment_sum(
            tf.ones_like(ids, dtype=tf.float32), ids, self.vocabulary_size)
        rows = tf.cast(tf.shape(grads)[0], tf.float32)
        grad_factor = tf.matmul(grads, grads, transpose_a=True) / rows
        return counts / num_examples, grad_factor

    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        frequencies, grad_factor = self.compute_factors(captures, num_examples)
        ema_assign(self.token_frequencies, frequencies, decay)
        ema_assign(self.output_grad_factor, grad_factor, decay)

    def update_inverses(self, damping):
        grad_factor = tf.convert_to_tensor(self.output_grad_factor)
        if self.inverse_method == "eigh":
            values, vectors = linalg.clipped_eigh(grad_factor)
            self.output_grad_eigenvalues.assign(values)
            self.output_grad_eigenvectors.assign(vectors)
            return
        frequencies = tf.convert_to_tensor(self.token_frequencies)
        floor = 1e-12
        pi = tf.sqrt(tf.maximum(tf.reduce_mean(frequencies), floor)
                     / tf.maximum(linalg.mean_diagonal(grad_factor), floor))
        gamma = tf.sqrt(tf.cast(damping, tf.float32))
        self.frequency_damping.assign(pi * gamma)
        self.output_grad_factor_inverse.assign(
            linalg.damped_inverse(grad_factor, gamma / pi, self.inverse_method))

    def _precondition_rows(self, rows, frequencies, damping):
        rows = tf.cast(rows, tf.float32)
        if self.inverse_method == "eigh":
            q = tf.convert_to_tensor(self.output_grad_eigenvectors)
            scale = (frequencies[:, None] * self.output_grad_eigenvalues[None, :]
                     + tf.cast(damping, tf.float32))
            return tf.matmul(tf.matmul(rows, q) / scale, q, transpose_b=True)
        return tf.matmul(rows, self.output_grad_factor_inverse) / (
            frequencies[:, None] + self.frequency_damping)

    def multiply_damped_inverse(self, grads, damping):
        grad = grads[0]
        if isinstance(grad, tf.IndexedSlices):
            frequencies = tf.gather(self.token_frequencies, grad.indices)
            values = self._precondition_rows(grad.values, frequencies, damping)
            return [tf.IndexedSlices(values, grad.indices, grad.dense_shape)]
        return [self._precondition_rows(grad, tf.convert_to_tensor(self.token_frequencies),
                                        damping)]


def make_embedding_block(layer, inverse_method="cholesky"):
    """`EmbeddingBlock` for `layer` (raises `UnsupportedLayerError`)."""
    return EmbeddingBlock(layer, inverse_method)
