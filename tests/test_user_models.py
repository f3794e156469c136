"""The Keras user's own models under `fit` (issue 14): custom `train_step`s,
unbuilt models, `compile(optimizer="kfac")`, quiet output, warnings."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import kfac_keras


# ----------------------------------------------------------- custom train_step
class Scale(keras.layers.Layer):
    """Elementwise learned scale: no structured block, so a diagonal one."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


def _per_example_loss(y, y_pred):
    """The user's own per-example loss: half squared error plus a quartic term."""
    error = y_pred - y
    return ops.sum(0.5 * ops.square(error) + 0.25 * error ** 4, axis=-1)


class OwnStepRegressor(keras.Model):
    """A model with its own train_step: a batch-mean loss K-FAC does not know."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(3, activation="tanh")
        self.scale = Scale()
        self.out = keras.layers.Dense(2)
        self.loss_tracker = keras.metrics.Mean(name="own_loss")

    def call(self, inputs):
        return self.out(self.scale(self.hidden(inputs)))

    @property
    def metrics(self):
        return [self.loss_tracker]

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = ops.mean(_per_example_loss(y, self(x, training=True)))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.loss_tracker.update_state(loss)
        return {"own_loss": self.loss_tracker.result()}


def _regression_data(n=16):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = rng.normal(size=(n, 2)).astype("float32")
    return x, y


def _dense_empirical_statistics(weights, x, y):
    """Per-example gradients in NumPy, independently of K-FAC: the dense
    `A`, `G` of both Dense layers and the diagonal of the Scale layer."""
    kernel1, bias1, scale, kernel2, bias2 = weights
    pre1 = x @ kernel1 + bias1
    hidden = np.tanh(pre1)
    scaled = hidden * scale
    error = scaled @ kernel2 + bias2 - y
    grad_out = error + error ** 3                         # dl_n / ds2_n
    grad_scaled = grad_out @ kernel2.T
    grad_scale = grad_scaled * hidden                     # dl_n / dscale per example
    grad_pre1 = grad_scaled * scale * (1 - hidden ** 2)   # dl_n / ds1_n
    n = len(x)
    ones = np.ones((n, 1))
    a1 = np.concatenate([x, ones], 1)
    a2 = np.concatenate([scaled, ones], 1)
    return {
        "hidden": (a1.T @ a1 / n, grad_pre1.T @ grad_pre1 / n),
        "out": (a2.T @ a2 / n, grad_out.T @ grad_out / n),
        "scale": grad_scale.sum(0) ** 2 / n,
    }


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_custom_train_step_factors_equal_the_dense_empirical_fisher(mode):
    x, y = _regression_data()
    model = OwnStepRegressor()
    model(x[:1])
    weights = [ops.convert_to_numpy(w) for w in
               (model.hidden.kernel, model.hidden.bias, model.scale.scale,
                model.out.kernel, model.out.bias)]
    optimizer = kfac_keras.KFAC(adaptive=None, learning_rate=0.1, damping=1e-2,
                                cov_update_every=1, seed=0)
    model.compile(optimizer=optimizer, run_eagerly=mode == "eager")
    history = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    assert "own_loss" in history.history
    expected = _dense_empirical_statistics(weights, x, y)
    blocks = {b.layer.name: b for b in optimizer.registration.blocks}
    for layer in (model.hidden, model.out):
        block = blocks[layer.name]
        dense_a, dense_g = expected["hidden" if layer is model.hidden else "out"]
        np.testing.assert_allclose(block.input_factor.numpy(), dense_a, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(block.output_grad_factor.numpy(), dense_g,
                                   rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(blocks[model.scale.name].diagonal_factors[0].numpy(),
                               expected["scale"], rtol=1e-4, atol=1e-7)
    assert int(optimizer.iterations.numpy()) == 1


def test_custom_train_step_update_is_the_preconditioned_gradient():
    """One step: `-lr * (A + pi g I)^{-1} grad (G + g/pi I)^{-1}` per Dense
    layer from the dense empirical factors (momentum 0 on the first step)."""
    x, y = _regression_data()
    model = OwnStepRegressor()
    model(x[:1])
    before = [ops.convert_to_numpy(v) for v in model.out.weights]
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, step_rule="kl_clip", learning_rate=0.1,
                                damping=0.1, cov_update_every=1, seed=0)
    model.compile(optimizer=optimizer)
    weights = [ops.convert_to_numpy(w) for w in (model.hidden.kernel, model.hidden.bias,
                                     model.scale.scale, model.out.kernel, model.out.bias)]
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0,
              callbacks=[kfac_keras.KFACCallback(verbose=0)])
    a, g = _dense_empirical_statistics(weights, x, y)["out"]
    kernel1, bias1, scale, kernel2, bias2 = weights
    scaled = np.tanh(x @ kernel1 + bias1) * scale
    error = scaled @ kernel2 + bias2 - y
    per_example = error + error ** 3
    grad = np.concatenate([scaled, np.ones((len(x), 1))], 1).T @ per_example / len(x)
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    gamma = np.sqrt(0.1)
    step = np.linalg.inv(a + pi * gamma * np.eye(a.shape[0])) @ grad @ np.linalg.inv(
        g + gamma / pi * np.eye(g.shape[0]))
    after = np.concatenate([ops.convert_to_numpy(model.out.kernel),
                            ops.convert_to_numpy(model.out.bias)[None]], 0)
    expected = np.concatenate([before[0], before[1][None]], 0) - 0.1 * step
    np.testing.assert_allclose(after, expected, rtol=2e-3, atol=1e-6)


class Sampling(keras.layers.Layer):
    """`z = mean + exp(log_var / 2) * eps` (the VAE's reparameterization)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1)

    def call(self, inputs):
        mean, log_var = inputs
        noise = keras.random.normal(ops.shape(mean), seed=self.seed_generator)
        return mean + ops.exp(0.5 * log_var) * noise


class TinyVAE(keras.Model):
    """keras-io's VAE pattern: no `call`, a custom train_step, own metrics."""

    def __init__(self):
        super().__init__()
        inputs = keras.Input((8,))
        hidden = keras.layers.Dense(6, activation="relu")(inputs)
        mean, log_var = keras.layers.Dense(2)(hidden), keras.layers.Dense(2)(hidden)
        self.encoder = keras.Model(inputs, [mean, log_var, Sampling()([mean, log_var])])
        self.decoder = keras.Sequential([keras.Input((2,)),
                                         keras.layers.Dense(6, activation="relu"),
                                         keras.layers.Dense(8, activation="sigmoid")])
        self.total_tracker = keras.metrics.Mean(name="total_loss")
        self.kl_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [self.total_tracker, self.kl_tracker]

    def losses_of(self, data):
        mean, log_var, z = self.encoder(data)
        reconstruction = self.decoder(z)
        reconstruction_loss = ops.mean(ops.sum(
            keras.losses.binary_crossentropy(data[..., None], reconstruction[..., None]), axis=1))
        kl = ops.mean(ops.sum(-0.5 * (1 + log_var - ops.square(mean) - ops.exp(log_var)),
                              axis=1))
        return reconstruction_loss, kl

    def train_step(self, data):
        with tf.GradientTape() as tape:
            reconstruction_loss, kl = self.losses_of(data)
            total = reconstruction_loss + kl
        grads = tape.gradient(total, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.total_tracker.update_state(total)
        self.kl_tracker.update_state(kl)
        return {"loss": self.total_tracker.result(), "kl_loss": self.kl_tracker.result()}


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_vae_custom_train_step_trains_its_whole_objective(mode):
    keras.utils.set_random_seed(0)
    x = (np.random.default_rng(0).random((256, 8)) > 0.5).astype("float32")
    vae = TinyVAE()
    vae.compile(optimizer=kfac_keras.KFAC(seed=0), run_eagerly=mode == "eager")
    _, kl_before = vae.losses_of(x)
    history = vae.fit(x, epochs=3, batch_size=32, verbose=0,
                      callbacks=[kfac_keras.KFACCallback(verbose=0)])
    losses, kls = history.history["loss"], history.history["kl_loss"]
    assert all(kl > 0 for kl in kls)      # the model's own metrics are live
    assert losses[-1] < losses[0]
    _, kl_after = vae.losses_of(x)
    assert float(kl_after) < 0.5 * float(kl_before)  # the KL term is trained too
    assert vae.optimizer.adaptive is None  # "auto" resolved: no batch loss after the step
    assert int(vae.optimizer.iterations.numpy()) == 24
    assert "train_step" not in vae.__dict__


def test_custom_train_step_report_says_empirical_fisher(capsys):
    x, y = _regression_data()
    model = OwnStepRegressor()
    model(x[:1])
    model.compile(optimizer=kfac_keras.KFAC(adaptive=None, seed=0))
    model.fit(x, y, batch_size=8, verbose=0, callbacks=[kfac_keras.KFACCallback()])
    printed = capsys.readouterr().out
    assert "K-FAC registration" not in printed  # fit(verbose=0)
    model.fit(x, y, batch_size=8, verbose=2, callbacks=[kfac_keras.KFACCallback()])
    assert "K-FAC registration" not in capsys.readouterr().out  # only the first time
    fresh = OwnStepRegressor()
    fresh(x[:1])
    fresh.compile(optimizer=kfac_keras.KFAC(adaptive=None, seed=0))
    fresh.fit(x, y, batch_size=8, verbose=2, callbacks=[kfac_keras.KFACCallback()])
    printed = capsys.readouterr().out
    assert "EMPIRICAL Fisher" in printed and "train_step" in printed


def test_custom_train_step_with_explicit_adaptive_options_raises_first():
    x, y = _regression_data()
    model = OwnStepRegressor()
    model(x[:1])
    optimizer = kfac_keras.KFAC(adaptive=kfac_keras.AdaptiveOptions(adapt_damping=True),
                                seed=0)
    model.compile(optimizer=optimizer)
    with pytest.raises(ValueError, match=r"own `train_step` \(OwnStepRegressor.train_step\)"):
        model.fit(x, y, verbose=0, callbacks=[kfac_keras.KFACCallback(verbose=0)])
    assert optimizer.registration is None
    assert int(optimizer.iterations.numpy()) == 0


def test_custom_train_step_without_callback_names_the_custom_step():
    x, y = _regression_data()
    model = OwnStepRegressor()
    model(x[:1])
    model.compile(optimizer=kfac_keras.KFAC(adaptive=None, seed=0))
    before = model.get_weights()
    with pytest.raises(RuntimeError, match=r"(?s)KFACCallback.*own `train_step`"):
        model.fit(x, y, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


class TwoUpdates(OwnStepRegressor):
    def train_step(self, data):
        x, y = data
        for _ in range(2):
            with tf.GradientTape() as tape:
                loss = ops.mean(_per_example_loss(y, self(x, training=True)))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {}


def test_custom_train_step_with_mixed_precision_raises_first():
    x, y = _regression_data()
    model = OwnStepRegressor()
    model(x[:1])
    optimizer = kfac_keras.KFAC(adaptive=None, seed=0)
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(optimizer))
    with pytest.raises(NotImplementedError, match=r"OwnStepRegressor.train_step.*LossScale"):
        model.fit(x, y, verbose=0, callbacks=[kfac_keras.KFACCallback(verbose=0)])
    assert optimizer.registration is None


def test_custom_train_step_applying_twice_is_refused():
    x, y = _regression_data()
    model = TwoUpdates()
    model(x[:1])
    model.compile(optimizer=kfac_keras.KFAC(adaptive=None, seed=0), run_eagerly=True)
    with pytest.raises(RuntimeError, match="twice in one step"):
        model.fit(x, y, verbose=0, callbacks=[kfac_keras.KFACCallback(verbose=0)])


def test_custom_train_step_detection():
    from kfac_keras import custom_step

    assert custom_step.has_custom_train_step(OwnStepRegressor())
    assert not custom_step.has_custom_train_step(keras.Sequential([keras.layers.Dense(1)]))


# ------------------------------------------------------------- unbuilt models
@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_unbuilt_sequential_registers_at_the_first_step(mode):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 5)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    optimizer = kfac_keras.KFAC(seed=0)
    model.compile(optimizer=optimizer, run_eagerly=mode == "eager",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert not model.built
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    assert [b.kind for b in optimizer.registration.blocks] == ["kronecker (dense)"] * 2
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert float(optimizer.num_estimates.numpy()) > 0
    assert int(optimizer.iterations.numpy()) == 12


# ---------------------------------------------------------- names and output
def test_compile_with_the_name_kfac():
    for name in ("kfac", "KFAC"):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=name, loss="mse")
        assert isinstance(model.optimizer, kfac_keras.KFAC)
    model.fit(np.ones((8, 3), "float32"), np.ones((8, 2), "float32"), verbose=0,
              callbacks=[kfac_keras.KFACCallback(verbose=0)])
    assert int(model.optimizer.iterations.numpy()) == 1


def _classifier():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=kfac_keras.KFAC(seed=0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_report_respects_fit_verbose_and_interactive_logging(capsys):
    x, y = np.ones((8, 4), "float32"), np.zeros((8,), "int32")
    _classifier().fit(x, y, verbose=0, callbacks=[kfac_keras.KFACCallback()])
    assert "K-FAC registration" not in capsys.readouterr().out
    keras.config.disable_interactive_logging()
    try:
        _classifier().fit(x, y, verbose=1, callbacks=[kfac_keras.KFACCallback()])
    finally:
        keras.config.enable_interactive_logging()
    assert "K-FAC registration" not in capsys.readouterr().out
    _classifier().fit(x, y, verbose=2, callbacks=[kfac_keras.KFACCallback()])
    assert "K-FAC registration" in capsys.readouterr().out


def test_skipped_steps_print_as_an_integer(capsys):
    x, y = np.ones((8, 4), "float32"), np.zeros((8,), "int32")
    for verbose in (1, 2):
        _classifier().fit(x, y, verbose=verbose, callbacks=[kfac_keras.KFACCallback(verbose=0)])
        printed = capsys.readouterr().out
        assert "kfac_skipped_steps: 0 " in printed or "kfac_skipped_steps: 0\n" in printed, printed
        assert "kfac_skipped_steps: 0.0" not in printed


def test_weight_decay_turning_adaptive_damping_off_is_warned(caplog):
    with caplog.at_level(logging.WARNING):
        optimizer = kfac_keras.KFAC(weight_decay=1e-4)
    assert optimizer.adaptive is None
    assert "weight_decay" in caplog.text and "adaptive damping off" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        kfac_keras.KFAC(use_ema=True, ema_overwrite_frequency=10)
    assert "ema_overwrite_frequency" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        kfac_keras.KFAC()
    assert "adaptive damping off" not in caplog.text


# ------------------------------------------------------------------- the doc
def _doc_snippets():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("\n## Your own model\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_your_own_model_doc_has_the_five_snippets():
    assert len(_doc_snippets()) == 5


@pytest.mark.parametrize("index", range(5))
def test_your_own_model_doc_snippet_runs(index):
    exec(compile(_doc_snippets()[index], f"README.md#your-own-model[{index}]", "exec"), {})
