"""Norm constraint ("KL clipping") against the dense damped `Fhat` in NumPy.

Oracle: `Fhat + (lambda + eta) I` assembled densely from the code's factors
with `np.kron` (exact damping for `"eigh"`, factored Tikhonov with the pi
adjustment for `"cholesky"`), block-diagonal over the layers; the gradient
from a tape. With the constraint active the applied update `lr * Delta`
must satisfy `Delta^T (Fhat + lambda + eta) Delta = c` (1e-4 relative): the
bound is on the preconditioned gradient, and the learning rate scales the
result; inactive, the update must equal the unconstrained
`-lr (Fhat + ...)^{-1} grad`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from conftest import block_for_layer


def _model():
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(h))


def _dense_damped_fhat(optimizer, model, method, total_damping):
    blocks = []
    for name in ("hidden", "out"):
        block = block_for_layer(optimizer, model.get_layer(name))
        a = block.input_factor.numpy().astype(np.float64)
        g = block.output_grad_factor.numpy().astype(np.float64)
        if method == "eigh":
            blocks.append(np.kron(a, g) + total_damping * np.eye(a.shape[0] * g.shape[0]))
        else:
            pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
            gamma = np.sqrt(total_damping)
            blocks.append(np.kron(a + pi * gamma * np.eye(a.shape[0]),
                                  g + gamma / pi * np.eye(g.shape[0])))
    total = sum(b.shape[0] for b in blocks)
    dense, offset = np.zeros((total, total)), 0
    for b in blocks:
        dense[offset:offset + len(b), offset:offset + len(b)] = b
        offset += len(b)
    return dense


def _stacked(values):
    """[K0, b0, K1, b1] -> concatenated row-major [K; b] per layer."""
    return np.concatenate([np.concatenate([values[2 * i], values[2 * i + 1][None]], 0).reshape(-1)
                           for i in range(2)])


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
@pytest.mark.parametrize("bound", [1e-4, 1e4])
def test_norm_constraint(method, bound):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.integers(0, 3, size=16)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _model()
    lr, damping, l2 = 0.7, 0.05, 0.01
    optimizer = kfac_keras.KFAC(adaptive=None, step_rule="kl_clip", learning_rate=lr, momentum=0.0, damping=damping, l2_reg=l2,
                                inverse_method=method, norm_constraint=bound,
                                cov_update_every=1, inv_update_every=1, seed=1)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        value = loss(y, model(x))
    grads = [g.numpy().astype(np.float64) for g in tape.gradient(value, model.trainable_variables)]
    step(x, y)
    after = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    update = _stacked([a - b for a, b in zip(after, before)])
    full = _stacked([g + l2 * w for g, w in zip(grads, before)])
    fhat = _dense_damped_fhat(optimizer, model, method, damping + l2)
    unconstrained = -lr * np.linalg.solve(fhat, full)
    natural = np.linalg.solve(fhat, full)
    size = natural @ fhat @ natural  # Delta^T Fhat Delta without clipping
    if size > bound:
        delta = -update / lr
        np.testing.assert_allclose(delta @ fhat @ delta, bound, rtol=1e-4)
        # and it is a rescaling of the unconstrained step
        cosine = update @ unconstrained / (np.linalg.norm(update) * np.linalg.norm(unconstrained))
        assert cosine > 1 - 1e-6
    else:
        assert np.linalg.norm(update - unconstrained) <= 1e-4 * np.linalg.norm(unconstrained)
    assert (size > bound) == (bound < 1.0)  # both branches are exercised


def test_norm_constraint_is_validated_and_serialized():
    with pytest.raises(ValueError, match="norm_constraint"):
        kfac_keras.KFAC(norm_constraint=0.0)
    with pytest.raises(TypeError, match="norm_constraint"):
        kfac_keras.KFAC(norm_constraint="1")
    config = kfac_keras.KFAC(norm_constraint=0.01).get_config()
    assert kfac_keras.KFAC.from_config(config).norm_constraint == 0.01


def test_learning_rate_scales_the_step_when_the_bound_binds():
    """Halving the learning rate halves the update even when KL clipping sets
    the step length (it used to cancel: the bound was on `lr * Delta`)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.integers(0, 3, size=16)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    updates, step_sizes = [], []
    for lr in (1.0, 0.5):
        keras.utils.set_random_seed(0)
        model = _model()
        optimizer = kfac_keras.KFAC(adaptive=None, step_rule="kl_clip", learning_rate=lr, momentum=0.0,
                                    norm_constraint=1e-6, cov_update_every=1,
                                    inv_update_every=1, seed=1)
        step = kfac_keras.make_train_step(model, optimizer, loss)
        before = [v.numpy() for v in model.trainable_variables]
        logs = step(x, y)
        updates.append(np.concatenate([(v.numpy() - b).ravel() for v, b in
                                       zip(model.trainable_variables, before)]))
        step_sizes.append(float(logs["step_size"]))
    np.testing.assert_allclose(updates[1], 0.5 * updates[0], rtol=1e-4, atol=1e-7)
    assert step_sizes[0] < 1.0  # the bound binds
    assert step_sizes[1] == pytest.approx(0.5 * step_sizes[0], rel=1e-5)
