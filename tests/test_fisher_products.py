"""Jacobian-vector products (`kfac_keras.fisher_products`) against
independent computations: forward mode on a Dense model, and a dense NumPy
forward-mode recursion through a tiny SimpleRNN."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_keras import fisher_products


def _directions(variables, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=v.shape).astype("float32") for v in variables]


def test_double_backward_equals_forward_mode_on_dense_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Dense(3)])
    x = tf.constant(np.random.default_rng(0).normal(size=(6, 4)), tf.float32)
    variables = model.trainable_variables
    tangents = _directions(variables, 1)

    @tf.function
    def both():
        def forward():
            return model(x, training=True)
        _, forward_jvp = fisher_products.jacobian_vector_product(
            forward, variables, tangents, "forward")
        _, backward_jvp = fisher_products.jacobian_vector_product(
            forward, variables, tangents, "double_backward")
        return forward_jvp, backward_jvp

    forward_jvp, backward_jvp = both()
    assert np.abs(forward_jvp.numpy()).max() > 1e-3
    np.testing.assert_allclose(backward_jvp.numpy(), forward_jvp.numpy(), rtol=1e-5, atol=1e-6)


def _numpy_simple_rnn_jvp(x, weights, tangents):
    """Output and its directional derivative of SimpleRNN(tanh) -> Dense, by
    differentiating the recursion by hand in float64."""
    kernel, recurrent, bias, head, head_bias = [w.astype(np.float64) for w in weights]
    d_kernel, d_recurrent, d_bias, d_head, d_head_bias = [t.astype(np.float64) for t in tangents]
    batch, steps, _ = x.shape
    h = np.zeros((batch, recurrent.shape[0]))
    dh = np.zeros_like(h)
    for t in range(steps):
        xt = x[:, t].astype(np.float64)
        h_new = np.tanh(xt @ kernel + h @ recurrent + bias)
        dz = xt @ d_kernel + dh @ recurrent + h @ d_recurrent + d_bias
        dh = (1.0 - h_new ** 2) * dz
        h = h_new
    return h @ head + head_bias, dh @ head + h @ d_head + d_head_bias


def test_double_backward_matches_numpy_on_simple_rnn_in_graph_mode():
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.SimpleRNN(5),
                              keras.layers.Dense(2)])
    x = np.random.default_rng(2).normal(size=(6, 4, 3)).astype("float32")
    variables = model.trainable_variables
    tangents = _directions(variables, 3)
    method = fisher_products.jvp_method(model)
    assert method == "double_backward"

    @tf.function
    def jvp():
        return fisher_products.jacobian_vector_product(
            lambda: model(x, training=True), variables, tangents, method)

    y, product = jvp()
    expected_y, expected_product = _numpy_simple_rnn_jvp(
        x, [v.numpy() for v in variables], tangents)
    np.testing.assert_allclose(y.numpy(), expected_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(product.numpy(), expected_product, rtol=1e-4, atol=1e-5)


def test_forward_mode_fails_through_the_recurrent_loop_in_graph_mode():
    """Documents why `jvp_method` avoids forward mode for recurrent models:
    if TensorFlow fixes this, the test fails and the choice can be revisited."""
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.LSTM(3)])
    x = tf.zeros((2, 4, 3))
    variables = model.trainable_variables
    tangents = _directions(variables, 4)

    @tf.function
    def jvp():
        return fisher_products.forward_mode_jvp(
            lambda: model(x, training=True), variables, tangents)

    with pytest.raises((ValueError, TypeError), match="handle data|variant"):
        jvp()


def test_jvp_method_choice_and_validation():
    dense = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    bidirectional = keras.Sequential([
        keras.Input((4, 3)), keras.layers.Bidirectional(keras.layers.GRU(2)),
        keras.layers.Dense(2)])
    assert fisher_products.jvp_method(dense) == "forward"
    assert fisher_products.jvp_method(bidirectional) == "double_backward"
    with pytest.raises(ValueError, match="'forward' or 'double_backward'"):
        fisher_products.jacobian_vector_product(lambda: None, [], [], "auto")
