"""Sample weights and Keras masks in the Kronecker factors (issue 14).

Zero-weight examples, zero-weight positions and masked positions must enter no
factor: two runs whose excluded rows hold different garbage end with the same
factors and weights. Weighted factors are checked against NumPy sums over the
rows `A = (1/m_w) sum r abar abar^T` (`m_w = sum r / T`), `G = (1/(B T)) sum g
g^T` with the empirical Fisher (`estimation_mode="empirical"`, so `g` is the
analytic squared-error gradient `-2 sqrt(c) (y - f)`), and the sampled
objective's scales against Keras's own reduction of the loss.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from conftest import block_for_layer
from kfac_keras import distributions


def _optimizer(**kwargs):
    options = dict(learning_rate=0.1, momentum=0.0, adaptive=None, norm_constraint=None,
                   damping=1e-2, cov_update_every=1, inv_update_every=1, seed=3)
    options.update(kwargs)
    return kfac_keras.KFAC(**options)


def _factors(optimizer):
    """The factor variables (and EKFAC scalings), in the optimizer's order."""
    return [(v.name, v.numpy()) for v in optimizer.variables
            if any(word in v.name for word in ("factor", "frequencies", "scalings"))]


def _assert_same(first, second):
    # Same variables in the same order (their names carry numbered layer names).
    assert len(first) == len(second) and first
    for (name, a), (_, b) in zip(first, second):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


# --------------------------------------------------- garbage rows of weight 0
def _garbage_run(model_fn, shape, garbage_seed, inverse_method="cholesky", steps=3,
                 options=None):
    """`steps` K-FAC steps on 12 real examples and 12 examples of garbage with
    sample weight 0; returns (factors, weights)."""
    rng, garbage = np.random.default_rng(0), np.random.default_rng(garbage_seed)
    x = np.concatenate([rng.normal(size=(12,) + shape),
                        50 * garbage.normal(size=(12,) + shape)]).astype("float32")
    keras.utils.set_random_seed(5)
    model = model_fn()
    classes = model.output_shape[-1]
    y = np.concatenate([rng.integers(0, classes, 12), garbage.integers(0, classes, 12)])
    weight = np.concatenate([rng.uniform(0.5, 2.0, 12), np.zeros(12)]).astype("float32")
    optimizer = _optimizer(inverse_method=inverse_method, **(options or {}))
    step = kfac_keras.make_train_step(model, optimizer, "sparse_categorical_crossentropy")
    for _ in range(steps):
        step(x, y, sample_weight=weight)
    return _factors(optimizer), [v.numpy() for v in model.trainable_variables]


def _dense_model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(3, activation="softmax")])


def _conv_model():
    return keras.Sequential([keras.Input((6, 6, 2)),
                             keras.layers.Conv2D(3, 3, activation="tanh"),
                             keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(3, activation="softmax")])


@pytest.mark.parametrize("model_fn,shape,inverse_method", [
    (_dense_model, (4,), "cholesky"), (_conv_model, (6, 6, 2), "cholesky"),
    (_dense_model, (4,), "ekfac")])
