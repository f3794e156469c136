"""`fit` with `KFAC()` defaults on tiny recurrent classifiers (issue 15).

Before the double-backward Fisher product these crashed at the first
damping-rule step (forward mode through the recurrent `While` loop); before
the recurrent blocks every cell got the diagonal fallback."""

import keras
import numpy as np
import pytest

import kfac_keras

LENGTH, VOCABULARY = 8, 6


def _order_task(examples, seed):
    """Class: whether token 1 comes before token 2 (each appears once)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCABULARY, size=(examples, LENGTH))
    for row in tokens:
        first, second = rng.choice(LENGTH, size=2, replace=False)
        row[first], row[second] = 1, 2
    labels = np.array([np.argmax(row == 1) < np.argmax(row == 2) for row in tokens])
    return tokens.astype("int32"), labels.astype("int32")


RECURRENT_LAYERS = {
    "lstm": lambda: [keras.layers.LSTM(8)],
    "bidirectional_lstm": lambda: [keras.layers.Bidirectional(keras.layers.LSTM(6))],
    # Stacked, so that one (slow to trace) training step covers both kinds.
    "gru_simple_rnn": lambda: [keras.layers.GRU(6, return_sequences=True),
                               keras.layers.SimpleRNN(6)],
}

EXPECTED_KINDS = {
    "lstm": ["kronecker (recurrent)"],
    "bidirectional_lstm": ["kronecker (recurrent)"] * 2,
    "gru_simple_rnn": ["kronecker (gru)", "kronecker (recurrent)"],
}


@pytest.mark.parametrize("name", sorted(RECURRENT_LAYERS))
def test_fit_with_defaults_trains_and_uses_recurrent_blocks(name):
    x, y = _order_task(256, seed=0)
    model = keras.Sequential([keras.Input((LENGTH,)), keras.layers.Embedding(VOCABULARY, 4)]
                             + RECURRENT_LAYERS[name]() + [keras.layers.Dense(2)])
    optimizer = kfac_keras.KFAC(seed=0)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # 48 steps: the damping rule runs through the loops; the default rule's
    # fixed-RMS steps (0.2 x lr per entry) need ~40 to leave ln 2 on this task.
    losses = model.fit(x, y, batch_size=32, epochs=6, verbose=0,
                       callbacks=[kfac_keras.KFACCallback(verbose=0)]).history["loss"]

    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05, losses
    recurrent_kinds = [info["kind"] for info in optimizer.registration.describe()
                       if info["layer_class"] in ("LSTM", "GRU", "SimpleRNN")]
    assert recurrent_kinds == EXPECTED_KINDS[name]
    assert np.isfinite(float(optimizer.damping))
