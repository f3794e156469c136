"""Embedding block `diag(freq) (x) G` vs NumPy (one-hot Dense as the oracle).

Oracles: the Embedding as a bias-free Dense layer on one-hot inputs, built
densely in NumPy (`A = onehot^T onehot / m`, a full `vocab x vocab` matrix);
per-example gradients from separate tapes; dense `np.kron` solves.
Tolerances: 1e-5 relative for factors and gradients, 1e-4 for products.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from block_helpers import built, kronecker_damped_solve, relative_error
from kfac_keras.blocks.embedding import EmbeddingBlock

VOCAB, DIM = 7, 3


def _embedding(name="embedding"):
    layer = keras.layers.Embedding(VOCAB, DIM, name=name)
    layer.build((None,))
    return layer


def _one_hot_factors(ids_list, grads_list, m):
    onehot = np.concatenate([np.eye(VOCAB)[np.asarray(i).reshape(-1)] for i in ids_list])
    grads = np.concatenate([np.asarray(g, np.float64).reshape(-1, DIM) for g in grads_list])
    return onehot.T @ onehot / m, grads.T @ grads / grads.shape[0]


def test_factors_equal_one_hot_dense_factors():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(4, 5))
    grads = rng.normal(size=(4, 5, DIM)).astype("float32")
    block = built(EmbeddingBlock(_embedding()))
    frequencies, g = block.compute_factors([(ids, grads)], tf.constant(4.0))
    a_np, g_np = _one_hot_factors([ids], [grads], 4)
    np.testing.assert_allclose(np.diag(frequencies.numpy()), a_np, atol=1e-7)
    assert relative_error(g, g_np) < 1e-5


def test_shared_embedding_pools_uses_and_accepts_float_ids():
    """Two lookups (e.g. a shared encoder on two inputs): counts add up, G is
    averaged over all positions of both uses; float ids are truncated like
    Keras does."""
    rng = np.random.default_rng(1)
    ids1 = rng.integers(0, VOCAB, size=(3, 4))
    ids2 = rng.integers(0, VOCAB, size=(3, 2))
    g1 = rng.normal(size=(3, 4, DIM)).astype("float32")
    g2 = rng.normal(size=(3, 2, DIM)).astype("float32")
    block = built(EmbeddingBlock(_embedding()))
    frequencies, g = block.compute_factors([(ids1.astype("float32"), g1), (ids2, g2)],
                                           tf.constant(3.0))
    a_np, g_np = _one_hot_factors([ids1, ids2], [g1, g2], 3)
    np.testing.assert_allclose(np.diag(frequencies.numpy()), a_np, atol=1e-7)
    assert relative_error(g, g_np) < 1e-5


def test_captures_give_per_example_gradients():
    rng = np.random.default_rng(2)
    ids = rng.integers(0, VOCAB, size=(3, 4)).astype("int32")
    targets = rng.normal(size=(3, 2)).astype("float32")
    layer = _embedding("tokens")
    model = keras.Sequential([keras.Input((4,), dtype="int32"), layer,
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    registration = kfac_keras.register(model)
    kinds = {info["block"]: info["kind"] for info in registration.describe()}
    assert kinds[layer.path] == EmbeddingBlock.kind
    with tf.GradientTape() as tape:
        with registration.capture() as recorder:
            y = model(ids)
        objective = tf.reduce_sum(tf.square(y - targets))
    (captured_ids, output), = recorder.for_layer(layer)
    np.testing.assert_array_equal(captured_ids.numpy(), ids)
    grads = tape.gradient(objective, output).numpy()
    for n in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(ids[n:n + 1]) - targets[n]))
        table_grad = tf.convert_to_tensor(tape.gradient(loss, layer.embeddings)).numpy()
        expected = np.eye(VOCAB)[ids[n]].T @ grads[n]
        assert relative_error(table_grad, expected) < 1e-5


@pytest.mark.parametrize("method", ["cholesky", "inverse", "eigh"])
def test_damped_inverse_matches_dense_kronecker_and_sparse_rows(method):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, VOCAB - 1, size=(5, 4))  # the last token never occurs
    grads = rng.normal(size=(5, 4, DIM)).astype("float32")
    block = built(EmbeddingBlock(_embedding(), inverse_method=method))
    block.update_statistics([(ids, grads)], None, tf.constant(5.0), 0.0)
    damping = 0.04
    block.update_inverses(tf.constant(damping))
    a_np, g_np = _one_hot_factors([ids], [grads], 5)
    v = rng.normal(size=(VOCAB, DIM)).astype("float32")
    expected = kronecker_damped_solve(a_np, g_np, v, damping, method)
    actual = block.multiply_damped_inverse([tf.constant(v)], damping)[0].numpy()
    assert relative_error(actual, expected) < 1e-4

    # The sparse gradient (rows 1, 4, 1 with a duplicate) gives the same
    # result as its dense form, and stays sparse.
    indices = tf.constant([1, 4, 1])
    values = tf.constant(rng.normal(size=(3, DIM)).astype("float32"))
    sparse = tf.IndexedSlices(values, indices, tf.constant([VOCAB, DIM]))
    result, = block.multiply_damped_inverse([sparse], damping)
    assert isinstance(result, tf.IndexedSlices)
    dense = np.zeros((VOCAB, DIM))
    np.add.at(dense, indices.numpy(), values.numpy())
    expected = kronecker_damped_solve(a_np, g_np, dense, damping, method)
    assert relative_error(tf.convert_to_tensor(result).numpy(), expected) < 1e-4


def test_optimizer_preconditions_sparse_embedding_gradient():
    """The training step passes the Embedding's IndexedSlices gradient to the
    block without densifying it; through `KFAC.precondition` it gives the same
    dense result as the dense gradient."""
    rng = np.random.default_rng(4)
    ids = rng.integers(0, VOCAB, size=(8, 3)).astype("int32")
    y = rng.integers(0, 2, size=(8,)).astype("int32")
    layer = _embedding("tokens")
    model = keras.Sequential([keras.Input((3,), dtype="int32"), layer,
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    optimizer = kfac_keras.KFAC(learning_rate=0.1, damping=0.1, seed=0, cov_update_every=1)
    step = kfac_keras.make_train_step(
        model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    block = optimizer.registration.block_of(layer.embeddings)
    received = []
    original = block.multiply_damped_inverse

    def spy(grads, damping):
        received.append(type(grads[0]))
        return original(grads, damping)

    block.multiply_damped_inverse = spy
    step(ids, y)
    step(ids, y)
    # The training step hands the block the sparse gradient itself.
    assert received == [tf.IndexedSlices, tf.IndexedSlices]
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model(ids))
    sparse = tape.gradient(loss, layer.embeddings)
    assert isinstance(sparse, tf.IndexedSlices)
    from_sparse, = optimizer.precondition([sparse], [layer.embeddings])
    from_dense, = optimizer.precondition([tf.convert_to_tensor(sparse)], [layer.embeddings])
    assert not isinstance(from_sparse, tf.IndexedSlices)
    np.testing.assert_allclose(from_sparse.numpy(), from_dense.numpy(), rtol=1e-5, atol=1e-7)
    assert np.abs(from_dense.numpy()).max() > 0


def test_ekfac_scalings_and_sparse_rows_match_one_hot_oracle():
    """EKFAC on the diagonal input factor: `S = mean_n (dW_n Q_G)^2` with
    `dW_n = onehot_n^T grads_n` (NumPy, one-hot rows), and the damped inverse
    `(kron(I, Q) diag(S) kron(I, Q)^T + damping I)^{-1}`, dense and sparse."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, VOCAB - 1, size=(6, 4))
    ids[0, :2] = 2  # a token twice in one example: its rows add before squaring
    grads = rng.normal(size=(6, 4, DIM)).astype("float32")
    block = built(EmbeddingBlock(_embedding(), inverse_method="ekfac"))
    captures = [(ids, grads)]
    block.update_statistics(captures, None, tf.constant(6.0), 0.0)
    block.update_inverses(tf.constant(0.0))
    block.update_scalings(captures, tf.constant(6.0), 0.95)
    _, g_np = _one_hot_factors([ids], [grads], 6)
    _, q = np.linalg.eigh(g_np)
    onehot = np.eye(VOCAB)[ids]  # (m, T, vocab)
    per_example = np.einsum("ntv,ntd->nvd", onehot, grads.astype(np.float64))
    scalings = np.mean((per_example @ q) ** 2, axis=0)
    assert relative_error(block.eigenbasis_scalings.numpy(), scalings) < 1e-4
    damping = 0.03
    basis = np.kron(np.eye(VOCAB), q)
    matrix = basis @ np.diag(scalings.reshape(-1)) @ basis.T + damping * np.eye(VOCAB * DIM)
    v = rng.normal(size=(VOCAB, DIM)).astype("float32")
    expected = np.linalg.solve(matrix, v.reshape(-1).astype(np.float64)).reshape(v.shape)
    actual = block.multiply_damped_inverse([tf.constant(v)], damping)[0].numpy()
    assert relative_error(actual, expected) < 1e-4
    indices = tf.constant([3, 2, 3])
    values = tf.constant(rng.normal(size=(3, DIM)).astype("float32"))
    result, = block.multiply_damped_inverse(
        [tf.IndexedSlices(values, indices, tf.constant([VOCAB, DIM]))], damping)
    assert isinstance(result, tf.IndexedSlices)
    dense = np.zeros((VOCAB, DIM))
    np.add.at(dense, indices.numpy(), values.numpy())
    expected = np.linalg.solve(matrix, dense.reshape(-1)).reshape(dense.shape)
    assert relative_error(tf.convert_to_tensor(result).numpy(), expected) < 1e-4


