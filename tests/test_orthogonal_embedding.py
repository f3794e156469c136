"""Embedding tables under `step_rule="orthogonal"` against NumPy.

The table takes the KL-clipped step at `EMBEDDING_LEARNING_RATE_FACTOR`
times the learning rate, the clip scale `min(1, sqrt(c / sum Delta.g))`
computed in NumPy over the variables that are not orthogonalised (the table
and a LayerNormalization's scale and offset), from `Delta` (the `kl_clip`
rule's unclipped first step on the same factors; `EmbeddingBlock`'s `Delta`
itself is checked against dense one-hot factors in test_blocks_embedding.py)
and the Keras-autodiff gradient `g`; the Dense layer is still orthogonalised
(`0.2 sqrt(max(rows, cols)) NS_3(Delta)`, NumPy loop); rows of ids absent
from the batch stay still.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from kfac_keras import orthogonal_step
from orthogonal_oracle import numpy_newton_schulz

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
VOCABULARY, LENGTH, DIM = 7, 3, 4


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((LENGTH,), dtype="int32")
    h = keras.layers.Embedding(VOCABULARY, DIM, name="tokens")(inputs)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(h))


def _data():
    rng = np.random.default_rng(10)
    ids = rng.integers(0, 5, size=(8, LENGTH)).astype("int32")  # ids 5 and 6 absent
    return ids, rng.integers(0, 2, size=(8,)).astype("int32")


def _first_update(rule, lr, norm_constraint):
    model = _model()
    # momentum 0: the first update is then `-lr D` under heavy ball and Nesterov alike.
    optimizer = kfac_keras.KFAC(step_rule=rule, learning_rate=lr, momentum=0.0, adaptive=None,
                                norm_constraint=norm_constraint, damping=0.1,
                                cov_update_every=1, estimation_mode="empirical", seed=0)
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    before = {v.path: v.numpy().astype(np.float64) for v in model.trainable_variables}
    ids, y = _data()
    step(ids, y)
    return {v.path: v.numpy() - before[v.path] for v in model.trainable_variables}


def _gradient():
    """Keras-autodiff gradient of the batch-mean loss at the initial weights."""
    model = _model()
    ids, y = _data()
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(ids, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    return {v.path: np.asarray(tf.convert_to_tensor(g), np.float64)
            for v, g in zip(model.trainable_variables, grads)}


@pytest.mark.parametrize("norm_constraint", [None, 1e-7])
def test_embedding_takes_the_kl_clipped_step_times_the_factor(norm_constraint):
    # Delta read off a large step, so float32 rounding of the weights is small.
    delta = {k: -u for k, u in _first_update("kl_clip", 1.0, None).items()}
    lr = 0.5
    got = _first_update("orthogonal", lr, norm_constraint)
    grads = _gradient()
    clipped = [k for k in delta if not k.startswith("out/")]  # table, LN gamma and beta
    assert any(k.startswith("tokens/") for k in clipped) and len(clipped) == 3, clipped
    scale = 1.0
    if norm_constraint is not None:
        size = sum(np.sum(delta[k] * grads[k]) for k in clipped)
        scale = min(1.0, np.sqrt(norm_constraint / size))
        assert scale < 0.5  # the bound binds
    factor = orthogonal_step.EMBEDDING_LEARNING_RATE_FACTOR
    assert factor == 30.0
    for k in clipped:
        multiplier = factor if k.startswith("tokens/") else 1.0
        np.testing.assert_allclose(got[k], -lr * multiplier * scale * delta[k],
                                   rtol=1e-3, atol=1e-7, err_msg=k)
    table = [k for k in clipped if k.startswith("tokens/")][0]
    assert np.abs(got[table][:5]).min(axis=1).max() > 0
    np.testing.assert_array_equal(got[table][5:], 0.0)  # absent ids stay still
    # The Dense layer is still orthogonalised: [K; b] as one matrix.
    kernel, bias = "out/kernel", "out/bias"
    matrix = np.concatenate([delta[kernel], delta[bias][None]], axis=0)
    expected = -lr * 0.2 * np.sqrt(max(matrix.shape)) * numpy_newton_schulz(matrix, 3)
    np.testing.assert_allclose(got[kernel], expected[:-1], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(got[bias], expected[-1], rtol=1e-3, atol=1e-7)