def test_zero_weight_garbage_changes_no_factor_and_no_step(model_fn, shape, inverse_method):
    first_factors, first_weights = _garbage_run(model_fn, shape, 1, inverse_method)
    second_factors, second_weights = _garbage_run(model_fn, shape, 2, inverse_method)
    _assert_same(first_factors, second_factors)
    for a, b in zip(first_weights, second_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_weighted_input_factor_equals_weighted_numpy_mean():
    """Per-example weights: `A = sum_n w_n abar abar^T / sum_n w_n`."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 4)).astype("float32")
    y = rng.integers(0, 3, 10)
    weight = rng.uniform(0.0, 2.0, 10).astype("float32")
    weight[:3] = 0.0
    keras.utils.set_random_seed(2)
    model = _dense_model()
    optimizer = _optimizer(learning_rate=1e-9)
    hidden = model.layers[0]
    inputs = hidden(x).numpy()
    step = kfac_keras.make_train_step(model, optimizer, "sparse_categorical_crossentropy")
    step(x, y, sample_weight=weight)
    for layer, rows in ((hidden, x), (model.layers[1], inputs)):
        rows = np.concatenate([rows, np.ones((10, 1))], axis=1).astype(np.float64)
        expected = (rows * weight[:, None]).T @ rows / weight.sum()
        np.testing.assert_allclose(block_for_layer(optimizer, layer).input_factor.numpy(),
                                   expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ per-position weights
def _sequence_model(time_steps=5):
    return keras.Sequential([keras.Input((time_steps, 3)),
                             keras.layers.Dense(4, activation="tanh", name="hidden"),
                             keras.layers.Dense(2, name="out")])


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight"])
def test_per_position_weights_give_numpy_weighted_factors(reduction):
    """`(batch, T)` weights on a Dense sequence model: `A` per layer and the
    output layer's `G` (empirical Fisher) equal the NumPy sums."""
    rng = np.random.default_rng(4)
    batch, steps, d = 6, 5, 2
    x = rng.normal(size=(batch, steps, 3)).astype("float32")
    y = rng.normal(size=(batch, steps, d)).astype("float32")
    weight = rng.uniform(0.0, 2.0, (batch, steps)).astype("float32")
    weight[:, 3:] = 0.0
    keras.utils.set_random_seed(3)
    model = _sequence_model(steps)
    optimizer = _optimizer(learning_rate=1e-9, estimation_mode="empirical")
    hidden, out = model.layers
    hidden_out = hidden(x).numpy().astype(np.float64)
    f = model(x).numpy().astype(np.float64)
    loss = keras.losses.MeanSquaredError(reduction=reduction)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    step(x, y, sample_weight=weight)

    m_w = weight.sum() / steps
    for layer, rows in ((hidden, x.astype(np.float64)), (out, hidden_out)):
        rows = np.concatenate([rows, np.ones(rows.shape[:-1] + (1,))], axis=-1).reshape(
            -1, rows.shape[-1] + 1)
        expected = (rows * weight.reshape(-1, 1)).T @ rows / m_w
        np.testing.assert_allclose(block_for_layer(optimizer, layer).input_factor.numpy(),
                                   expected, rtol=1e-5, atol=1e-6)
    # Keras's reduction of `(1/d) ||y - f||^2` per position: c = B w / (d * divisor).
    divisor = {"sum_over_batch_size": batch * steps, "sum": 1.0,
               "mean_with_sample_weight": weight.sum()}[reduction]
    scale = batch * weight / (d * divisor)
    grads = (-2.0 * np.sqrt(scale)[..., None] * (y - f)).reshape(-1, d)
    expected_g = grads.T @ grads / (batch * steps)
    np.testing.assert_allclose(block_for_layer(optimizer, out).output_grad_factor.numpy(),
                               expected_g, rtol=1e-4, atol=1e-7)


def test_scaling_weights_under_mean_with_sample_weight_keeps_the_step():
    """`mean_with_sample_weight` divides by the weights' sum: weights `w` and
    `7 w` (per position) give the same loss, factors and step."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 5, 3)).astype("float32")
    y = rng.normal(size=(8, 5, 2)).astype("float32")
    weight = rng.uniform(0.0, 1.0, (8, 5)).astype("float32")

    def run(factor):
        keras.utils.set_random_seed(4)
        model = _sequence_model()
        optimizer = _optimizer()
        loss = keras.losses.MeanSquaredError(reduction="mean_with_sample_weight")
        step = kfac_keras.make_train_step(model, optimizer, loss)
        losses = [float(step(x, y, sample_weight=factor * weight)["loss"]) for _ in range(3)]
        return losses, _factors(optimizer), [v.numpy() for v in model.trainable_variables]

    (loss_1, factors_1, weights_1), (loss_7, factors_7, weights_7) = run(1.0), run(7.0)
    np.testing.assert_allclose(loss_1, loss_7, rtol=1e-5)
    _assert_same(factors_1, factors_7)
    for a, b in zip(weights_1, weights_7):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight"])
@pytest.mark.parametrize("weights", ["none", "per_example", "per_position"])
def test_value_scale_reproduces_keras_reduction_with_masks(reduction, weights):
    """`(1/B) sum c_{n,t} NLL_{n,t}` with the labels as targets equals
    Keras's own loss, sample weights and the output's mask included."""
    rng = np.random.default_rng(6)
    y_pred = tf.constant(rng.normal(size=(4, 5, 3)).astype("float32"))
    y_true = tf.constant(rng.normal(size=(4, 5, 3)).astype("float32"))
    mask = tf.constant(rng.uniform(size=(4, 5)) > 0.3)
    sample_weight = {"none": None,
                     "per_example": rng.uniform(0.1, 2.0, 4).astype("float32"),
                     "per_position": rng.uniform(0.1, 2.0, (4, 5)).astype("float32")}[weights]
    y_pred._keras_mask = mask
    keras_loss = keras.losses.MeanSquaredError(reduction=reduction)
    if weights == "per_example":  # Keras broadcasts (batch,) against positions last
        expected = keras_loss(y_true, y_pred, sample_weight=sample_weight[:, None])
    else:
        expected = keras_loss(y_true, y_pred, sample_weight=sample_weight)
    distribution = kfac_keras.losses.distribution_for_loss(keras_loss)
    scale = distribution.value_scale(y_pred, sample_weight, mask).numpy()
    nll = np.sum((y_true.numpy() - y_pred.numpy()) ** 2, axis=-1)
    np.testing.assert_allclose(np.sum(scale * nll) / 4, float(expected), rtol=1e-5)


def test_per_position_weights_that_do_not_match_the_output_are_refused():
    distribution = distributions.Gaussian()
    with pytest.raises(ValueError, match="positions"):
        distribution.value_scale(tf.zeros((4, 3)), tf.ones((4, 5)))


# ---------------------------------------------------------------- Keras masks
VOCABULARY, TIME_STEPS = 7, 6


def _masked_model(kind, embedding):
    ids = keras.Input((TIME_STEPS,), dtype="int32")
    vectors = embedding(ids)
    if kind == "lstm":
        hidden = keras.layers.Dense(4, activation="tanh", name="dense")(vectors)
        hidden = keras.layers.LSTM(3, return_sequences=True, name="lstm")(hidden)
    else:  # self-attention, then a GRU and a SimpleRNN
        hidden = keras.layers.MultiHeadAttention(2, 2, name="attention")(vectors, vectors)
        hidden = keras.layers.GRU(3, return_sequences=True, name="gru")(hidden)
        hidden = keras.layers.SimpleRNN(3, return_sequences=True, name="rnn")(hidden)
    return keras.Model(ids, keras.layers.Dense(2, name="out")(hidden))


def _masked_run(garbage_seed, steps=3, kind="lstm"):
    """Embedding(mask_zero=True) -> sequence layers -> Dense on padded
    sequences; the padding id's embedding row (what the padded positions see)
    and the padded positions' targets are garbage from `garbage_seed`."""
    rng, garbage = np.random.default_rng(0), np.random.default_rng(garbage_seed)
    lengths = rng.integers(2, TIME_STEPS + 1, 10)
    ids = rng.integers(1, VOCABULARY, (10, TIME_STEPS))
    ids[np.arange(TIME_STEPS)[None, :] >= lengths[:, None]] = 0
    padded = ids == 0
    y = rng.normal(size=(10, TIME_STEPS, 2)).astype("float32")
    y[padded] = 50 * garbage.normal(size=(padded.sum(), 2))
    keras.utils.set_random_seed(6)
    embedding = keras.layers.Embedding(VOCABULARY, 4, mask_zero=True, name="embedding")
    model = _masked_model(kind, embedding)
    table = embedding.embeddings.numpy()
    table[0] = 50 * garbage.normal(size=4)
    embedding.embeddings.assign(table)
    optimizer = _optimizer()
    step = kfac_keras.make_train_step(model, optimizer, "mse")
    for _ in range(steps):
        step(ids, y)
    weights = [v.numpy() for v in model.trainable_variables]
    weights[0] = weights[0][1:]  # the padding row is garbage by construction
    return (ids, model, optimizer, step), _factors(optimizer), weights


@pytest.mark.parametrize("kind", ["lstm", "attention_gru_rnn"])
def test_masked_positions_change_no_factor_and_no_step(kind):
    _, first_factors, first_weights = _masked_run(1, kind=kind)
    _, second_factors, second_weights = _masked_run(2, kind=kind)
    _assert_same(first_factors, second_factors)
    for a, b in zip(first_weights, second_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_masked_factors_equal_numpy_sums_over_valid_positions():
    """One statistics step: the Embedding's frequencies count valid tokens
    only, over `m_w = valid / T`; the Dense layer's `A` averages its valid
    input rows."""
    (ids, model, optimizer, step), _, _ = _masked_run(1, steps=0)
    embedding, dense = model.get_layer("embedding"), model.get_layer("dense")
    vectors = embedding(ids).numpy().astype(np.float64)
    step(ids, np.zeros((10, TIME_STEPS, 2), "float32"))
    valid = ids != 0
    m_w = valid.sum() / TIME_STEPS
    counts = np.bincount(ids[valid], minlength=VOCABULARY)
    np.testing.assert_allclose(block_for_layer(optimizer, embedding).token_frequencies.numpy(),
                               counts / m_w, rtol=1e-6)
    rows = np.concatenate([vectors[valid], np.ones((valid.sum(), 1))], axis=1)
    np.testing.assert_allclose(block_for_layer(optimizer, dense).input_factor.numpy(),
                               rows.T @ rows / m_w, rtol=1e-5, atol=1e-6)


def test_a_batch_of_zero_weights_leaves_the_input_factors():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 3, 8)
    keras.utils.set_random_seed(2)
    model = _dense_model()
    optimizer = _optimizer()
    step = kfac_keras.make_train_step(model, optimizer, "sparse_categorical_crossentropy")
    step(x, y, sample_weight=np.ones(8, "float32"))
    before = [block_for_layer(optimizer, layer).input_factor.numpy() for layer in model.layers]
    step(5 * x, y, sample_weight=np.zeros(8, "float32"))
    for layer, expected in zip(model.layers, before):
        np.testing.assert_array_equal(block_for_layer(optimizer, layer).input_factor.numpy(),
                                      expected)


def test_output_fisher_gram_with_mask_and_per_position_weights_equals_numpy():
    """`[mean_n sum_t c_{n,t} <t_i, H t_j>_{n,t}]` with Keras's `c` (mask
    merged, `sum_over_batch_size`), `H = 2 I` for squared error."""
    rng = np.random.default_rng(9)
    y_pred = tf.constant(rng.normal(size=(4, 5, 3)).astype("float32"))
    mask = rng.uniform(size=(4, 5)) > 0.4
    y_pred._keras_mask = tf.constant(mask)
    weight = rng.uniform(0.1, 2.0, (4, 5)).astype("float32")
    tangents = [tf.constant(rng.normal(size=(4, 5, 3)).astype("float32")) for _ in range(2)]
    gram = distributions.Gaussian().output_fisher_gram(y_pred, tangents, weight).numpy()
    scale = weight * mask * (mask.size / mask.sum()) / (3 * 5)
    expected = np.array([[np.sum(scale * np.sum(2 * a.numpy() * b.numpy(), -1)) / 4
                          for b in tangents] for a in tangents])
    np.testing.assert_allclose(gram, expected, rtol=1e-5)


def test_quadratic_model_gram_follows_the_output_mask():
    """Embedding(mask_zero=True) -> Dense, direction `U` on the Dense kernel:
    `J u = E[id] U` per position; the Fisher product counts valid positions
    only, each weighing `total / valid` (Keras's masked mean)."""
    from kfac_keras import quadratic_model
    rng = np.random.default_rng(10)
    ids = rng.integers(1, VOCABULARY, (4, TIME_STEPS))
    ids[:, 4:] = 0
    ids[0, 2:] = 0
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((TIME_STEPS,), dtype="int32"),
                              keras.layers.Embedding(VOCABULARY, 3, mask_zero=True),
                              keras.layers.Dense(2)])
    dense = model.layers[1]
    direction = rng.normal(size=dense.kernel.shape).astype("float32")
    batch = quadratic_model.BatchQuadraticModel(
        model, distributions.Gaussian(), ids, np.zeros((4, TIME_STEPS, 2), "float32"), None,
        lambda *args: 0.0)
    gram = batch.fisher_gram([[tf.constant(direction)]], [dense.kernel]).numpy()
    tangent = model.layers[0].embeddings.numpy()[ids] @ direction
    valid = ids != 0
    scale = valid * (valid.size / valid.sum()) / (2 * TIME_STEPS)
    expected = np.sum(scale * np.sum(2 * tangent ** 2, -1)) / 4
    np.testing.assert_allclose(gram[0, 0], expected, rtol=1e-5)


