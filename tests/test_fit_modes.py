"""`model.fit` with K-FAC across model kinds and execution modes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras


def _data(n=256):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32") + (x[:, 2] > 0.8)
    return x, y


class SubclassedNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.out = keras.layers.Dense(3)

    def call(self, inputs):
        return self.out(self.hidden(inputs))


def _build(kind):
    if kind == "sequential":
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                                 keras.layers.Dense(3)])
    if kind == "functional":
        inputs = keras.Input((6,))
        h = keras.layers.Dense(16, activation="elu")(inputs)
        return keras.Model(inputs, keras.layers.Dense(3)(h))
    if kind == "nested":
        inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh")])
        inputs = keras.Input((6,))
        return keras.Model(inputs, keras.layers.Dense(3)(inner(inputs)))
    model = SubclassedNet()
    model(np.zeros((1, 6), dtype="float32"))
    return model


def _compile(model, mode, **options):
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, learning_rate=0.05, damping=1e-2, seed=0, **options)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=(mode == "jit"),
                  run_eagerly=(mode == "eager"))
    return optimizer


@pytest.mark.parametrize("kind", ["sequential", "functional", "nested", "subclassed"])
@pytest.mark.parametrize("mode", ["graph", "jit", "eager"])
def test_fit_trains_every_model_kind(kind, mode):
    x, y = _data()
    model = _build(kind)
    optimizer = _compile(model, mode)
    before = model.evaluate(x, y, verbose=0)[0]
    model.fit(x, y, batch_size=64, epochs=2, verbose=0,
              callbacks=[kfac_keras.KFACCallback(verbose=0)])
    after = model.evaluate(x, y, verbose=0)[0]
    assert after < 0.8 * before
    kinds = sorted(b.kind for b in optimizer.registration.blocks)
    assert kinds == ["kronecker (dense)", "kronecker (dense)"]
    assert int(optimizer.iterations.numpy()) == 8


def _assert_modes_agree(build, x, y, batch_size, seed):
    """Trains `build()` in graph, XLA and eager modes (statistics every 2
    steps, inverses every 3) and compares the final weights."""
    results = []
    for mode in ["graph", "jit", "eager"]:
        keras.utils.set_random_seed(seed)
        model = build()
        _compile(model, mode, cov_update_every=2, inv_update_every=3)
        model.fit(x, y, batch_size=batch_size, epochs=2, verbose=0, shuffle=False,
                  callbacks=[kfac_keras.KFACCallback(verbose=0)])
        results.append(model.get_weights())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_modes_agree_on_the_same_batches():
    x, y = _data(128)
    _assert_modes_agree(lambda: _build("sequential"), x, y, batch_size=32, seed=3)


def test_modes_agree_for_a_pooling_convnet():
    # Without XLA a statistics step runs in its own branch (with its own
    # forward pass), other steps in another; the weights must match XLA's
    # single forward pass and the eager run.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 8, 8, 2)).astype("float32")
    y = rng.integers(0, 3, size=64)
    _assert_modes_agree(lambda: keras.Sequential([
        keras.Input((8, 8, 2)), keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(3)]),
        x, y, batch_size=16, seed=4)


def test_cond_with_none_puts_the_nones_back():
    from kfac_keras.training import _cond_with_none

    @tf.function
    def run(pred):
        return _cond_with_none(pred, lambda: (tf.constant(1.0), [None, tf.constant([2.0])]),
                               lambda: (tf.constant(3.0), [None, tf.constant([4.0])]))

    for pred, (first, second) in ((True, (1.0, 2.0)), (False, (3.0, 4.0))):
        scalar, (missing, vector) = run(tf.constant(pred))
        assert missing is None
        assert float(scalar) == first and vector.numpy().tolist() == [second]
    with pytest.raises(ValueError, match="different variables"):
        tf.function(lambda: _cond_with_none(
            tf.constant(True), lambda: [None, tf.constant(1.0)],
            lambda: [tf.constant(1.0), None]))()


def test_custom_loop_equals_fit():
    x, y = _data(64)
    keras.utils.set_random_seed(5)
    model = _build("functional")
    _compile(model, "graph")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False,
              callbacks=[kfac_keras.KFACCallback(verbose=0)])
    keras.utils.set_random_seed(5)
    loop_model = _build("functional")
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, learning_rate=0.05, damping=1e-2, seed=0)
    step = tf.function(kfac_keras.make_train_step(
        loop_model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True)))
    for start in (0, 32):
        logs = step(x[start:start + 32], y[start:start + 32])
        assert np.isfinite(float(logs["loss"]))
    for a, b in zip(model.get_weights(), loop_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fit_twice_and_evaluate_predict_unaffected():
    x, y = _data()
    model = _build("sequential")
    _compile(model, "graph")
    callback = kfac_keras.KFACCallback(verbose=0)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[callback])
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[callback])
    assert int(model.optimizer.iterations.numpy()) == 8
    assert "train_step" not in model.__dict__
    weights = model.get_weights()
    hidden = np.maximum(x @ weights[0] + weights[1], 0)
    np.testing.assert_allclose(model.predict(x, verbose=0), hidden @ weights[2] + weights[3],
                               rtol=1e-4, atol=1e-5)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        y, hidden @ weights[2] + weights[3])
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0)[0], float(expected), rtol=1e-4)


def test_fit_without_callback_raises_with_the_fix():
    x, y = _data(64)
    model = _build("sequential")
    _compile(model, "graph")
    with pytest.raises(RuntimeError, match=r"callbacks=\[kfac_keras.KFACCallback\(\)\]"):
        model.fit(x, y, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_callback_requires_kfac_optimizer():
    x, y = _data(64)
    model = _build("sequential")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(TypeError, match="kfac_keras.KFAC"):
        model.fit(x, y, verbose=0, callbacks=[kfac_keras.KFACCallback()])


def test_registration_report_lists_layers(capsys):
    x, y = _data(64)
    model = _build("functional")
    optimizer = _compile(model, "graph")
    model.fit(x, y, verbose=2, callbacks=[kfac_keras.KFACCallback()])
    printed = capsys.readouterr().out
    assert "K-FAC registration" in printed and "(7, 7)" in printed and "(17, 17)" in printed
    rows = optimizer.registration.describe()
    assert [r["factor_shapes"]["input_factor"] for r in rows] == [(7, 7), (17, 17)]
    assert rows[0]["bytes"] == 4 * 2 * (7 * 7 + 16 * 16)


@pytest.mark.parametrize("jit", [False, True])
def test_excluded_layer_gets_the_plain_gradient_in_graph_mode(jit):
    """An `exclude_layers` layer is updated by -lr * grad inside a compiled step."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8, 6)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="d1"),
                              keras.layers.Dense(2, name="d2")])
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, learning_rate=0.1, momentum=0.0, exclude_layers=["d1"], seed=0)
    step = tf.function(kfac_keras.make_train_step(model, optimizer, "mse", jit_compile=jit))
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x))
    grad = tape.gradient(loss, model.layers[0].kernel).numpy()
    before = model.layers[0].kernel.numpy().copy()
    step(x, y)
    np.testing.assert_allclose(model.layers[0].kernel.numpy() - before, -0.1 * grad,
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_second_fit_without_callback_raises_instead_of_frozen_curvature(mode):
    x, y = _data(64)
    model = _build("sequential")
    optimizer = _compile(model, mode)  # adaptive=None: no batch needed, yet refused
    model.fit(x, y, batch_size=32, verbose=0, callbacks=[kfac_keras.KFACCallback(verbose=0)])
    weights = model.get_weights()
    steps = int(optimizer.iterations.numpy())
    with pytest.raises(RuntimeError, match=r"callbacks=\[kfac_keras.KFACCallback\(\)\]") as error:
        model.fit(x, y, batch_size=32, verbose=0)
    assert "adaptive=None" not in str(error.value)
    assert int(optimizer.iterations.numpy()) == steps
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_apply_gradients_in_a_custom_loop_after_fit_raises():
    x, y = _data(64)
    model = _build("functional")
    optimizer = _compile(model, "graph")
    model.fit(x, y, batch_size=32, verbose=0, callbacks=[kfac_keras.KFACCallback(verbose=0)])
    grads = [tf.zeros_like(v) for v in model.trainable_variables]
    with pytest.raises(RuntimeError, match="make_train_step"):
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
