"""Models with several outputs: the Fisher of `sum_h w_h loss_h` against dense
NumPy computations, and training with `fit` (issue 14).

The exact Fisher is `F = sum_h w_h mean_n c_h J_hn^T H_hn J_hn`, with per-example
Jacobians `J_hn` of head `h`'s output from separate tapes and the output Fisher
`H_hn` built by enumerating the classes of the softmax head
(`sum_y p(y) s_y s_y^T`, `s_y` the score w.r.t. the logits) and, for the
squared-error head, `2 I` with `c = 1/d`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from conftest import block_for_layer
from kfac_keras import losses as losses_lib
from kfac_keras import quadratic_model

CLASSES, TARGETS = 3, 2
WEIGHTS = {"cls": 1.0, "reg": 0.5}


def _two_head_model():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh", name="trunk")(inputs)
    return keras.Model(inputs, {"cls": keras.layers.Dense(CLASSES, name="cls")(hidden),
                                "reg": keras.layers.Dense(TARGETS, name="reg")(hidden)})


def _compile(model, **kwargs):
    model.compile(optimizer=kfac_keras.KFAC(**kwargs),
                  loss={"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        "reg": "mse"},
                  loss_weights=WEIGHTS)


def _categorical_output_fisher(logits):
    """Enumerates the classes: `sum_y p(y) s_y s_y^T` with `s_y = onehot(y) - p`."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    fisher = np.zeros((len(probs), len(probs)))
    for label in range(len(probs)):
        score = np.eye(len(probs))[label] - probs
        fisher += probs[label] * np.outer(score, score)
    return fisher


def _exact_fisher(model, x):
    """Dense `(P, P)` Fisher over [trunk, cls, reg] kernels and biases (each
    layer's kernel then bias, row-major), and the layers' offsets."""
    layers = [model.get_layer(name) for name in ("trunk", "cls", "reg")]
    variables = [v for layer in layers for v in (layer.kernel, layer.bias)]
    fisher = 0.0
    for n in range(len(x)):
        with tf.GradientTape(persistent=True) as tape:
            out = {head: value[0] for head, value in model(x[n:n + 1]).items()}
        for head, size in (("cls", CLASSES), ("reg", TARGETS)):
            jac = np.concatenate([
                np.zeros((size, int(np.prod(v.shape)))) if j is None else j.numpy().reshape(size, -1)
                for j, v in zip(tape.jacobian(out[head], variables), variables)], axis=1)
            if head == "cls":
                output_fisher = _categorical_output_fisher(out[head].numpy())
            else:
                output_fisher = (2.0 / TARGETS) * np.eye(TARGETS)
            fisher = fisher + WEIGHTS[head] * jac.T @ output_fisher @ jac
    sizes = [(l.kernel.shape[0] + 1) * l.kernel.shape[1] for l in layers]
    return fisher / len(x), layers, np.cumsum([0] + sizes)


