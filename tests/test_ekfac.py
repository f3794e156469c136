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
    layers = (model.get_layer("hidden"), model.get_layer("out"))
    # Step 1 decomposes and estimates: the estimate is made in the new basis.
    matrices = {layer.name: _per_example_matrices(model, layer, x, y) for layer in layers}
    step(x, y)
    expected = {}
    for layer in layers:
        block = block_for_layer(optimizer, layer)
        expected[layer.name] = _rotated_square_mean(matrices[layer.name], block)
        np.testing.assert_allclose(block.eigenbasis_scalings.numpy(), expected[layer.name],
                                   rtol=1e-4, atol=1e-6 * np.abs(expected[layer.name]).max())

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

    # Steps 2 and 3 keep the basis: moving average with weight
    # min(1 - 1/k, factor_decay), k = 2 then 3.
    for weight in (0.5, 2.0 / 3.0):
        for layer in layers:
            block = block_for_layer(optimizer, layer)
            fresh = _rotated_square_mean(_per_example_matrices(model, layer, x, y), block)
            expected[layer.name] = (weight * block.eigenbasis_scalings.numpy()
                                    + (1.0 - weight) * fresh)
        step(x, y)
        for layer in layers:
            actual = block_for_layer(optimizer, layer).eigenbasis_scalings.numpy()
            np.testing.assert_allclose(actual, expected[layer.name], rtol=1e-4,
                                       atol=1e-6 * np.abs(expected[layer.name]).max())


def _dense_ekfac_update(matrices, inputs, grad, damping, lr, corrected):
    """`-lr (Q diag(S) Q^T + damping I)^{-1} vec(grad)` in float64 NumPy, with
    `Q = kron(Q_A, Q_G)` from `A = mean abar abar^T`, `G = mean g g^T`, and
    `S = mean_n (Q_A^T dW_n Q_G)^2` (EKFAC) or `outer(d_A, d_G)` (eigh)."""
    abar = np.concatenate([inputs, np.ones((len(inputs), 1))], 1)
    g = matrices[:, -1, :]  # the bias row of dW_n = abar_n g_n^T is g_n
    d_a, q_a = np.linalg.eigh(abar.T @ abar / len(abar))
    d_g, q_g = np.linalg.eigh(g.T @ g / len(g))
    if corrected:
        scalings = np.mean(np.einsum("ai,nab,bj->nij", q_a, matrices, q_g) ** 2, axis=0)
    else:
        scalings = np.outer(np.maximum(d_a, 0), np.maximum(d_g, 0))
    q = np.kron(q_a, q_g)
    matrix = q @ np.diag(scalings.reshape(-1)) @ q.T + damping * np.eye(q.shape[0])
    return (-lr * np.linalg.solve(matrix, grad.reshape(-1))).reshape(grad.shape)


