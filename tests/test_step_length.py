"""`KFACCallback(decay="cosine")` (kfac_keras/step_length.py) against NumPy.

The multiplier against the cosine written out in NumPy; in `fit`, the rate of
every step against it, the logged `step_size` against the RMS of the update
actually applied; `ReduceLROnPlateau` and `optimizer.learning_rate = x` still
act (their ratio scales the rest of the curve); the user's rate is back after
`fit`; unsupported uses raise before anything changes.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from kfac_keras import step_length

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH, EXAMPLES = 8, 24  # 3 steps per epoch


def _numpy_cosine(step, total, final_fraction):
    """Keras's CosineDecay with alpha = final_fraction, written out in NumPy."""
    progress = np.clip(step, 0, total) / total
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + np.cos(np.pi * progress))


@pytest.mark.parametrize("final_fraction", [0.0, 0.1, 1.0])
def test_cosine_factor_matches_numpy(final_fraction):
    steps = np.arange(-1, 13)
    got = [step_length.cosine_factor(int(k), 10, final_fraction) for k in steps]
    np.testing.assert_allclose(got, _numpy_cosine(steps, 10, final_fraction), rtol=1e-12)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(EXAMPLES, 4)).astype("float32"), rng.integers(0, 3, size=EXAMPLES)


def _model(lr=0.01, momentum=0.0):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    model.compile(optimizer=kfac_keras.KFAC(step_rule="orthogonal", learning_rate=lr,
                                            momentum=momentum, adaptive=None,
                                            cov_update_every=1, seed=0), loss=LOSS)
    return model


class StepRecorder(keras.callbacks.Callback):
    """Per step: the rate in the variable before the step, the RMS of the
    update applied, the logged step_size."""

    def __init__(self):
        super().__init__()
        self.rates, self.update_rms, self.step_sizes = [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(self.model.optimizer.learning_rate))
        self.before = [v.numpy() for v in self.model.trainable_variables]

    def on_train_batch_end(self, batch, logs=None):
        update = np.concatenate([(v.numpy() - b).ravel()
                                 for v, b in zip(self.model.trainable_variables, self.before)])
        self.update_rms.append(float(np.sqrt(np.mean(update.astype(np.float64) ** 2))))
        self.step_sizes.append(float(logs["step_size"]))


def test_fit_takes_the_decayed_steps_and_restores_the_rate():
    x, y = _data()
    model = _model(lr=0.01)
    recorder = StepRecorder()  # after KFACCallback: sees the rate it wrote
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False,
              callbacks=[kfac_keras.KFACCallback(verbose=0, decay="cosine"), recorder])
    expected = 0.01 * _numpy_cosine(np.arange(6), 6, 0.1)
    np.testing.assert_allclose(recorder.rates, expected, rtol=1e-6)
    # With momentum 0 the update is -lr * direction, so its RMS is the logged step.
    np.testing.assert_allclose(recorder.step_sizes, recorder.update_rms, rtol=1e-4)
    # ... and the direction's RMS is 0.2 per matrix (Muon's scale), so the steps shrink.
    assert recorder.update_rms[-1] < 0.3 * recorder.update_rms[0]
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01, rel=1e-6)


def test_without_decay_the_rate_stays():
    x, y = _data()
    model = _model(lr=0.01)
    recorder = StepRecorder()
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False,
              callbacks=[kfac_keras.KFACCallback(verbose=0), recorder])
    np.testing.assert_allclose(recorder.rates, 0.01, rtol=1e-6)


def test_reduce_lr_on_plateau_scales_the_rest_of_the_decay():
    x, y = _data()
    model = _model(lr=0.01)
    recorder = StepRecorder()
    # min_delta 1e9: no epoch after the first counts as an improvement, so
    # with patience 0 the rate is halved at the end of epochs 2 and 3.
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0,
                                                min_delta=1e9, verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, shuffle=False,
              callbacks=[kfac_keras.KFACCallback(verbose=0, decay="cosine"), plateau,
                         recorder])
    halvings = np.repeat([1.0, 1.0, 0.5], 3)
    expected = 0.01 * halvings * _numpy_cosine(np.arange(9), 9, 0.1)
    np.testing.assert_allclose(recorder.rates, expected, rtol=1e-5)
    # The last halving came after the last step: the user's rate, halved twice.
    assert float(model.optimizer.learning_rate) == pytest.approx(0.0025, rel=1e-5)


class SetRate(keras.callbacks.Callback):
    """`optimizer.learning_rate = value` after step `at` (0-based, whole run)."""

    def __init__(self, at, value):
        super().__init__()
        self.at, self.value, self.step = at, value, 0

    def on_train_batch_end(self, batch, logs=None):
        if self.step == self.at:
            self.model.optimizer.learning_rate = self.value
        self.step += 1


def test_setting_the_rate_during_fit_rescales_the_decay():
    x, y = _data()
    model = _model(lr=0.01)
    recorder = StepRecorder()
    written_at_1 = 0.01 * _numpy_cosine(1, 6, 0.1)
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False,
              callbacks=[kfac_keras.KFACCallback(verbose=0, decay="cosine"),
                         SetRate(1, written_at_1 * 3.0), recorder])
    ratio = np.array([1, 1, 3, 3, 3, 3])
    np.testing.assert_allclose(recorder.rates, 0.01 * ratio * _numpy_cosine(np.arange(6), 6, 0.1),
                               rtol=1e-5)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.03, rel=1e-5)


def test_a_second_fit_decays_again_from_the_users_rate():
    x, y = _data()
    model = _model(lr=0.02)
    callback = kfac_keras.KFACCallback(verbose=0, decay="cosine")
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])
    recorder = StepRecorder()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback, recorder])
    np.testing.assert_allclose(recorder.rates, 0.02 * _numpy_cosine(np.arange(3), 3, 0.1),
                               rtol=1e-6)


def test_the_decay_is_announced(capsys):
    x, y = _data()
    model = _model(lr=0.01)
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=1,
              callbacks=[kfac_keras.KFACCallback(verbose=1, decay="cosine")])
    out = capsys.readouterr().out
    assert "decay='cosine'" in out and "at step 6 (2 epochs x 3 steps)" in out


def test_decay_with_a_schedule_raises_before_changing_the_model():
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    schedule = keras.optimizers.schedules.CosineDecay(0.01, 10)
    model.compile(optimizer=kfac_keras.KFAC(learning_rate=schedule, adaptive=None), loss=LOSS)
    step = model.train_step
    with pytest.raises(ValueError, match="is a schedule"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                  callbacks=[kfac_keras.KFACCallback(verbose=0, decay="cosine")])
    assert model.train_step == step
    assert model.optimizer.registration is None


def test_decay_of_a_run_of_unknown_length_raises():
    x, y = _data()
    model = _model()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(BATCH)
    with pytest.raises(ValueError, match="steps per epoch are unknown"):
        model.fit(dataset, epochs=1, verbose=0,
                  callbacks=[kfac_keras.KFACCallback(verbose=0, decay="cosine")])


@pytest.mark.parametrize("kwargs, message", [
    ({"decay": "linear"}, "`decay` must be None or one of"),
    ({"decay": "cosine", "final_fraction": 1.5}, "`final_fraction` must be a number in"),
    ({"decay": "cosine", "final_fraction": True}, "`final_fraction` must be a number in"),
    ({"final_fraction": 0.1}, "pass `decay=\"cosine\"` with it"),
])
def test_bad_decay_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kfac_keras.KFACCallback(**kwargs)
