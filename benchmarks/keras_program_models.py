"""The models and synthetic data of the keras-io-style programs (issue 15), one copy.

Three keras-io example programs, with the models as keras-io writes them and
data of the right shapes generated here (no internet):

* **Transformer text classifier** (keras-io's
  `text_classification_with_transformer`): token + position Embedding, one
  post-norm transformer block (2-head MultiHeadAttention, feed-forward 32,
  LayerNormalization, Dropout 0.1), GlobalAveragePooling1D, Dropout, Dense 20
  relu, Dense 2 softmax. `synthetic_reviews` replaces the IMDB reviews by
  ones of the same shapes (vocabulary 20,000, length 200, ids padded with 0
  in front like `pad_sequences`): Zipf-distributed filler tokens, and a few
  "sentiment" tokens per review, drawn from the label's set with
  probability `signal` and from the other set otherwise (so the label is
  learnable but noisy).
* **(Bidirectional) LSTM classifier**: `Embedding -> LSTM -> Dense(2)` or
  `Embedding -> Bidirectional(LSTM) -> Dense(2)` on `order_task`, sequences
  with one token A and one token B among distractors, labelled by which
  comes first (the order can only be read by a recurrence over the whole
  sequence).
* **Convolutional denoising autoencoder** (keras-io's "Convolutional
  autoencoder for image denoising"): Conv2D 32 -> MaxPooling -> Conv2D 32 ->
  MaxPooling -> Conv2DTranspose 32 (stride 2) x 2 -> Conv2D 1 sigmoid, on
  MNIST digits with Gaussian noise (`noisy_images`, factor 0.4) as inputs and
  the clean digits as targets.

`benchmarks.keras_programs` trains them with Adam and with `KFAC()`; the
scripts in tools/keras_programs/ import them from here. This module imports
no part of `kfac_keras`, so those scripts can import it without choosing
which copy of the package is loaded.
"""

import keras
import numpy as np
from keras import layers, ops

__all__ = [
    "EMBED_DIM",
    "FF_DIM",
    "MAXLEN",
    "NUM_HEADS",
    "SENTIMENT_TOKENS",
    "TokenAndPositionEmbedding",
    "TransformerBlock",
    "VOCAB_SIZE",
    "build_denoising_autoencoder",
    "build_recurrent_classifier",
    "build_transformer_classifier",
    "noisy_images",
    "order_task",
    "synthetic_reviews",
]

VOCAB_SIZE = 20000
MAXLEN = 200
EMBED_DIM = 32
NUM_HEADS = 2
FF_DIM = 32
SENTIMENT_TOKENS = 20  # per class


def synthetic_reviews(num_examples, seed, signal=0.8, mean_sentiment=12.0):
    """Token ids `(num_examples, MAXLEN)` and labels in {0, 1}.

    Args:
        num_examples: int, number of reviews.
        seed: int, NumPy seed.
        signal: float, probability that a sentiment token comes from the
            label's set. Defaults to 0.8.
        mean_sentiment: float, Poisson mean of the number of sentiment tokens
            (one more is always added). Defaults to 12.0.

    Returns:
        `(x, labels)`: int64 arrays `(num_examples, MAXLEN)` and
        `(num_examples,)`.
    """
    rng = np.random.default_rng(seed)
    # Sentiment ids sit among moderately frequent tokens (ranks 100..139).
    positive = np.arange(100, 100 + SENTIMENT_TOKENS)
    negative = np.arange(100 + SENTIMENT_TOKENS, 100 + 2 * SENTIMENT_TOKENS)
    labels = rng.integers(0, 2, num_examples)
    x = np.zeros((num_examples, MAXLEN), np.int64)
    for n in range(num_examples):
        length = int(np.clip(rng.lognormal(np.log(180), 0.5), 20, 600))
        tokens = rng.zipf(1.3, size=length) + 1  # ids >= 2, Zipf like words
        tokens = np.where(tokens < VOCAB_SIZE, tokens, rng.integers(2, VOCAB_SIZE, length))
        count = min(rng.poisson(mean_sentiment) + 1, length)
        where = rng.choice(length, size=count, replace=False)
        own = positive if labels[n] == 1 else negative
        other = negative if labels[n] == 1 else positive
        from_own = rng.random(count) < signal
        tokens[where] = np.where(from_own, rng.choice(own, count), rng.choice(other, count))
        tokens = tokens[:MAXLEN]  # pad_sequences truncates 'pre' by default: keep the tail
        tokens = tokens[-MAXLEN:]
        x[n, MAXLEN - len(tokens):] = tokens
    return x, labels