def test_ekfac_step_that_decomposes_uses_scalings_estimated_in_the_new_basis():
    """With inv_update_every = scale_update_every = 1 every step decomposes and
    re-estimates; the update is EKFAC's with S from the fresh basis, not eigh's."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = rng.integers(0, 3, size=32)
    model = _model(False)
    lr, damping = 0.2, 0.003
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = kfac_keras.KFAC(
        adaptive=None, norm_constraint=None, step_rule="kl_clip", learning_rate=lr, momentum=0.0,
        damping=damping, inverse_method="ekfac", estimation_mode="empirical",
        cov_update_every=1, inv_update_every=1, scale_update_every=1, seed=6)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    hidden_outputs = keras.Model(model.inputs, model.get_layer("hidden").output)
    layer_inputs = {"hidden": x.astype(np.float64),
                    "out": hidden_outputs(x).numpy().astype(np.float64)}
    layers = (model.get_layer("hidden"), model.get_layer("out"))
    matrices = {l.name: _per_example_matrices(model, l, x, y) for l in layers}
    before = {l.name: np.concatenate([l.kernel.numpy(), l.bias.numpy()[None]], 0)
              .astype(np.float64) for l in layers}
    step(x, y)
    for layer in layers:
        grad = matrices[layer.name].mean(axis=0)  # the batch-mean loss gradient
        change = np.concatenate([layer.kernel.numpy(), layer.bias.numpy()[None]], 0) \
            - before[layer.name]
        ekfac = _dense_ekfac_update(matrices[layer.name], layer_inputs[layer.name], grad,
                                    damping, lr, corrected=True)
        eigh = _dense_ekfac_update(matrices[layer.name], layer_inputs[layer.name], grad,
                                   damping, lr, corrected=False)
        assert np.linalg.norm(change - ekfac) <= 2e-3 * np.linalg.norm(ekfac), layer.name
        assert np.linalg.norm(change - eigh) > 0.03 * np.linalg.norm(ekfac), layer.name


def test_ekfac_update_inverts_the_corrected_kronecker_eigenbasis_matrix():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 3)).astype("float32")
    y = rng.integers(0, 3, size=20)
    model = _model(False)
    lr, damping = 0.3, 0.02
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, step_rule="kl_clip", 
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


def test_every_kronecker_kind_gets_ekfac():
    """Grouped and depthwise convolutions, separable convolutions and
    Embedding keep their Kronecker blocks under EKFAC, and a training step
    estimates their scalings (the first estimate replaces `outer(d_A, d_G)`,
    checked against the NumPy oracle for the embedding)."""
    tokens = keras.Input((5,), dtype="int32")
    s = keras.layers.Embedding(9, 4, name="embedding")(tokens)
    s = keras.layers.Reshape((5, 4, 1))(s)
    s = keras.layers.Conv2D(4, 2, name="conv")(s)
    s = keras.layers.Conv2D(4, 1, groups=2, name="grouped")(s)
    s = keras.layers.DepthwiseConv2D(2, name="dw")(s)
    s = keras.layers.SeparableConv2D(2, 1, name="sep")(s)
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(s))
    model = keras.Model(tokens, out)
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, learning_rate=0.01,
                                momentum=0.0, seed=0, inverse_method="ekfac",
                                cov_update_every=1, estimation_mode="empirical")
    step = kfac_keras.make_train_step(model, optimizer, "mse")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 9, size=(6, 5)).astype("int32")
    y = rng.normal(size=(6, 2)).astype("float32")
    embedding = model.get_layer("embedding")
    per_example = []
    for n in range(len(ids)):  # sqrt(c) NLL: c = 1/2 outputs, NLL = squared error
        with tf.GradientTape() as tape:
            nll = tf.reduce_sum(tf.square(y[n:n + 1] - model(ids[n:n + 1]))) / np.sqrt(2.0)
        per_example.append(tf.convert_to_tensor(
            tape.gradient(nll, embedding.embeddings)).numpy().astype(np.float64))
    assert np.isfinite(float(step(ids, y)["loss"]))
    for layer in model.layers:
        if not layer.trainable_variables:
            continue
        block = block_for_layer(optimizer, layer)
        assert block.uses_eigenbasis_scalings, layer.name
    block = block_for_layer(optimizer, embedding)
    q = block.output_grad_eigenvectors.numpy().astype(np.float64)
    expected = np.mean(np.einsum("nvb,bj->nvj", np.stack(per_example), q) ** 2, axis=0)
    np.testing.assert_allclose(block.eigenbasis_scalings.numpy(), expected,
                               rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_ekfac_trains_in_fit():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = _model(False)
    model.compile(optimizer=kfac_keras.KFAC(adaptive=None, norm_constraint=None, step_rule="kl_clip", learning_rate=0.05, momentum=0.5, damping=0.05,
                                            inverse_method="ekfac", scale_update_every=1,
                                            cov_update_every=2, inv_update_every=4, seed=4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]


def test_jit_compiled_step_keeps_decompositions_out_of_xla(monkeypatch):
    """`make_train_step(jit_compile=True)` with EKFAC, decompositions outside
    XLA (CPU): the steps that decompose and then re-estimate the scalings
    must not run `eigh` inside the compiled part of the step. Every `eigh`
    is traced outside an XLA context, and the run equals the uncompiled one
    (weights and scalings)."""
    from tensorflow.python.ops import control_flow_util
    from kfac_keras import linalg

    traced_inside_xla = []
    original = linalg.clipped_eigh

    def recording_eigh(matrix):
        graph = tf.compat.v1.get_default_graph()
        traced_inside_xla.append(control_flow_util.GraphOrParentsInXlaContext(graph))
        return original(matrix)

    monkeypatch.setattr(linalg, "clipped_eigh", recording_eigh)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.integers(0, 3, size=16)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    runs = {}
    for jit_compile in (True, False):
        keras.utils.set_random_seed(3)
        model = _model(False)
        optimizer = kfac_keras.KFAC(
            adaptive=None, norm_constraint=None, learning_rate=0.1, momentum=0.5,
            damping=0.01, inverse_method="ekfac", cov_update_every=1, inv_update_every=2,
            scale_update_every=1, decomposition_jit_compile=False, seed=8)
        step = tf.function(kfac_keras.make_train_step(model, optimizer, loss,
                                                      jit_compile=jit_compile))
        for _ in range(5):  # decomposes at steps 0, 1, 2 (early) and 4
            step(x, y)
        block = block_for_layer(optimizer, model.get_layer("out"))
        runs[jit_compile] = ([v.numpy() for v in model.trainable_variables],
                             block.eigenbasis_scalings.numpy())
        if jit_compile:
            assert traced_inside_xla and not any(traced_inside_xla), traced_inside_xla
    for compiled, plain in zip(runs[True][0] + [runs[True][1]], runs[False][0] + [runs[False][1]]):
        np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-6)


class OwnStepSequential(keras.Sequential):
    """A Sequential model with its own `train_step` (`KFACCallback` runs it
    through `kfac_keras.custom_step`)."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {"own_loss": loss}


def test_custom_train_step_estimates_scalings_after_the_decomposition():
    """In a model's own `train_step`, a step that decomposes and re-estimates
    decomposes first: the estimate survives (one estimate counted, `S` is not
    the Kronecker spectrum `outer(d_A, d_G)` a later decomposition would
    reset it to)."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(12, 3)).astype("float32")
    y = rng.normal(size=(12, 2)).astype("float32")
    model = OwnStepSequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                               keras.layers.Dense(2)])
    model.compile(optimizer=kfac_keras.KFAC(
        adaptive=None, norm_constraint=None, learning_rate=0.05, inverse_method="ekfac",
        cov_update_every=1, inv_update_every=1, scale_update_every=1, seed=0))
    model.fit(x, y, batch_size=12, epochs=1, verbose=0,
              callbacks=[kfac_keras.KFACCallback(verbose=0)])
    for layer in model.layers:
        block = block_for_layer(model.optimizer, layer)
        assert float(block.scaling_estimates.numpy()) == 1.0, layer.name
        spectrum = np.outer(block.input_eigenvalues.numpy(),
                            block.output_grad_eigenvalues.numpy())
        assert not np.allclose(block.eigenbasis_scalings.numpy(), spectrum, rtol=1e-3), layer.name
