"""EKFAC (George et al. 2018) against NumPy computations from per-example gradients.

Oracle: per-example gradients `dW_n` of each example's NLL from separate
`tf.GradientTape`s (one tape per example, training labels as targets via
`estimation_mode="empirical"`, so nothing is sampled), rotated into the
block's eigenbasis and squared in float64 NumPy:
`S = mean_n (Q_A^T dW_n Q_G)^2`. The eigenbasis itself is checked to
diagonalize the NumPy second moment of the layer inputs. Tolerances: 1e-4
relative (float32 products of ~10 terms), 2e-4 for the update.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from kfac_keras.blocks.errors import UnsupportedLayerError
from kfac_keras.blocks.kronecker import KroneckerBlock
from conftest import block_for_layer


def _model(sequence):
    if sequence:  # the first Dense sees (batch, 4, 3): 4 locations per example
        inputs = keras.Input((4, 3))
        h = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
        h = keras.layers.Flatten()(h)
    else:
        inputs = keras.Input((3,))
        h = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
    out = keras.layers.Dense(3, name="out")(h)
    return keras.Model(inputs, out)


def _per_example_matrices(model, layer, x, y):
    """`[dK; db]` of each example's NLL, from one tape per example (float64)."""
    matrices = []
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            logits = model(x[n:n + 1])
            nll = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
                y[n:n + 1], logits, from_logits=True))
        kernel, bias = tape.gradient(nll, [layer.kernel, layer.bias])
        matrices.append(np.concatenate([kernel.numpy(), bias.numpy()[None]], 0)
                        .astype(np.float64))
    return np.stack(matrices)


def _rotated_square_mean(matrices, block):
    q_in = block.input_eigenvectors.numpy().astype(np.float64)
    q_out = block.output_grad_eigenvectors.numpy().astype(np.float64)
    rotated = np.einsum("ai,nab,bj->nij", q_in, matrices, q_out)
    return np.mean(rotated ** 2, axis=0)


