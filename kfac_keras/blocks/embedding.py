"""Kronecker block for `keras.layers.Embedding`: `diag(freq) (x) G`.

An embedding lookup `s_{n,t} = E[id_{n,t}]` is a Dense layer without bias on
one-hot inputs `e_{id}`, applied at every position `t`. One-hot vectors make
the input factor diagonal, the token frequencies (KFAC_NOTES section 6;
Martens & Grosse 2015 with positions as locations, as in `DenseBlock`):

    A = (1/m) sum_{n,t} e_{id} e_{id}^T = diag(count_v / m)
    G = (1/(m |T|)) sum_{n,t} g_{n,t} g_{n,t}^T

(`g` the gradient w.r.t. the looked-up vector). With row weights (sample
weights, `mask_zero=True`) the counts are weighted, `count_v = sum_{n,t: id =
v} r_{n,t}`, over `m_w` (`KroneckerBlock`): padding ids add nothing. `A` is stored as a vector of
length `vocab`; no `vocab x vocab` matrix is ever formed.

Inverse methods (those of `KroneckerBlock`, with a diagonal input factor,
`kfac_keras.blocks.factors.DiagonalFactor`):

* `"cholesky"` / `"inverse"`: factored Tikhonov,
  `row_v(V) (G + gamma/pi I)^{-1} / (freq_v + pi gamma)`,
  `pi = sqrt(mean(freq) / (tr G / dim G))`, `gamma = sqrt(damping)`.
* `"eigh"`: exact damping, `G = Q diag(d) Q^T`,
  `row_v -> (row_v Q / (freq_v d + damping)) Q^T`.
* `"ekfac"`: `row_v -> (row_v Q / (S_v + damping)) Q^T` with
  `S_v = mean_n (sum_{t: id_{n,t} = v} g_{n,t} Q)^2` (the eigenbasis of the
  diagonal `A` is the identity), computed from the ids without forming
  one-hot rows.

Sparse gradients: the lookup's gradient is a `tf.IndexedSlices` (only the rows
of tokens in the batch). Both products act row by row, so the block
preconditions just those rows (cost `O(nnz d^2)` instead of `O(vocab d^2)`) and
returns `IndexedSlices` again; the optimizer densifies the result only for
the momentum update, which touches every row anyway.

Shared layers (one Embedding called on several inputs): uses are pooled as
locations (`|T|` counts positions of all uses; counts add up over uses).
Weight tying across *different* layers (e.g. the embedding matrix reused by a
custom output layer) is not seen: only this layer's lookups enter the factors.
The lookup ids must be batched like the model inputs (first axis = examples).

Memory: `vocab + d^2` floats (plus `d^2`, or `d^2 + d`, for the inverse).
"""

import tensorflow as tf

from kfac_keras.blocks.base import keras_variant_reason, layer_name
from kfac_keras.blocks.factors import DiagonalFactor
from kfac_keras.blocks.factors import weighted_count
from kfac_keras.blocks.kronecker import (KroneckerBlock, join_location_weights, split_capture,
                                         static_or_dynamic_sizes)


def embedding_unsupported_reason(layer):
    """Why an Embedding cannot get a Kronecker block, or None."""
    return keras_variant_reason(layer, "Embedding layers")


class EmbeddingBlock(KroneckerBlock):
    """`diag(token frequency) (x) G` block of an Embedding table.

    Args:
        layer: a built `keras.layers.Embedding`.
        inverse_method: see `KroneckerBlock`. Defaults to `"cholesky"`.
    """

    kind = "kronecker (embedding, diagonal A)"
    lookup_table = True
    #: Record `(token ids, looked-up vectors)`; differentiate w.r.t. the latter.
    capture_mode = "output"
    accepts_indexed_slices = True

    def __init__(self, layer, inverse_method="cholesky"):
        embeddings = layer.embeddings
        vocabulary_size, dim = (int(d) for d in embeddings.shape)
        super().__init__(layer_name(layer), [embeddings], layer, vocabulary_size, dim,
                         inverse_method=inverse_method,
                         input_side=DiagonalFactor("token_frequencies", vocabulary_size))
        self.vocabulary_size = vocabulary_size

    token_frequencies = property(lambda self: self.input_side.factor)

    def factor_shapes(self):
        return {"input_factor_diagonal": (self.vocabulary_size,),
                "output_grad_factor": (self.output_dim, self.output_dim)}

    def grads_to_matrix(self, grads):
        return tf.convert_to_tensor(grads[0])

    def matrix_to_grads(self, matrix):
        return [matrix]

    def _ids_and_grads(self, captures):
        """Token ids `(m, L)` and gradient rows `(m, L, d)`, uses along `L`."""
        captures = [split_capture(c) for c in captures]
        ids = tf.concat([tf.reshape(tf.cast(i, tf.int32), [tf.shape(i)[0], -1])
                         for i, _, _ in captures], axis=1)
        grads = tf.concat([tf.reshape(tf.cast(g, tf.float32),
                                      [tf.shape(g)[0], -1, self.output_dim])
                           for _, g, _ in captures], axis=1)
        return ids, grads

    def per_example_weights(self, captures):
        """Row weights `(m, positions * uses)` of the lookups (an
        `Embedding(mask_zero=True)`'s padding ids weigh 0), or None."""
        return join_location_weights(captures, [
            (tf.shape(ids)[0], static_or_dynamic_sizes(ids, range(1, len(ids.shape))))
            for ids, _, _ in (split_capture(c) for c in captures)])

    def compute_factors(self, captures, num_examples):
        """This estimate's `(freq, G)` from `(ids, grads)` captures: weighted
        token counts over `m_w` when the captures carry row weights."""
        ids, grads = self._ids_and_grads(captures)
        ids = tf.reshape(ids, [-1])
        grads = tf.reshape(grads, [-1, self.output_dim])
        weights = self._flat_weights(captures)
        counts = tf.math.unsorted_segment_sum(
            tf.ones_like(ids, dtype=tf.float32) if weights is None else weights,
            ids, self.vocabulary_size)
        rows = tf.cast(tf.shape(grads)[0], tf.float32)
        grad_factor = tf.matmul(grads, grads, transpose_a=True) / rows
        return (tf.math.divide_no_nan(counts, weighted_count(weights, num_examples)),
                grad_factor)

    def scaling_estimate(self, captures, num_examples):
        """`S_v = mean_n (sum_{t: id = v} g_{n,t} Q)^2`, via the distinct
        `(example, token)` pairs of the subset."""
        ids, grads = self._ids_and_grads(captures)
        rotated = tf.reshape(self.output_side.rotate_rows(grads), [-1, self.output_dim])
        examples = tf.range(tf.shape(ids, out_type=tf.int64)[0])[:, None]
        keys = tf.reshape(examples * self.vocabulary_size + tf.cast(ids, tf.int64), [-1])
        pairs, pair_of_row = tf.unique(keys)
        per_pair = tf.math.unsorted_segment_sum(rotated, pair_of_row, tf.size(pairs))
        tokens = tf.cast(pairs % self.vocabulary_size, tf.int32)
        return tf.math.unsorted_segment_sum(
            tf.square(per_pair), tokens, self.vocabulary_size) / num_examples


def make_embedding_block(layer, inverse_method="cholesky"):
    """`EmbeddingBlock` for `layer`."""
    return EmbeddingBlock(layer, inverse_method)
