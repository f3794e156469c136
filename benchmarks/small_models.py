"""Small CNN and Transformer-encoder builders for the tests, benchmarks and notebooks.

Both are deliberately tiny (they train in seconds on a CPU) but contain every
kind of layer K-FAC registers a structured block for in image and sequence
models:

* `small_cnn`: Conv2D -> BatchNormalization -> ReLU -> MaxPooling2D, twice,
  then Flatten -> Dense. Blocks: KFC for the convolutions, per-channel 2x2
  scale-and-shift blocks for the BatchNormalizations, a Kronecker block for
  the Dense layer.
* `small_transformer`: token Embedding + learned position embedding, one
  encoder block (MultiHeadAttention with residual and LayerNormalization, a
  position-wise Dense feed-forward network with residual and
  LayerNormalization), mean pooling over positions and a Dense classifier.
  Blocks: `diag(freq) (x) G` for the token embedding, Kronecker blocks for
  the attention's query/key/value/output EinsumDense projections and for the
  Dense layers (positions as locations), scale-and-shift blocks for the
  LayerNormalizations, and the diagonal fallback for the custom
  `PositionEmbedding` layer.

`random_image_data` and `random_token_data` make matching random data sets.
"""

import keras
import numpy as np


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per position: `x + P[:T]`.

    A custom layer (no structured block exists for it), so K-FAC gives its
    table the diagonal fallback block.

    Args:
        sequence_length: int, the largest sequence length.
        initializer: initializer of the table. Defaults to
            `"random_normal"`.
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, sequence_length, initializer="random_normal", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(sequence_length, int) or sequence_length < 1:
            raise ValueError(
                f"`sequence_length` must be a positive int; received {sequence_length!r}.")
        self.sequence_length = sequence_length
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        self.position_table = self.add_weight(
            name="position_table", shape=(self.sequence_length, int(input_shape[-1])),
            initializer=self.initializer)

    def call(self, inputs):
        length = keras.ops.shape(inputs)[1]
        return inputs + keras.ops.cast(self.position_table[:length], inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"sequence_length": self.sequence_length,
                       "initializer": keras.initializers.serialize(self.initializer)})
        return config


def small_cnn(input_shape=(28, 28, 1), num_classes=10, filters=(8, 16), seed=0):
    """A small CNN classifier that outputs logits.

    `Conv2D(f, 3, same, no bias) -> BatchNormalization -> ReLU ->
    MaxPooling2D(2)` for each `f` in `filters`, then `Flatten -> Dense`.

    Args:
        input_shape: tuple, `(height, width, channels)`. Defaults to
            `(28, 28, 1)` (MNIST size).
        num_classes: int, number of output logits. Defaults to 10.
        filters: tuple of ints, filters of each convolution stage. Defaults
            to `(8, 16)`.
        seed: int, seed for the weight initializers. Defaults to 0.

    Returns:
        A built functional `keras.Model`.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = inputs
    for index, count in enumerate(filters):
        x = keras.layers.Conv2D(
            count, 3, padding="same", use_bias=False, name=f"conv{index + 1}",
            kernel_initializer=keras.initializers.HeNormal(seed=seed + index))(x)
        x = keras.layers.BatchNormalization(name=f"bn{index + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{index + 1}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{index + 1}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(
        num_classes, name="logits",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 100))(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def small_transformer(vocabulary_size=50, sequence_length=12, model_dim=16, num_heads=2,
                      feed_forward_dim=32, num_classes=4, seed=0):
    """A one-block Transformer-encoder classifier that outputs logits.

    Args:
        vocabulary_size: int, number of token ids. Defaults to 50.
        sequence_length: int, tokens per example. Defaults to 12.
        model_dim: int, embedding width. Defaults to 16.
        num_heads: int, attention heads; `model_dim` must be divisible by it.
            Defaults to 2.
        feed_forward_dim: int, hidden width of the feed-forward network.
            Defaults to 32.
        num_classes: int, number of output logits. Defaults to 4.
        seed: int, seed for the weight initializers. Defaults to 0.

    Returns:
        A built functional `keras.Model` taking int token ids of shape
        `(batch, sequence_length)`.
    """
    if model_dim % num_heads:
        raise ValueError(
            f"`model_dim` ({model_dim}) must be divisible by `num_heads` ({num_heads}).")
    tokens = keras.Input(shape=(sequence_length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(
        vocabulary_size, model_dim, name="token_embedding",
        embeddings_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=seed))(tokens)
    x = PositionEmbedding(
        sequence_length, name="position_embedding",
        initializer=keras.initializers.RandomNormal(stddev=0.1, seed=seed + 1))(x)
    attention = keras.layers.MultiHeadAttention(
        num_heads, model_dim // num_heads, name="attention",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2))(x, x)
    x = keras.layers.LayerNormalization(name="attention_norm")(
        keras.layers.Add(name="attention_residual")([x, attention]))
    hidden = keras.layers.Dense(
        feed_forward_dim, activation="relu", name="feed_forward_1",
        kernel_initializer=keras.initializers.HeNormal(seed=seed + 3))(x)
    hidden = keras.layers.Dense(
        model_dim, name="feed_forward_2",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 4))(hidden)
    x = keras.layers.LayerNormalization(name="feed_forward_norm")(
        keras.layers.Add(name="feed_forward_residual")([x, hidden]))
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(
        num_classes, name="logits",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 5))(x)
    return keras.Model(tokens, outputs, name="small_transformer")


def random_image_data(num_examples=256, input_shape=(28, 28, 1), num_classes=10, seed=0):
    """Random images with labels from a fixed random linear teacher.

    Args:
        num_examples: int. Defaults to 256.
        input_shape: tuple. Defaults to `(28, 28, 1)`.
        num_classes: int. Defaults to 10.
        seed: int. Defaults to 0.

    Returns:
        `(images, labels)`: float32 `(num_examples, *input_shape)` and int32
        `(num_examples,)`.
    """
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(num_examples,) + tuple(input_shape)).astype("float32")
    teacher = rng.normal(size=(int(np.prod(input_shape)), num_classes))
    labels = np.argmax(images.reshape(num_examples, -1) @ teacher, axis=1).astype("int32")
    return images, labels


def random_token_data(num_examples=256, sequence_length=12, vocabulary_size=50,
                      num_classes=4, seed=0):
    """Random token sequences labelled by which token range is most frequent.

    Args:
        num_examples: int. Defaults to 256.
        sequence_length: int. Defaults to 12.
        vocabulary_size: int. Defaults to 50.
        num_classes: int, the vocabulary is split into this many equal ranges.
            Defaults to 4.
        seed: int. Defaults to 0.

    Returns:
        `(tokens, labels)`: int32 `(num_examples, sequence_length)` and int32
        `(num_examples,)`.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocabulary_size, size=(num_examples, sequence_length))
    ranges = tokens * num_classes // vocabulary_size
    counts = np.stack([(ranges == c).sum(axis=1) for c in range(num_classes)], axis=1)
    labels = np.argmax(counts + 0.1 * rng.random(counts.shape), axis=1)
    return tokens.astype("int32"), labels.astype("int32")