def test_two_head_kronecker_blocks_equal_exact_fisher():
    """One distinct input (repeated), so each Dense block is exactly `A (x) G`:
    the sampled G must carry both heads and their loss weights."""
    rng = np.random.default_rng(0)
    model = _two_head_model()
    base = rng.normal(size=(1, 4)).astype("float32")
    exact, layers, offsets = _exact_fisher(model, base)
    optimizer = kfac_keras.KFAC(learning_rate=1e-9, cov_update_every=1, seed=3)
    model.compile(optimizer=optimizer,
                  loss={"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        "reg": "mse"}, loss_weights=WEIGHTS)
    step = kfac_keras.make_train_step(model)
    x = np.repeat(base, 20000, axis=0)
    step(x, {"cls": np.zeros(len(x), "int32"), "reg": np.zeros((len(x), TARGETS), "float32")})
    for i, layer in enumerate(layers):
        block = block_for_layer(optimizer, layer)
        approx = np.kron(block.input_factor.numpy(), block.output_grad_factor.numpy())
        expected = exact[offsets[i]:offsets[i + 1], offsets[i]:offsets[i + 1]]
        error = np.linalg.norm(approx - expected) / np.linalg.norm(expected)
        assert error < 0.05, (layer.name, error)


def test_two_head_quadratic_model_gram_equals_dense_fisher():
    """`u^T F v` of the quadratic model (exact, no sampling) on several inputs."""
    rng = np.random.default_rng(1)
    model = _two_head_model()
    x = rng.normal(size=(6, 4)).astype("float32")
    exact, layers, _ = _exact_fisher(model, x)
    variables = [v for layer in layers for v in (layer.kernel, layer.bias)]
    distribution = losses_lib.distribution_for_model(
        model, {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                "reg": "mse"}, WEIGHTS)
    assert isinstance(distribution, losses_lib.JointDistribution)
    size = exact.shape[0]
    u, v = rng.normal(size=size), rng.normal(size=size)

    def unflat(flat):
        parts, start = [], 0
        for variable in variables:
            count = int(np.prod(variable.shape))
            parts.append(tf.constant(flat[start:start + count].reshape(variable.shape), tf.float32))
            start += count
        return parts

    batch = quadratic_model.BatchQuadraticModel(model, distribution, x, None, None, None)
    gram = batch.fisher_gram([unflat(u), unflat(v)], variables).numpy()
    expected = np.array([[u @ exact @ u, u @ exact @ v], [v @ exact @ u, v @ exact @ v]])
    np.testing.assert_allclose(gram, expected, rtol=1e-4, atol=1e-6)


def _two_head_data(rng, count=512):
    x = rng.normal(size=(count, 4)).astype("float32")
    labels = (x[:, 0] + x[:, 1] > 0).astype("int32") + (x[:, 2] > 1).astype("int32")
    targets = np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1).astype("float32")
    return x, {"cls": labels, "reg": targets}


@pytest.mark.parametrize("options", [{}, {"learning_rate": 1.0, "momentum": 0.5,
                                          "adaptive": None, "damping": 1e-2}])
def test_two_head_model_trains_with_fit(options):
    """A classifier + regressor with dict losses and loss_weights (refused
    before issue 14): both heads' losses fall."""
    rng = np.random.default_rng(2)
    model = _two_head_model()
    _compile(model, **options)
    x, y = _two_head_data(rng)
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    history = model.fit(x, y, batch_size=64, epochs=6, verbose=0,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    after = model.evaluate(x, y, verbose=0, return_dict=True)
    assert np.all(np.isfinite(history.history["loss"]))
    assert after["cls_loss"] < 0.7 * before["cls_loss"], (before, after)
    assert after["reg_loss"] < 0.7 * before["reg_loss"], (before, after)


def test_list_outputs_with_list_losses_resolve_in_output_order():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, [keras.layers.Dense(2, name="first")(inputs),
                                 keras.layers.Dense(1, name="second")(inputs)])
    joint = losses_lib.distribution_for_model(model, ["binary_crossentropy", "mse"], [2.0, 3.0])
    assert [(h.name, h.index, type(h.distribution).__name__, h.weight) for h in joint.heads] == [
        ("first", 0, "Bernoulli", 2.0), ("second", 1, "Gaussian", 3.0)]
    by_name = losses_lib.distribution_for_model(model, {"second": "mse"})
    assert [(h.name, h.index) for h in by_name.heads] == [("second", 1)]


def test_mismatched_losses_raise_before_state_changes():
    model = _two_head_model()
    with pytest.raises(ValueError, match="not model outputs"):
        losses_lib.distribution_for_model(model, {"cls": "mse", "typo": "mse"})
    with pytest.raises(ValueError, match="Output 'reg'.*declare"):
        losses_lib.distribution_for_model(model, {"cls": "mse", "reg": "mae"})


@pytest.mark.parametrize("loss", [{"out": "mse"}, ["mse"], ("mse",)])
def test_single_output_one_entry_loss_is_unwrapped(loss):
    """A one-entry dict or list of losses for a single output (refused before)."""
    rng = np.random.default_rng(3)
    keras.utils.set_random_seed(0)  # initial weights and target sampling fixed: not flaky
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(inputs))
    # The KL-clipped K-FAC rule, fixed damping (the default rule's fixed-RMS
    # steps are slow on a 3x2 linear problem).
    model.compile(optimizer=kfac_keras.KFAC(step_rule="kl_clip", adaptive=None, damping=1e-3,
                                            seed=0),
                  loss=loss)
    x = rng.normal(size=(128, 3)).astype("float32")
    y = x[:, :2] * 2.0 - 1.0
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=32, epochs=6, verbose=0,
              callbacks=[kfac_keras.KFACCallback(verbose=0)])
    assert model.evaluate(x, y, verbose=0) < 0.5 * before
    assert isinstance(losses_lib.distribution_for_model(model, loss), losses_lib.Gaussian)


def test_single_output_loss_weight_scales_the_fisher():
    """`loss_weights=2.0` on one output doubles the objective and so its G."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 3)).astype("float32")
    factors = []
    for weight in (None, 2.0):
        inputs = keras.Input((3,))
        model = keras.Model(inputs, keras.layers.Dense(2, name="out")(inputs))
        optimizer = kfac_keras.KFAC(learning_rate=1e-9, cov_update_every=1, seed=5,
                                    adaptive=None, damping=1e-2)
        model.compile(optimizer=optimizer, loss="mse", loss_weights=weight)
        kfac_keras.make_train_step(model)(x, np.zeros((64, 2), "float32"))
        factors.append(block_for_layer(optimizer, model.layers[-1]).output_grad_factor.numpy())
    np.testing.assert_allclose(factors[1], 2.0 * factors[0], rtol=1e-5)


def test_make_train_step_with_a_dict_of_losses_evaluates_keras_loss():
    """Losses passed to make_train_step (weight 1 each): the step's loss is
    Keras's sum over the outputs, and the Fisher covers both heads."""
    rng = np.random.default_rng(5)
    model = _two_head_model()
    optimizer = kfac_keras.KFAC(learning_rate=1e-9, adaptive=None, damping=1e-2)
    loss = {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"}
    step = kfac_keras.make_train_step(model, optimizer, loss)
    x, y = _two_head_data(rng, count=32)
    out = model(x)
    expected = (float(loss["cls"](y["cls"], out["cls"]))
                + float(keras.losses.MeanSquaredError()(y["reg"], out["reg"])))
    np.testing.assert_allclose(float(step(x, y)["loss"]), expected, rtol=1e-5)
    assert [h.name for h in step.distribution.heads] == ["cls", "reg"]
