"""Counter-based random numbers that are identical in every execution mode.

TensorFlow's stateless random ops give different numbers under XLA than in
its own kernels, so a step compiled with `jit_compile=True` would draw other
Fisher targets than the same step run eagerly. K-FAC's sampled targets are
part of the update, and users (and tests, and exact resume) expect the same
run to give the same weights whatever the execution mode, so targets are drawn
from a small integer hash of `(seed, element index)` built from uint32
multiply/xor/shift ops, which TensorFlow and XLA evaluate identically.

Under a `tf.distribute` strategy each replica passes `first_index`, the
position of its first element in the global batch, so the replicas together
draw exactly the numbers one device would draw for the whole batch.

The hash is two rounds of a 32-bit integer finalizer (multiply-xorshift);
its output passes the moment checks in the tests, which is all Monte-Carlo
Fisher estimation needs (this is not a cryptographic generator).
"""

import tensorflow as tf

_GOLDEN = 0x9E3779B9
_MIX_1 = 0x7FEB352D
_MIX_2 = 0x846CA68B
_STREAM = 0x85EBCA6B


def _shift(h, k):
    return tf.bitwise.right_shift(h, tf.constant(k, tf.uint32))


def _xor(a, b):
    return tf.bitwise.bitwise_xor(a, b)


def random_bits(count, seed, first_index=0):
    """`count` pseudo-random uint32 values keyed by a shape-(2,) int seed:
    those of element indices `first_index, ..., first_index + count - 1`."""
    index = tf.cast(tf.range(count), tf.uint32) + tf.cast(first_index, tf.uint32)
    seed = tf.cast(seed, tf.uint32)
    h = index * tf.constant(_GOLDEN, tf.uint32) + seed[0]
    for key in (seed[1], _xor(seed[0], tf.constant(_STREAM, tf.uint32))):
        h = _xor(h, key)
        h = _xor(h, _shift(h, 16)) * tf.constant(_MIX_1, tf.uint32)
        h = _xor(h, _shift(h, 15)) * tf.constant(_MIX_2, tf.uint32)
        h = _xor(h, _shift(h, 16))
    return h


def uniform(shape, seed, first_index=0):
    """Uniform float32 samples in the open interval (0, 1); element `i` (in
    row-major order) is the hash of index `first_index + i`."""
    count = tf.reduce_prod(shape)
    bits = random_bits(count, seed, first_index)
    values = (tf.cast(_shift(bits, 8), tf.float32) + 0.5) * (2.0 ** -24)
    return tf.reshape(values, shape)


def _other_stream(seed):
    seed = tf.cast(seed, tf.int32)
    return tf.stack([tf.bitwise.bitwise_xor(seed[0], 0x2545F491), seed[1] + 1])


def normal(shape, seed, first_index=0):
    """Standard normal float32 samples (Box-Muller on two uniform streams);
    `first_index` as in `uniform`."""
    radius = tf.sqrt(-2.0 * tf.math.log(uniform(shape, seed, first_index)))
    angle = 2.0 * 3.141592653589793 * uniform(shape, _other_stream(seed), first_index)
    return radius * tf.cos(angle)


def categorical(log_probs, seed, first_index=0):
    """One class index per row of `log_probs` (shape `(rows, classes)`),
    by the Gumbel-max trick; `first_index` as in `uniform` (in elements of
    `log_probs`)."""
    gumbel = -tf.math.log(-tf.math.log(uniform(tf.shape(log_probs), seed, first_index)))
    return tf.argmax(log_probs + gumbel, axis=-1, output_type=tf.int32)


def fold_in(seed, value):
    """A new shape-(2,) int32 seed from `seed` and an int `value` (a stream
    number or an example index): independent streams for the same seed."""
    stream = tf.cast(value, tf.uint32) * tf.constant(2, tf.uint32)
    bits = random_bits(2, seed, stream + tf.constant(0x3C6EF372, tf.uint32))
    return tf.bitcast(bits, tf.int32)
