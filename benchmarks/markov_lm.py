"""Synthetic language-model data with a known entropy floor, and the small causal transformer.

The data come from a fixed random **order-2 Markov chain** over a small
vocabulary (`MarkovChain`): the distribution of each token depends on the
two tokens before it. Sequences start from the stationary law of token
pairs, so every position has the same law, and the best possible mean
next-token cross-entropy, the floor, is known exactly (`MarkovChain.floor`).

`make_transformer_lm` builds the causal transformer that
`benchmarks.transformer_lm` and tools/step_efficiency train on these
sequences: token Embedding plus learned positions, pre-LayerNorm blocks of
causal MultiHeadAttention and a ReLU feed-forward network (both residual),
a final LayerNormalization and a Dense layer of next-token logits.

This module imports no part of `kfac_keras`, so tools can import it without
choosing which copy of the package is loaded.
"""

import keras
import numpy as np

__all__ = ["LearnedPositions", "MarkovChain", "make_transformer_lm", "next_token_pairs"]


class MarkovChain:
    """A fixed random order-2 Markov chain over `vocab` tokens.

    `next_probs[a, b]` is the distribution of the token after the pair `(a, b)`,
    drawn from a symmetric Dirichlet(`concentration`). Sequences start from the
    stationary distribution of pairs, so every position has the same law and
    the exact entropy floor of next-token prediction is `floor()`.

    Args:
        vocab: int, number of tokens. Defaults to 32.
        concentration: float, Dirichlet parameter (smaller: more predictable).
            Defaults to 0.2.
        seed: int, seed of the chain. Defaults to 0.
    """

    def __init__(self, vocab=32, concentration=0.2, seed=0):
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.next_probs = rng.dirichlet(np.full(vocab, concentration), size=(vocab, vocab))
        # Pair chain (a, b) -> (b, c); its stationary law by power iteration.
        pair = np.full((vocab, vocab), 1.0 / vocab**2)
        for _ in range(5000):
            new = np.einsum("ab,abc->bc", pair, self.next_probs)
            if np.abs(new - pair).max() < 1e-15:
                pair = new
                break
            pair = new
        self.pair_probs = pair / pair.sum()

    def floor(self, length):
        """Exact mean cross-entropy floor (nats) of predicting tokens 1..length-1.

        Token 1 given token 0 has entropy `H(pair) - H(first)`; every later token
        has `sum_ab pi(a, b) H(next_probs[a, b])`.
        """
        def entropy(p):
            p = p[p > 0]
            return float(-(p * np.log(p)).sum())
        first = self.pair_probs.sum(axis=1)
        second_given_first = entropy(self.pair_probs.ravel()) - entropy(first)
        later = float(sum(self.pair_probs[a, b] * entropy(self.next_probs[a, b])
                          for a in range(self.vocab) for b in range(self.vocab)))
        return (second_given_first + (length - 2) * later) / (length - 1)

    def sample(self, count, length, rng):
        """`(count, length)` int32 sequences."""
        flat = rng.choice(self.vocab**2, size=count, p=self.pair_probs.ravel())
        seqs = np.empty((count, length), dtype=np.int32)
        seqs[:, 0], seqs[:, 1] = flat // self.vocab, flat % self.vocab
        cumulative = np.cumsum(self.next_probs, axis=-1)
        for t in range(2, length):
            u = rng.random(count)[:, None]
            c = cumulative[seqs[:, t - 2], seqs[:, t - 1]]
            seqs[:, t] = np.minimum((u > c).sum(axis=1), self.vocab - 1)
        return seqs


def next_token_pairs(sequences):
    """Splits token sequences into model inputs and next-token targets.

    Args:
        sequences: int array `(count, length)`.

    Returns:
        `(inputs, targets)`: `sequences[:, :-1]` and `sequences[:, 1:]`, both
        `(count, length - 1)`; target `t` is the token after input `t`.
    """
    sequences = np.asarray(sequences)
    if sequences.ndim != 2 or sequences.shape[1] < 2:
        raise ValueError("`sequences` must be a 2-D array of sequences of at least 2 tokens; "
                         f"received shape {sequences.shape}.")
    return sequences[:, :-1], sequences[:, 1:]


@keras.saving.register_keras_serializable(package="benchmarks")
class LearnedPositions(keras.layers.Layer):
    """Adds a learned `(length, d_model)` position embedding, initialised at zero.

    A custom layer, so K-FAC gives its table the diagonal block.

    Args:
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=(input_shape[1], input_shape[2]), initializer="zeros",
            name="positions")

    def call(self, x):
        return x + self.positions[None]


def make_transformer_lm(vocab=32, length=32, d_model=64, layers=2, heads=4):
    """The causal transformer language model (see the module docstring).

    Args:
        vocab: int, vocabulary size (inputs and logits). Defaults to 32.
        length: int, sequence length; the model reads `length - 1` tokens
            and predicts the next token at each of them. Defaults to 32.
        d_model: int, width of the residual stream; must be divisible by
            `heads`. Defaults to 64.
        layers: int, number of transformer blocks. Defaults to 2.
        heads: int, attention heads per block, each of size
            `d_model // heads`. Defaults to 4.

    Returns:
        A functional `keras.Model` from int32 token ids `(batch, length - 1)`
        to logits `(batch, length - 1, vocab)`; the output layer is named
        `"logits"`.
    """
    if d_model % heads:
        raise ValueError(f"`d_model` ({d_model}) must be divisible by `heads` ({heads}).")
    inputs = keras.Input((length - 1,), dtype="int32")
    h = keras.layers.Embedding(vocab, d_model, name="tokens")(inputs)
    h = LearnedPositions(name="positions")(h)
    for i in range(layers):
        a = keras.layers.LayerNormalization(name=f"ln_attn_{i}")(h)
        a = keras.layers.MultiHeadAttention(heads, d_model // heads, name=f"attn_{i}")(
            a, a, use_causal_mask=True)
        h = h + a
        f = keras.layers.LayerNormalization(name=f"ln_ffn_{i}")(h)
        f = keras.layers.Dense(4 * d_model, activation="relu", name=f"ffn_in_{i}")(f)
        h = h + keras.layers.Dense(d_model, name=f"ffn_out_{i}")(f)
    h = keras.layers.LayerNormalization(name="ln_final")(h)
    return keras.Model(inputs, keras.layers.Dense(vocab, name="logits")(h))
