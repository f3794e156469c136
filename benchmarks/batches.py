"""A ``tf.data`` pipeline of mini-batches in an order fixed in advance.

Every optimizer of a benchmark sees the same batches in the same order. With
a constant batch size the index stream is a concatenation of numpy
permutations (one per epoch), cut into consecutive batches. With a
batch-size schedule, step ``k`` takes the first ``m_k`` entries of a
stateless random permutation seeded by ``(data_seed, k)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["make_dataset"]


def _index_stream(n: int, total: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    reps = -(-total // n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:total]


def make_dataset(x, y, batch_size, steps, seed, batch_sizes=None):
    """A ``tf.data.Dataset`` of exactly ``steps`` batches in a fixed order.

    ``y=None`` (or ``y is x``) yields ``(xb, xb)`` pairs (autoencoders).
    With ``batch_sizes`` (a length-``steps`` sequence), step k has
    ``batch_sizes[k]`` examples: the first ``batch_sizes[k]`` entries of a
    stateless random permutation seeded by ``(seed, k)``.
    """
    import tensorflow as tf

    n = int(x.shape[0])
    autoenc = y is None or y is x
    xt = tf.constant(x)
    yt = None if autoenc else tf.constant(y)

    def pick(idx):
        xb = tf.gather(xt, idx)
        return (xb, xb) if autoenc else (xb, tf.gather(yt, idx))

    if batch_sizes is None:
        idx = _index_stream(n, steps * batch_size, seed).astype(np.int32)
        ds = tf.data.Dataset.from_tensor_slices(idx.reshape(steps, batch_size))
        ds = ds.map(pick)
    else:
        sizes = np.minimum(np.asarray(batch_sizes, dtype=np.int64)[:steps], n)
        if sizes.size < steps:
            raise ValueError("batch_sizes is shorter than steps")

        def pick_k(k, m):
            perm = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int32), seed=tf.stack([tf.cast(seed, tf.int64), k]))
            return pick(perm[:m])

        ds = tf.data.Dataset.from_tensor_slices((np.arange(steps, dtype=np.int64), sizes))
        ds = ds.map(pick_k)
    opts = tf.data.Options()
    opts.deterministic = True
    return ds.with_options(opts).prefetch(2)