@pytest.mark.parametrize("sequence", [False, True])
def test_corrected_diagonal_is_mean_of_rotated_squared_per_example_gradients(sequence):
    rng = np.random.default_rng(0)
    shape = (24, 4, 3) if sequence else (24, 3)
    x = rng.normal(size=shape).astype("float32")
    y = rng.integers(0, 3, size=24)
    model = _model(sequence)
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, 
        learning_rate=0.05, momentum=0.0, damping=0.01, inverse_method="ekfac",
        estimation_mode="empirical", cov_update_every=100, inv_update_every=100,
        scale_update_every=1, factor_decay=0.9, seed=1)
    step = kfac_keras.make_train_step(
        model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    step(x, y)  # statistics, a scale estimate, then the eigenbasis (scalings reset)
    for layer in (model.get_layer("hidden"), model.get_layer("out")):
        block = block_for_layer(optimizer, layer)
        d_in = block.input_eigenvalues.numpy()
        d_out = block.output_grad_eigenvalues.numpy()
        np.testing.assert_allclose(block.eigenbasis_scalings.numpy(),
                                   np.outer(d_in, d_out), rtol=1e-6)

    # The eigenbasis diagonalizes A computed in NumPy from the layer inputs.
    hidden = model.get_layer("hidden")
    block = block_for_layer(optimizer, hidden)
    rows = x.reshape(-1, 3).astype(np.float64)
    rows = np.concatenate([rows, np.ones((len(rows), 1))], 1)
    a = rows.T @ rows / len(x)
    q = block.input_eigenvectors.numpy().astype(np.float64)
    rotated_a = q.T @ a @ q
    off = rotated_a - np.diag(np.diag(rotated_a))
    assert np.abs(off).max() < 1e-4 * np.abs(a).max()

    # Step 2: the first estimate in this basis replaces the reset value.
    expected = {}
    for layer in (hidden, model.get_layer("out")):
        matrices = _per_example_matrices(model, layer, x, y)
        expected[layer.name] = _rotated_square_mean(matrices, block_for_layer(optimizer, layer))
    step(x, y)
    for layer in (hidden, model.get_layer("out")):
        actual = block_for_layer(optimizer, layer).eigenbasis_scalings.numpy()
        np.testing.assert_allclose(actual, expected[layer.name], rtol=1e-4,
                                   atol=1e-6 * np.abs(expected[layer.name]).max())

    # Step 3: moving average with weight min(1 - 1/2, factor_decay) = 0.5.
    previous = {l.name: block_for_layer(optimizer, l).eigenbasis_scalings.numpy()
                for l in (hidden, model.get_layer("out"))}
    for layer in (hidden, model.get_layer("out")):
        matrices = _per_example_matrices(model, layer, x, y)
        fresh = _rotated_square_mean(matrices, block_for_layer(optimizer, layer))
        expected[layer.name] = 0.5 * previous[layer.name] + 0.5 * fresh
    step(x, y)
    for layer in (hidden, model.get_layer("out")):
        actual = block_for_layer(optimizer, layer).eigenbasis_scalings.numpy()
        np.testing.assert_allclose(actual, expected[layer.name], rtol=1e-4,
                                   atol=1e-6 * np.abs(expected[layer.name]).max())


def test_ekfac_update_inverts_the_corrected_kronecker_eigenbasis_matrix():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 3)).astype("float32")
    y = rng.integers(0, 3, size=20)
    model = _model(False)
    lr, damping = 0.3, 0.02
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, 
        learning_rate=lr, momentum=0.0, damping=damping, inverse_method="ekfac",
        cov_update_every=100, inv_update_every=100, scale_update_every=1, seed=2)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    step(x, y)
    before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        value = loss(y, model(x))
    grads = [g.numpy().astype(np.float64)
             for g in tape.gradient(value, model.trainable_variables)]
    step(x, y)  # this step's scale estimate is used by its own update
    after = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    for index, name in enumerate(("hidden", "out")):
        block = block_for_layer(optimizer, model.get_layer(name))
        q = np.kron(block.input_eigenvectors.numpy().astype(np.float64),
                    block.output_grad_eigenvectors.numpy().astype(np.float64))
        scalings = block.eigenbasis_scalings.numpy().astype(np.float64).reshape(-1)
        matrix = q @ np.diag(scalings) @ q.T + damping * np.eye(len(scalings))
        v = np.concatenate([grads[2 * index], grads[2 * index + 1][None]], 0)
        expected = -lr * np.linalg.solve(matrix, v.reshape(-1))
        change = np.concatenate([after[2 * index] - before[2 * index],
                                 (after[2 * index + 1] - before[2 * index + 1])[None]], 0)
        assert np.linalg.norm(change.reshape(-1) - expected) <= 2e-4 * np.linalg.norm(expected)


def test_ekfac_needs_per_example_rows_and_validates_options():
    class NoPerExample(KroneckerBlock):
        pass

    with pytest.raises(UnsupportedLayerError, match="per-example"):
        NoPerExample("x", [], None, 2, 2, inverse_method="ekfac")
    NoPerExample("x", [], None, 2, 2, inverse_method="eigh")  # fine without the hook
    with pytest.raises(ValueError, match="scale_update_every"):
        kfac_keras.KFAC(scale_update_every=5)
    with pytest.raises(ValueError, match="scale_update_every"):
        kfac_keras.KFAC(inverse_method="ekfac", scale_update_every=0)
    config = kfac_keras.KFAC(inverse_method="ekfac", scale_update_every=3).get_config()
    assert kfac_keras.KFAC.from_config(config).scale_update_every == 3


def test_ekfac_trains_in_fit():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = _model(False)
    model.compile(optimizer=kfac_keras.KFAC(adaptive=None, norm_constraint=None, learning_rate=0.05, momentum=0.5, damping=0.05,
                                            inverse_method="ekfac", scale_update_every=1,
                                            cov_update_every=2, inv_update_every=4, seed=4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
