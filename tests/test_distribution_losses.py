"""Custom losses declared as negative log-likelihoods (issue 14):
`DistributionLoss` over `tfp.distributions` and `declare_loss` for plain
functions, against Keras's reductions and dense NumPy Fishers."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import kfac_keras
from conftest import block_for_layer
from kfac_keras import losses as losses_lib
from kfac_keras import quadratic_model

tfd = tfp.distributions


def _heteroscedastic_normal(y_pred):
    return tfd.Normal(loc=y_pred[..., :1], scale=tf.math.softplus(y_pred[..., 1:]))


def _normal_output_fisher(f):
    """Closed form in (mean, raw scale) coordinates, sigma = softplus(raw):
    `F_mean = 1/sigma^2`, `F_raw = 2 sigmoid(raw)^2 / sigma^2`, no cross term."""
    sigma = np.log1p(np.exp(f[1]))
    slope = 1.0 / (1.0 + np.exp(-f[1]))
    return np.diag([1.0 / sigma**2, 2.0 * slope**2 / sigma**2])


def _exact_blocks(model, x, output_fisher, scale):
    blocks = []
    for layer in model.layers:
        fisher = 0.0
        for n in range(len(x)):
            with tf.GradientTape(persistent=True) as tape:
                out = model(x[n:n + 1])[0]
            jk, jb = tape.jacobian(out, [layer.kernel, layer.bias])
            size = out.shape[0]
            jac = np.concatenate([jk.numpy().reshape(size, -1), jb.numpy().reshape(size, -1)],
                                 axis=1).astype(np.float64)
            fisher = fisher + scale * jac.T @ output_fisher(out.numpy().astype(np.float64)) @ jac
        blocks.append(fisher / len(x))
    return blocks


def _net(outputs, activation=None):
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                             keras.layers.Dense(outputs, activation=activation)])


def test_normal_distribution_loss_fisher_equals_closed_form():
    """Heteroscedastic regression: K-FAC's blocks against `c J^T F_out J` with
    the closed-form Normal Fisher, on one (repeated) input so `A (x) G` is
    exact. A wrong scale (e.g. the factor 2 of the scale term) fails."""
    rng = np.random.default_rng(0)
    model = _net(2)
    base = rng.normal(size=(1, 3)).astype("float32")
    exact = _exact_blocks(model, base, _normal_output_fisher, scale=1.0)
    optimizer = kfac_keras.KFAC(learning_rate=1e-9, cov_update_every=1, seed=11, adaptive=None)
    loss = kfac_keras.DistributionLoss(_heteroscedastic_normal)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    x = np.repeat(base, 20000, axis=0)
    step(x, np.zeros((len(x), 1), "float32"))
    for layer, expected in zip(model.layers, exact):
        block = block_for_layer(optimizer, layer)
        approx = np.kron(block.input_factor.numpy(), block.output_grad_factor.numpy())
        error = np.linalg.norm(approx - expected) / np.linalg.norm(expected)
        assert error < 0.05, (layer.name, error)


def test_distribution_loss_quadratic_model_gram_is_close_to_exact():
    """The Monte-Carlo output Fisher of the quadratic model vs the closed form."""
    rng = np.random.default_rng(1)
    model = _net(2)
    x = rng.normal(size=(64, 3)).astype("float32")
    layer = model.layers[-1]
    exact = _exact_blocks(model, x, _normal_output_fisher, 1.0)[-1]
    loss = kfac_keras.DistributionLoss(_heteroscedastic_normal, fisher_samples=400)
    batch = quadratic_model.BatchQuadraticModel(
        model, loss.predictive_distribution, x, None, None, None)
    u = rng.normal(size=exact.shape[0])
    kernel_size = int(np.prod(layer.kernel.shape))
    direction = [tf.constant(u[:kernel_size].reshape(layer.kernel.shape), tf.float32),
                 tf.constant(u[kernel_size:], tf.float32)]
    gram = batch.fisher_gram([direction], [layer.kernel, layer.bias]).numpy()
    np.testing.assert_allclose(gram[0, 0], u @ exact @ u, rtol=0.1)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean", "sum",
                                       "mean_with_sample_weight"])
@pytest.mark.parametrize("weighted", [False, True])
def test_distribution_loss_scale_matches_keras_reduction(reduction, weighted):
    """`mean_n c_n NLL_n` equals the Keras value of the loss (Poisson over a
    (batch, 3) output: three values per example; Keras broadcasts weights of
    shape (batch, 1) over them)."""
    rng = np.random.default_rng(2)
    y_pred = tf.constant(rng.normal(size=(6, 3)).astype("float32"))
    y = rng.poisson(2.0, size=(6, 3)).astype("float32")
    weights = rng.uniform(0.5, 2.0, size=(6, 1)).astype("float32") if weighted else None
    loss = kfac_keras.DistributionLoss(lambda f: tfd.Poisson(log_rate=f), reduction=reduction)
    distribution = losses_lib.distribution_for_loss(loss)
    value = float(loss(y, y_pred, sample_weight=weights))
    nll = distribution.per_example_nll(distribution.empirical_targets(y, y_pred), y_pred)
    ours = float(np.mean(distribution.per_example_scale(y_pred, weights).numpy() * nll.numpy()))
    np.testing.assert_allclose(ours, value, rtol=1e-5)


def test_tfp_sampling_is_reproducible_for_a_seed():
    """What the module docstring claims: a seed fixes the draw (eagerly and in
    a tf.function); another first example (replica) draws other targets."""
    distribution = kfac_keras.DistributionLoss(_heteroscedastic_normal).predictive_distribution
    y_pred = tf.constant(np.random.default_rng(3).normal(size=(5, 2)).astype("float32"))
    seed = tf.constant([4, 5], tf.int32)
    first = distribution.sample_targets(y_pred, seed).numpy()
    np.testing.assert_array_equal(first, distribution.sample_targets(y_pred, seed).numpy())
    traced = tf.function(lambda: distribution.sample_targets(y_pred, seed))()
    np.testing.assert_array_equal(first, traced.numpy())
    assert not np.array_equal(first, distribution.sample_targets(y_pred, seed, 5).numpy())


def test_heteroscedastic_normal_trains_with_fit():
    rng = np.random.default_rng(4)
    x = rng.uniform(-1.0, 1.0, size=(512, 3)).astype("float32")
    noise = 0.05 + 0.5 * np.abs(x[:, :1])
    y = (np.sin(2 * x[:, :1]) + noise * rng.normal(size=(512, 1))).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(16, activation="tanh"),
                              keras.layers.Dense(2)])
    model.compile(optimizer=kfac_keras.KFAC(),
                  loss=kfac_keras.DistributionLoss(_heteroscedastic_normal))
    before = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, batch_size=64, epochs=15, verbose=0,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    after = model.evaluate(x, y, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert after < before - 0.5, (before, after)
    raw_scale = model.predict(np.array([[0.0, 0, 0], [0.95, 0, 0]], "float32"), verbose=0)[:, 1]
    assert np.log1p(np.exp(raw_scale[1])) > 2.0 * np.log1p(np.exp(raw_scale[0]))


def _pixel_cross_entropy(y_true, y_pred):
    return tf.reduce_sum(keras.ops.binary_crossentropy(y_true, y_pred), axis=-1)


def test_declared_paper_loss_scale_matches_keras_and_fisher():
    """The paper's loss (Bernoulli NLL summed over pixels) declared with
    `declare_loss`: its scale equals Keras's value, and the last layer's G is
    `diag(p (1 - p))` (c = 1, not the 1/d of binary_crossentropy)."""
    rng = np.random.default_rng(5)
    d = 4
    loss = kfac_keras.declare_loss(_pixel_cross_entropy, "bernoulli")
    probs = tf.constant(rng.uniform(0.1, 0.9, size=(6, d)).astype("float32"))
    y = (rng.uniform(size=(6, d)) > 0.5).astype("float32")
    distribution = losses_lib.distribution_for_loss(loss)
    nll = distribution.per_example_nll(distribution.empirical_targets(y, probs), probs).numpy()
    ours = np.mean(distribution.per_example_scale(probs).numpy() * nll)
    np.testing.assert_allclose(ours, float(loss(y, probs)), rtol=1e-4)

    model = _net(d, activation="sigmoid")
    base = rng.normal(size=(1, 3)).astype("float32")
    optimizer = kfac_keras.KFAC(learning_rate=1e-9, cov_update_every=1, seed=2, adaptive=None)
    kfac_keras.make_train_step(model, optimizer, loss)(
        np.repeat(base, 20000, axis=0), np.zeros((20000, d), "float32"))
    p = model(base).numpy()[0].astype(np.float64)
    g_last = block_for_layer(optimizer, model.layers[-1]).output_grad_factor.numpy()
    expected = np.diag(p * (1 - p))
    assert np.linalg.norm(g_last - expected) / np.linalg.norm(expected) < 0.05


def test_declared_loss_trains_with_fit():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(256, 3)).astype("float32")
    y = (x[:, :2] > 0).astype("float32")
    model = _net(2, activation="sigmoid")
    model.compile(optimizer=kfac_keras.KFAC(),
                  loss=kfac_keras.declare_loss(_pixel_cross_entropy, "bernoulli"))
    before = model.evaluate(x, y, verbose=0)
    # 80 steps: the default rule's fixed-RMS steps are small on a 3-4-2 net.
    model.fit(x, y, batch_size=32, epochs=10, verbose=0,
              callbacks=[kfac_keras.KFACCallback(verbose=0)])
    assert model.evaluate(x, y, verbose=0) < 0.5 * before


@pytest.mark.parametrize("loss", ["mae", _pixel_cross_entropy, keras.losses.Huber()])
def test_undeclared_custom_loss_says_how_to_declare(loss):
    with pytest.raises(ValueError, match="DistributionLoss.*declare_loss"):
        losses_lib.distribution_for_loss(loss)


def test_declare_loss_rejects_bad_declarations():
    with pytest.raises(ValueError, match="distribution"):
        kfac_keras.declare_loss(_pixel_cross_entropy, "poisson")
    with pytest.raises(ValueError, match="class axis"):
        kfac_keras.declare_loss(_pixel_cross_entropy, "categorical", last_axis="mean")
