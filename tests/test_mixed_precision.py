"""K-FAC under Keras mixed precision ("mixed_float16" and "mixed_bfloat16").

Under "mixed_float16", `model.compile` wraps the optimizer in a
`keras.optimizers.LossScaleOptimizer`; `KFACCallback` and `make_train_step`
unwrap it and keep its dynamic loss scaling. Checked here: training converges,
the K-FAC state stays float32, the factors equal a float64 NumPy computation
(so the loss scale does not leak into the statistics), and a batch whose
gradients overflow in float16 is skipped without touching the factors.
"""

import keras
import numpy as np
import pytest

import kfac_keras
from conftest import block_for_layer
from kfac_keras import guards

POLICIES = ["mixed_float16", "mixed_bfloat16"]


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _problem(count=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 4)).astype("float32")
    y = ((x[:, 0] + x[:, 1] > 0).astype("int32")
         + (x[:, 2] > 1.0).astype("int32"))
    return x, y


def _model():
    # The output layer in float32, as Keras recommends for mixed precision;
    # the hidden layer computes in float16 / bfloat16.
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh", name="hidden"),
        keras.layers.Dense(3, activation="softmax", dtype="float32", name="out"),
    ])


def _compile(model, **options):
    settings = dict(learning_rate=0.1, damping=1e-2, seed=1, cov_update_every=1,
                    inv_update_every=2, adaptive=None, norm_constraint=None)
    settings.update(options)
    model.compile(optimizer=kfac_keras.KFAC(**settings),
                  loss="sparse_categorical_crossentropy")
    return model


def _kfac(model):
    optimizer = model.optimizer
    return getattr(optimizer, "inner_optimizer", optimizer)


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_fit_converges_and_state_stays_float32(policy):
    x, y = _problem()
    model = _compile(_model())
    assert model.layers[0].compute_dtype == policy.split("_")[1]
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    losses = history.history["loss"]
    # A constant predictor has loss >= log(3) = 1.10 on three classes; the
    # labels are (almost) a function of x.
    assert losses[-1] < 0.45, losses
    assert history.history["kfac_skipped_steps"][-1] == 0
    optimizer = _kfac(model)
    state = guards.block_state_variables(optimizer)
    assert state
    assert all(v.dtype == "float32" for v in state), [(v.path, v.dtype) for v in state]
    assert optimizer.damping.dtype == "float32"
    for layer in model.layers:
        assert all(w.dtype == "float32" for w in layer.trainable_weights)


def _oracle_factors(model, x, y):
    """Float64 NumPy factors of the empirical Fisher for the two Dense layers."""
    w1, b1 = [np.asarray(w, np.float64) for w in model.layers[0].get_weights()]
    w2, b2 = [np.asarray(w, np.float64) for w in model.layers[1].get_weights()]
    x = x.astype(np.float64)
    hidden = np.tanh(x @ w1 + b1)
    logits = hidden @ w2 + b2
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    onehot = np.eye(3)[y]
    # sum_n NLL_n (c_n = 1 for a mean-reduced loss): d/d logits = p - e_y.
    out_grads = probs - onehot
    hidden_grads = (out_grads @ w2.T) * (1.0 - hidden ** 2)
    m = x.shape[0]

    def with_one(a):
        return np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)

    return {
        "hidden": (with_one(x).T @ with_one(x) / m, hidden_grads.T @ hidden_grads / m),
        "out": (with_one(hidden).T @ with_one(hidden) / m, out_grads.T @ out_grads / m),
    }


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_factors_match_float64_oracle_without_loss_scale(policy):
    """The first estimate (it counts fully) against NumPy on the pre-step
    weights; a loss scale leaking into the statistics would multiply G by
    32768^2. Tolerance: relative 3e-2 of each factor's largest entry, the
    rounding of float16 / bfloat16 activations (bfloat16 keeps 8 bits)."""
    x, y = _problem(count=16, seed=3)
    model = _compile(_model(), estimation_mode="empirical")
    step = kfac_keras.make_train_step(model)
    expected = _oracle_factors(model, x, y)
    logs = step(x, y)
    assert int(logs["kfac_skipped_steps"]) == 0
    optimizer = _kfac(model)
    tolerance = 3e-2
    for layer in model.layers:
        block = block_for_layer(optimizer, layer)
        for actual, oracle in zip((block.input_factor, block.output_grad_factor),
                                  expected[layer.name]):
            actual = np.asarray(actual, np.float64)
            scale = np.abs(oracle).max()
            np.testing.assert_allclose(actual, oracle, rtol=0, atol=tolerance * scale,
                                       err_msg=f"{layer.name} {policy}")
    if policy == "mixed_float16":
        # One finite step: the dynamic scale keeps its initial value.
        scale_optimizer = model.optimizer
        assert float(scale_optimizer.dynamic_scale) == scale_optimizer.initial_scale
        assert int(scale_optimizer.step_counter) == 1


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_float16_overflow_skips_step_keeps_factors_and_halves_scale(policy):
    x, y = _problem(count=16, seed=4)
    model = _compile(_model())
    step = kfac_keras.make_train_step(model)
    step(x, y)  # factors exist and are finite
    scale_optimizer = model.optimizer
    optimizer = _kfac(model)
    # A loss scale near float32's maximum overflows the float16 backward
    # pass: the unscaled gradients are Inf/NaN.
    scale_optimizer.dynamic_scale.assign(3.0e38)
    state = [keras.ops.convert_to_numpy(v) for v in guards.block_state_variables(optimizer)]
    weights = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    iterations = int(optimizer.iterations)
    logs = step(x, y)
    assert int(logs["kfac_skipped_steps"]) == 1
    assert int(optimizer.iterations) == iterations
    for before, variable in zip(state, guards.block_state_variables(optimizer)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), before,
                                      err_msg=variable.path)
    for before, weight in zip(weights, model.trainable_weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(weight), before,
                                      err_msg=weight.path)
    assert float(scale_optimizer.dynamic_scale) == pytest.approx(1.5e38, rel=1e-6)
    assert int(scale_optimizer.step_counter) == 0
    # Back to a normal scale: the run continues.
    scale_optimizer.dynamic_scale.assign(1024.0)
    logs = step(x, y)
    assert int(logs["kfac_skipped_steps"]) == 1
    assert int(optimizer.iterations) == iterations + 1
    assert all(np.all(np.isfinite(keras.ops.convert_to_numpy(w)))
               for w in model.trainable_weights)


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_save_and_load_restore_kfac_state_inside_loss_scale_optimizer(policy, tmp_path):
    """Keras saves the wrapped KFAC as the LossScaleOptimizer's child; its
    factors come back when the loaded model's step attaches it (the
    LossScaleOptimizer's own dynamic scale is not restored: Keras warns and
    starts it again from `initial_scale`)."""
    x, y = _problem(count=64, seed=5)
    model = _compile(_model())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[kfac_keras.KFACCallback(verbose=0)])
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, keras.optimizers.LossScaleOptimizer)
    kfac_keras.make_train_step(loaded)  # attaches: restores the K-FAC state
    saved_state = guards.block_state_variables(_kfac(model))
    loaded_state = guards.block_state_variables(_kfac(loaded))
    assert len(saved_state) == len(loaded_state) > 0
    for saved, restored in zip(saved_state, loaded_state):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(restored),
                                      keras.ops.convert_to_numpy(saved),
                                      err_msg=restored.path)
    assert int(_kfac(loaded).iterations) == int(_kfac(model).iterations) == 4
    assert float(_kfac(loaded).num_estimates) == float(_kfac(model).num_estimates)
