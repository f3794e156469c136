"""Kronecker factors against their definitions, computed independently.

The oracle: a NumPy forward pass for the inputs `abar`, and per-example
gradients from one `tf.GradientTape` per example (the bias gradient of the
per-example loss is exactly the pre-activation gradient `dl_n/ds_n`).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from conftest import block_for_layer


def _mlp(output_units=3, output_activation=None):
    inputs = keras.Input((5,))
    h = keras.layers.Dense(4, activation="tanh", name="d1")(inputs)
    h = keras.layers.Dense(3, activation="sigmoid", name="d2")(h)
    out = keras.layers.Dense(output_units, activation=output_activation, name="d3")(h)
    return keras.Model(inputs, out)


def _numpy_inputs(model, x):
    """`abar_{i-1}` of each Dense layer, by a NumPy forward pass."""
    acts = {"tanh": np.tanh, "sigmoid": lambda s: 1 / (1 + np.exp(-s)), "linear": lambda s: s}
    a = x.astype(np.float64)
    result = []
    for layer in model.layers[1:]:
        result.append(np.concatenate([a, np.ones((len(a), 1))], axis=1))
        s = a @ layer.kernel.numpy().astype(np.float64) + layer.bias.numpy()
        a = acts[layer.activation.__name__](s)
    return result


def _per_example_bias_grads(model, loss_fn, x, y):
    """Per-example gradients of the per-example objective w.r.t. each bias."""
    grads = []
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[n:n + 1], model(x[n:n + 1]))
        grads.append([g.numpy().astype(np.float64)
                      for g in tape.gradient(loss, [l.bias for l in model.layers[1:]])])
    return [np.stack([g[i] for g in grads]) for i in range(len(model.layers) - 1)]


def _one_step(model, loss, **options):
    optimizer = kfac_keras.KFAC(learning_rate=0.1, momentum=0.0, damping=1e-3,
                                cov_update_every=1, seed=3, **options)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    return optimizer, step


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_empirical_factors_match_per_example_definitions(fraction):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype("float32")
    y = rng.integers(0, 3, size=12)
    model = _mlp()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer, step = _one_step(model, loss, estimation_mode="empirical",
                                statistics_fraction=fraction)
    m = int(np.ceil(fraction * len(x)))
    abars = _numpy_inputs(model, x[:m])
    gs = _per_example_bias_grads(model, loss, x[:m], y[:m])
    step(x, y)
    for layer, abar, g in zip(model.layers[1:], abars, gs):
        block = block_for_layer(optimizer, layer)
        np.testing.assert_allclose(block.input_factor.numpy(), abar.T @ abar / m,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(block.output_grad_factor.numpy(), g.T @ g / m,
                                   rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_name", ["mse", "bce"])
def test_output_scale_of_mean_reduced_losses(loss_name):
    """MSE and BCE average over the d outputs: G = (1/c) E[db db^T] with c = 1/d."""
    rng = np.random.default_rng(1)
    d = 4
    x = rng.normal(size=(10, 5)).astype("float32")
    if loss_name == "mse":
        y = rng.normal(size=(10, d)).astype("float32")
        loss = keras.losses.MeanSquaredError()
    else:
        y = (rng.uniform(size=(10, d)) > 0.5).astype("float32")
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
    model = _mlp(output_units=d)
    optimizer, step = _one_step(model, loss, estimation_mode="empirical")
    gs = _per_example_bias_grads(model, loss, x, y)
    step(x, y)
    last = block_for_layer(optimizer, model.layers[-1])
    expected = d * gs[-1].T @ gs[-1] / len(x)
    np.testing.assert_allclose(last.output_grad_factor.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_true_fisher_factors_match_enumerated_expectation():
    """Sampled-target G equals E_{y~p}[g g^T], enumerated over the classes.

    The sampled estimate is Monte-Carlo: 8 distinct inputs each repeated 1500
    times give a relative error of a few percent; the tolerance is 10%.
    """
    rng = np.random.default_rng(2)
    base = rng.normal(size=(8, 5)).astype("float32")
    model = _mlp()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    probs = tf.nn.softmax(model(base)).numpy().astype(np.float64)
    exact = [0.0, 0.0, 0.0]
    for k in range(3):
        gs = _per_example_bias_grads(model, loss, base, np.full(8, k))
        for i, g in enumerate(gs):
            exact[i] = exact[i] + np.einsum("n,ni,nj->ij", probs[:, k], g, g) / 8
    x = np.repeat(base, 1500, axis=0)
    optimizer, step = _one_step(model, loss)
    step(x, np.zeros(len(x), dtype="int32"))
    for layer, expected in zip(model.layers[1:], exact):
        got = block_for_layer(optimizer, layer).output_grad_factor.numpy()
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error < 0.1, (layer.name, error)


def test_moving_average_weights():
    """Estimate k enters with weight 1 - min(1 - 1/k, factor_decay)."""
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(6, 5)).astype("float32") for _ in range(4)]
    model = _mlp()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = kfac_keras.KFAC(learning_rate=1e-9, momentum=0.0, cov_update_every=1,
                                factor_decay=0.6, estimation_mode="empirical", seed=0)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    expected = None
    for k, xb in enumerate(batches, start=1):
        abar = _numpy_inputs(model, xb)[0]
        estimate = abar.T @ abar / len(xb)
        decay = min(1 - 1 / k, 0.6)
        expected = estimate if expected is None else decay * expected + (1 - decay) * estimate
        step(xb, np.zeros(6, dtype="int32"))
    got = block_for_layer(optimizer, model.layers[1]).input_factor.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_statistics_only_every_cov_update_every_steps():
    rng = np.random.default_rng(4)
    model = _mlp()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = kfac_keras.KFAC(learning_rate=0.01, cov_update_every=3, seed=0)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    counts = []
    for _ in range(7):
        step(rng.normal(size=(4, 5)).astype("float32"), np.zeros(4, dtype="int32"))
        counts.append(int(optimizer.num_estimates.numpy()))
    assert counts == [1, 1, 1, 2, 2, 2, 3]