class TransformerBlock(layers.Layer):
    """keras-io's transformer block (post-norm).

    Args:
        embed_dim: int, width of the token vectors (also the attention's key
            size, as in keras-io).
        num_heads: int, attention heads.
        ff_dim: int, hidden units of the feed-forward network.
        rate: float, dropout rate after the attention and the feed-forward
            network. Defaults to 0.1.
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential(
            [layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs, training=None):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output, training=training)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output, training=training)
        return self.layernorm2(out1 + ffn_output)


class TokenAndPositionEmbedding(layers.Layer):
    """keras-io's token + position embedding.

    Args:
        maxlen: int, number of positions.
        vocab_size: int, number of token ids.
        embed_dim: int, width of the vectors.
        position: str, `"keras_io"` looks positions up with an un-batched
            `arange` (as keras-io does), `"batched"` with the ids tiled to the
            batch (the same function, batch-first ids). Defaults to
            `"keras_io"`.
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, maxlen, vocab_size, embed_dim, position="keras_io", **kwargs):
        if position not in ("keras_io", "batched"):
            raise ValueError(
                f'`position` must be "keras_io" or "batched"; received {position!r}.')
        super().__init__(**kwargs)
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)
        self.position = position

    def call(self, x):
        maxlen = ops.shape(x)[-1]
        positions = ops.arange(start=0, stop=maxlen, step=1)
        if self.position == "batched":
            positions = ops.broadcast_to(positions[None, :], ops.shape(x))
        positions = self.pos_emb(positions)
        x = self.token_emb(x)
        return x + positions


def build_transformer_classifier(position="keras_io", dropout=0.1):
    """keras-io's transformer text classifier (two softmax outputs).

    Args:
        position: str, how `TokenAndPositionEmbedding` looks positions up:
            `"keras_io"` or `"batched"`. Defaults to `"keras_io"`.
        dropout: float, rate of every Dropout layer. Defaults to 0.1.

    Returns:
        A functional `keras.Model` from `(batch, MAXLEN)` token ids to class
        probabilities `(batch, 2)`.
    """
    inputs = layers.Input(shape=(MAXLEN,))
    x = TokenAndPositionEmbedding(MAXLEN, VOCAB_SIZE, EMBED_DIM, position)(inputs)
    x = TransformerBlock(EMBED_DIM, NUM_HEADS, FF_DIM, rate=dropout)(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs=inputs, outputs=outputs)


def order_task(examples, length, vocabulary, seed):
    """Sequences holding one token A (id 1) and one token B (id 2); the label says whether A comes first.

    The other tokens are distractors drawn uniformly from ids
    `3..vocabulary - 1`.

    Args:
        examples: int, number of sequences.
        length: int, tokens per sequence (at least 2).
        vocabulary: int, vocabulary size (at least 4).
        seed: int, NumPy seed.

    Returns:
        `(tokens (examples, length) int32, labels (examples,) int32)`.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocabulary, size=(examples, length))
    for row in tokens:
        first, second = rng.choice(length, size=2, replace=False)
        row[first], row[second] = 1, 2
    labels = np.array([np.argmax(row == 1) < np.argmax(row == 2) for row in tokens])
    return tokens.astype("int32"), labels.astype("int32")


def build_recurrent_classifier(kind, length, vocabulary, units):
    """`Embedding(vocabulary, 16) -> LSTM(units) -> Dense(2)` logits, or with `Bidirectional(LSTM)`.

    Args:
        kind: str, `"lstm"` or `"bilstm"` (the LSTM wrapped in
            `Bidirectional`).
        length: int, sequence length.
        vocabulary: int, vocabulary size.
        units: int, LSTM units (per direction).

    Returns:
        A `keras.Sequential` model from token ids to 2 logits.
    """
    if kind not in ("lstm", "bilstm"):
        raise ValueError(f'`kind` must be "lstm" or "bilstm"; received {kind!r}.')
    recurrent = keras.layers.LSTM(units)
    if kind == "bilstm":
        recurrent = keras.layers.Bidirectional(keras.layers.LSTM(units))
    return keras.Sequential([
        keras.Input((length,)),
        keras.layers.Embedding(vocabulary, 16),
        recurrent,
        keras.layers.Dense(2),
    ])


def build_denoising_autoencoder():
    """keras-io's convolutional denoising autoencoder (see the module docstring).

    Returns:
        A functional `keras.Model` from `(batch, 28, 28, 1)` noisy images to
        pixel probabilities of the same shape.
    """
    inputs = layers.Input(shape=(28, 28, 1))
    x = layers.Conv2D(32, (3, 3), activation="relu", padding="same")(inputs)
    x = layers.MaxPooling2D((2, 2), padding="same")(x)
    x = layers.Conv2D(32, (3, 3), activation="relu", padding="same")(x)
    x = layers.MaxPooling2D((2, 2), padding="same")(x)
    x = layers.Conv2DTranspose(32, (3, 3), strides=2, activation="relu", padding="same")(x)
    x = layers.Conv2DTranspose(32, (3, 3), strides=2, activation="relu", padding="same")(x)
    outputs = layers.Conv2D(1, (3, 3), activation="sigmoid", padding="same")(x)
    return keras.Model(inputs, outputs)


def noisy_images(images, noise_factor=0.4, seed=1):
    """keras-io's noisy inputs: `clip(images + noise_factor * N(0, 1), 0, 1)`.

    Args:
        images: float array of pixels in [0, 1].
        noise_factor: float, standard deviation of the Gaussian noise.
            Defaults to 0.4 (keras-io's).
        seed: int, NumPy seed of the noise. Defaults to 1.

    Returns:
        A float32 array of the shape of `images`.
    """
    rng = np.random.default_rng(seed)
    return np.clip(images + noise_factor * rng.normal(size=images.shape), 0.0, 1.0).astype(
        "float32")