def test_loss_scale_factor_keeps_the_embedding_gradient_sparse():
    """With `loss_scale_factor` the block still receives the IndexedSlices
    gradient (divided by the factor), and the step equals the unscaled one."""
    rng = np.random.default_rng(8)
    ids = rng.integers(0, VOCAB, size=(8, 3)).astype("int32")
    y = rng.integers(0, 2, size=(8,)).astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights, received = [], []
    for scale in (None, 8.0):
        keras.utils.set_random_seed(0)
        layer = _embedding("tokens")
        model = keras.Sequential([keras.Input((3,), dtype="int32"), layer,
                                  keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
        optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, learning_rate=0.1,
                                    damping=0.1, seed=0, cov_update_every=1,
                                    loss_scale_factor=scale)
        step = kfac_keras.make_train_step(model, optimizer, loss)
        block = optimizer.registration.block_of(layer.embeddings)
        original = block.multiply_damped_inverse

        def spy(grads, damping, original=original):
            received.append(type(grads[0]))
            return original(grads, damping)

        block.multiply_damped_inverse = spy
        step(ids, y)
        weights.append([v.numpy() for v in model.trainable_variables])
    assert received == [tf.IndexedSlices, tf.IndexedSlices]
    for unscaled, scaled in zip(*weights):
        np.testing.assert_allclose(scaled, unscaled, rtol=1e-5, atol=1e-7)
