"""Kronecker blocks against the exact Fisher of a linear network (Gaussian outputs).

For a linear network trained with squared error, the pre-activation gradients
of the sampled loss do not depend on the inputs, so each diagonal Fisher block
is exactly `A (x) G` (Martens & Grosse 2015, section 3). The exact Fisher is
built densely: `F = mean_n J_n^T H J_n` with per-example Jacobians from
separate tapes and the analytic output Hessian `H = (2/d) I` of the objective
`(1/d) ||y - f||^2`. The code's `G` is a Monte-Carlo estimate from sampled
targets; with 12,000 sampled rows its relative error is a few percent, and the
tolerance is 10%.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from conftest import block_for_layer


def _exact_fisher_blocks(model, x, d):
    layers = model.layers
    fisher = None
    for n in range(len(x)):
        with tf.GradientTape(persistent=True) as tape:
            out = model(x[n:n + 1])[0]
        columns = []
        for layer in layers:
            jk, jb = tape.jacobian(out, [layer.kernel, layer.bias])
            columns.append(np.concatenate(
                [jk.numpy().reshape(d, -1), jb.numpy().reshape(d, -1)], axis=1))
        jac = np.concatenate(columns, axis=1).astype(np.float64)
        term = jac.T @ ((2.0 / d) * jac)
        fisher = term if fisher is None else fisher + term
    fisher /= len(x)
    sizes = [(l.kernel.shape[0] + 1) * l.kernel.shape[1] for l in layers]
    offsets = np.cumsum([0] + sizes)
    return [fisher[offsets[i]:offsets[i + 1], offsets[i]:offsets[i + 1]]
            for i in range(len(layers))]


def test_linear_gaussian_blocks_equal_exact_fisher():
    rng = np.random.default_rng(0)
    d = 3
    base = rng.normal(size=(40, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="l1"),
                              keras.layers.Dense(d, name="l2")])
    exact = _exact_fisher_blocks(model, base, d)
    optimizer = kfac_keras.KFAC(learning_rate=1e-9, cov_update_every=1, seed=7)
    step = kfac_keras.make_train_step(model, optimizer, "mse")
    x = np.repeat(base, 300, axis=0)
    step(x, np.zeros((len(x), d), dtype="float32"))
    for layer, block_exact in zip(model.layers, exact):
        block = block_for_layer(optimizer, layer)
        approx = np.kron(block.input_factor.numpy(), block.output_grad_factor.numpy())
        error = np.linalg.norm(approx - block_exact) / np.linalg.norm(block_exact)
        assert error < 0.1, (layer.name, error)


def test_output_factor_of_linear_gaussian_is_analytic():
    """G of the last layer -> (2/d) I; of the layer below -> (2/d) K K^T."""
    rng = np.random.default_rng(1)
    d = 3
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5),
                              keras.layers.Dense(d)])
    optimizer = kfac_keras.KFAC(learning_rate=1e-9, cov_update_every=1, seed=8)
    step = kfac_keras.make_train_step(model, optimizer, "mse")
    x = rng.normal(size=(20000, 4)).astype("float32")
    step(x, np.zeros((len(x), d), dtype="float32"))
    kernel = model.layers[1].kernel.numpy()
    g_last = block_for_layer(optimizer, model.layers[1]).output_grad_factor.numpy()
    g_first = block_for_layer(optimizer, model.layers[0]).output_grad_factor.numpy()
    np.testing.assert_allclose(g_last, (2 / d) * np.eye(d), atol=0.03)
    expected = (2 / d) * kernel @ kernel.T
    assert np.linalg.norm(g_first - expected) / np.linalg.norm(expected) < 0.05


def _weighted_run(garbage_seed, sequence):
    """Three K-FAC steps on 16 real examples (or positions) plus 16 rows of
    garbage with sample weight 0; returns the final weights."""
    rng = np.random.default_rng(0)
    garbage = np.random.default_rng(garbage_seed)
    shape = (16, 5, 3) if sequence else (16, 3)
    x = np.concatenate([rng.normal(size=shape), 100 * garbage.normal(size=shape)]).astype("float32")
    y = np.concatenate([rng.normal(size=shape[:-1] + (2,)),
                        100 * garbage.normal(size=shape[:-1] + (2,))]).astype("float32")
    weight = np.concatenate([np.ones(shape[:-1]), np.zeros(shape[:-1])]).astype("float32")
    if sequence:  # zero weights at the padded positions of every example instead
        x, y = x.reshape(16, 10, 3), y.reshape(16, 10, 2)
        weight = weight.reshape(16, 10)
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(2)])
    optimizer = kfac_keras.KFAC(learning_rate=0.1, momentum=0.0, adaptive=None,
                                norm_constraint=None, damping=1e-2, cov_update_every=1,
                                inv_update_every=1, seed=3)
    step = kfac_keras.make_train_step(model, optimizer, "mse")
    for _ in range(3):
        step(x, y, sample_weight=weight)
    return [v.numpy() for v in model.trainable_variables]


@pytest.mark.parametrize("sequence", [False, True])
def test_zero_weight_rows_do_not_shape_the_factors(sequence):
    first, second = _weighted_run(1, sequence), _weighted_run(2, sequence)
    for a, b in zip(first, second):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
