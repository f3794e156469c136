"""Predictive distributions: scale against Keras's own losses, sampling moments,
and output Hessians against autodiff."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_keras import losses


def _cases(rng):
    logits = rng.normal(size=(6, 4)).astype("float32")
    probs = tf.nn.softmax(logits).numpy()
    sparse = rng.integers(0, 4, size=6)
    onehot = np.eye(4, dtype="float32")[sparse]
    binary = (rng.uniform(size=(6, 4)) > 0.5).astype("float32")
    real = rng.normal(size=(6, 4)).astype("float32")
    sig = tf.sigmoid(logits).numpy()
    return [
        (keras.losses.SparseCategoricalCrossentropy(from_logits=True), sparse, logits),
        (keras.losses.SparseCategoricalCrossentropy(), sparse, probs),
        (keras.losses.CategoricalCrossentropy(from_logits=True), onehot, logits),
        (keras.losses.CategoricalCrossentropy(), onehot, probs),
        (keras.losses.BinaryCrossentropy(from_logits=True), binary, logits),
        (keras.losses.BinaryCrossentropy(), binary, sig),
        (keras.losses.MeanSquaredError(), real, logits),
        (keras.losses.MeanSquaredError(reduction="sum"), real, logits),
        ("sparse_categorical_crossentropy", sparse, probs),
        ("mse", real, logits),
    ]


@pytest.mark.parametrize("index", range(10))
@pytest.mark.parametrize("weighted", [False, True])
def test_scaled_nll_equals_keras_loss(index, weighted):
    """mean_n c_n NLL_n(labels) is the Keras loss up to a label-independent constant."""
    rng = np.random.default_rng(0)
    loss, y, y_pred = _cases(rng)[index]
    weights = rng.uniform(0.5, 2.0, size=6).astype("float32") if weighted else None
    dist = losses.distribution_for_loss(loss)
    keras_loss = losses.loss_object(loss)
    value = float(keras_loss(y, y_pred, sample_weight=weights))
    targets = dist.empirical_targets(tf.constant(y), tf.constant(y_pred))
    nll = dist.per_example_nll(targets, tf.constant(y_pred)).numpy()
    scale = dist.per_example_scale(tf.constant(y_pred), weights).numpy()
    ours = float(np.mean(scale * nll))
    np.testing.assert_allclose(ours, value, rtol=2e-5)


def test_sequence_outputs_average_over_positions():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 4)).astype("float32")
    labels = rng.integers(0, 4, size=(3, 5))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dist = losses.distribution_for_loss(loss)
    targets = dist.empirical_targets(tf.constant(labels), tf.constant(logits))
    ours = np.mean(dist.per_example_scale(tf.constant(logits)).numpy()
                   * dist.per_example_nll(targets, tf.constant(logits)).numpy())
    np.testing.assert_allclose(ours, float(loss(labels, logits)), rtol=1e-5)


def test_sampling_moments():
    rng = np.random.default_rng(2)
    logits = tf.constant(np.tile(rng.normal(size=(1, 3)), (40000, 1)).astype("float32"))
    seed = tf.constant([1, 2], tf.int32)
    cat = losses.Categorical(sparse_labels=True, from_logits=True).sample_targets(logits, seed)
    np.testing.assert_allclose(cat.numpy().mean(0), tf.nn.softmax(logits[0]).numpy(), atol=0.01)
    bern = losses.Bernoulli(from_logits=True).sample_targets(logits, seed)
    np.testing.assert_allclose(bern.numpy().mean(0), tf.sigmoid(logits[0]).numpy(), atol=0.01)
    gauss = losses.Gaussian().sample_targets(logits, seed).numpy() - logits.numpy()
    np.testing.assert_allclose(gauss.mean(0), 0.0, atol=0.02)
    np.testing.assert_allclose(gauss.var(0), 0.5, atol=0.02)


@pytest.mark.parametrize("dist", [
    losses.Categorical(sparse_labels=True, from_logits=True),
    losses.Bernoulli(from_logits=True),
    losses.Gaussian(),
])
def test_output_hessian_matches_autodiff(dist):
    """E_y[Hessian of NLL] (independent of y for these losses) vs the analytic product."""
    rng = np.random.default_rng(3)
    z = tf.constant(rng.normal(size=(1, 4)).astype("float32"))
    v = tf.constant(rng.normal(size=(1, 4)).astype("float32"))
    targets = dist.sample_targets(z, tf.constant([0, 1], tf.int32))
    with tf.GradientTape() as outer:
        outer.watch(z)
        with tf.GradientTape() as inner:
            inner.watch(z)
            nll = tf.reduce_sum(dist.per_example_nll(targets, z))
        grad = inner.gradient(nll, z)
    hessian = outer.jacobian(grad, z).numpy().reshape(4, 4)
    np.testing.assert_allclose(dist.output_hessian_vector_product(z, v).numpy()[0],
                               hessian @ v.numpy()[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", [
    "mae", keras.losses.Huber(), keras.losses.MeanAbsoluteError(), ["mse", "mse"],
    keras.losses.SparseCategoricalCrossentropy(ignore_class=0),
    keras.losses.BinaryCrossentropy(axis=0),
    keras.losses.MeanSquaredError(reduction="none"),
])
def test_unsupported_losses_raise(loss):
    with pytest.raises(ValueError, match="K-FAC"):
        losses.distribution_for_loss(loss)


def _sequence_case(kind, rng):
    logits = rng.normal(size=(4, 5, 3)).astype("float32")
    if kind == "mse":
        return keras.losses.MeanSquaredError, {}, rng.normal(size=(4, 5, 3)).astype("float32"), logits
    if kind == "bce":
        binary = (rng.uniform(size=(4, 5, 3)) > 0.5).astype("float32")
        return keras.losses.BinaryCrossentropy, {"from_logits": True}, binary, logits
    return (keras.losses.SparseCategoricalCrossentropy, {"from_logits": True},
            rng.integers(0, 3, size=(4, 5)), logits)


@pytest.mark.parametrize("kind", ["mse", "bce", "sparse"])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight"])
@pytest.mark.parametrize("weighted", [False, True])
def test_sequence_scale_equals_keras_for_every_reduction(kind, reduction, weighted):
    """`(batch, T, d)` outputs: Keras sums the positions under "sum" and
    "mean_with_sample_weight" (the latter divides by sum(w) only)."""
    rng = np.random.default_rng(4)
    cls, options, y, y_pred = _sequence_case(kind, rng)
    loss = cls(reduction=reduction, **options)
    # Keras broadcasts per-example weights over the positions from shape (batch, 1).
    weights = rng.uniform(0.5, 2.0, size=(4, 1)).astype("float32") if weighted else None
    dist = losses.distribution_for_loss(loss)
    targets = dist.empirical_targets(tf.constant(y), tf.constant(y_pred))
    nll = dist.per_example_nll(targets, tf.constant(y_pred)).numpy()
    ours = np.mean(dist.per_example_scale(tf.constant(y_pred), weights).numpy() * nll)
    np.testing.assert_allclose(ours, float(loss(y, y_pred, sample_weight=weights)), rtol=1e-5)


@pytest.mark.parametrize("loss", [{"out": "mse"}, ["mse"], ("mse",)])
def test_one_entry_loss_structures_are_unwrapped(loss):
    assert isinstance(losses.distribution_for_loss(loss), losses.Gaussian)
    assert isinstance(losses.loss_object(loss), keras.losses.MeanSquaredError)