def _every_conv_model():
    return keras.Sequential([keras.Input((6, 6, 2)),
                             keras.layers.DepthwiseConv2D(3, depth_multiplier=2,
                                                          activation="tanh"),
                             keras.layers.SeparableConv2D(4, 3, padding="same",
                                                          activation="tanh"),
                             keras.layers.Conv2DTranspose(4, 3, activation="tanh"),
                             keras.layers.Conv2D(4, 1, groups=2, activation="tanh"),
                             keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(3, activation="softmax")])


def _chain_model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(4, activation="tanh"),
                             keras.layers.Dense(3, activation="softmax")])


@pytest.mark.parametrize("model_fn,shape,options", [
    (_every_conv_model, (6, 6, 2), {}),
    (_chain_model, (4,), {"approximation": "tridiagonal"})])
def test_zero_weight_garbage_changes_no_factor_of_other_blocks(model_fn, shape, options):
    """Depthwise, separable, transposed and grouped convolutions, and a
    tridiagonal Dense chain (cross factors)."""
    first_factors, first_weights = _garbage_run(model_fn, shape, 1, options=options)
    second_factors, second_weights = _garbage_run(model_fn, shape, 2, options=options)
    _assert_same(first_factors, second_factors)
    for a, b in zip(first_weights, second_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_masking_layer_rows_leave_the_dense_input_factor():
    """`Masking` -> Dense on sequences: `A` averages the unmasked positions."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(6, 5, 3)).astype("float32")
    x[:, 3:] = 0.0
    x[0, 1:] = 0.0
    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.Masking(0.0),
                              keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    optimizer = _optimizer(learning_rate=1e-9)
    step = kfac_keras.make_train_step(model, optimizer, "mse")
    step(x, rng.normal(size=(6, 5, 2)).astype("float32"))
    valid = np.any(x != 0.0, axis=-1)
    rows = np.concatenate([x[valid], np.ones((valid.sum(), 1))], axis=1).astype(np.float64)
    np.testing.assert_allclose(block_for_layer(optimizer, model.layers[1]).input_factor.numpy(),
                               rows.T @ rows / (valid.sum() / 5), rtol=1e-5, atol=1e-6)
