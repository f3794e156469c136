"""Block-tridiagonal inverse (paper section 4.3) against dense NumPy constructions.

Oracles (float64 NumPy, independent of the code):

* `Fhat^{-1} = Xi^T Lambda Xi` built densely with `np.kron` from the damped
  diagonal blocks and the cross blocks of `Ft`, with `Psi` and `Sigma` formed
  by dense inverses; its inverse must agree with `Ft` on the diagonal and
  first off-diagonal blocks (tolerance 1e-8 relative, float64 round-off).
* The code's `multiply_damped_inverse` (float32) must equal that dense matrix
  times the gradient (tolerance 1e-4 relative to the result's norm).
* Cross factors from a training step must equal second moments of the
  layers' inputs and of the per-example pre-activation gradients, both
  computed by a NumPy forward/backward pass (tolerance 1e-5 relative).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from kfac_keras.blocks.dense import DenseBlock
from kfac_keras.blocks.tridiagonal import DenseChainBlock


# ------------------------------------------------------------------ helpers
def _mlp(sizes, biases=None, activation="tanh", input_dim=3):
    biases = biases or [True] * len(sizes)
    inputs = keras.Input((input_dim,))
    h = inputs
    for index, (units, bias) in enumerate(zip(sizes, biases)):
        last = index == len(sizes) - 1
        h = keras.layers.Dense(units, activation=None if last else activation,
                               use_bias=bias, name=f"d{index}")(h)
    return keras.Model(inputs, h)


def _pi(a, g):
    return np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))


def _dense_fhat_inverse(a_diag, g_diag, a_cross, g_cross, damping):
    """Xi^T Lambda Xi and the damped Ft blocks, densely (float64)."""
    count = len(a_diag)
    gamma = np.sqrt(damping)
    damped_a, damped_g = [], []
    for a, g in zip(a_diag, g_diag):
        pi = _pi(a, g)
        damped_a.append(a + pi * gamma * np.eye(len(a)))
        damped_g.append(g + gamma / pi * np.eye(len(g)))
    ft = {}
    for i in range(count):
        ft[i, i] = np.kron(damped_a[i], damped_g[i])
    for i in range(count - 1):
        ft[i, i + 1] = np.kron(a_cross[i], g_cross[i])
        ft[i + 1, i] = ft[i, i + 1].T
    sizes = [ft[i, i].shape[0] for i in range(count)]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = offsets[-1]
    xi = np.eye(total)
    lam = np.zeros((total, total))
    for i in range(count):
        rows = slice(offsets[i], offsets[i + 1])
        if i < count - 1:
            psi = ft[i, i + 1] @ np.linalg.inv(ft[i + 1, i + 1])
            sigma = ft[i, i] - psi @ ft[i + 1, i + 1] @ psi.T
            xi[rows, offsets[i + 1]:offsets[i + 2]] = -psi
        else:
            sigma = ft[i, i]
        lam[rows, rows] = np.linalg.inv(sigma)
    return xi.T @ lam @ xi, ft, offsets


def _joint_factors(dims_in, dims_out, rng, samples=400):
    """Factors that are second moments of joint samples (so the joint matrix is PSD)."""
    acts = [rng.normal(size=(samples, d)) for d in dims_in]
    acts = [np.concatenate([a[:, :-1], np.ones((samples, 1))], axis=1) for a in acts]
    # correlate consecutive layers so the cross factors are not negligible
    for i in range(1, len(acts)):
        k = min(acts[i].shape[1], acts[i - 1].shape[1]) - 1
        acts[i][:, :k] += 0.8 * acts[i - 1][:, :k]
    grads = [rng.normal(size=(samples, d)) for d in dims_out]
    for i in range(1, len(grads)):
        k = min(grads[i].shape[1], grads[i - 1].shape[1])
        grads[i][:, :k] += 0.7 * grads[i - 1][:, :k]
    moment = lambda x, y: x.T @ y / samples  # noqa: E731
    a_diag = [moment(a, a) for a in acts]
    g_diag = [moment(g, g) for g in grads]
    a_cross = [moment(acts[i], acts[i + 1]) for i in range(len(acts) - 1)]
    g_cross = [moment(grads[i], grads[i + 1]) for i in range(len(grads) - 1)]
    return a_diag, g_diag, a_cross, g_cross


def _built_chain(model):
    layers = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, learning_rate=0.1)
    optimizer.build(model.trainable_variables)
    block = DenseChainBlock(layers)
    block.build(optimizer)
    return block


# ---------------------------------------------------------------- the math
@pytest.mark.parametrize("sizes", [(4, 5, 2), (4, 5, 4, 2)])
def test_xi_lambda_xi_inverse_matches_ft_on_tridiagonal_blocks(sizes):
    rng = np.random.default_rng(0)
    dims_in = [3 + 1] + [s + 1 for s in sizes[:-1]]
    a_diag, g_diag, a_cross, g_cross = _joint_factors(dims_in, list(sizes), rng)
    fhat_inverse, ft, offsets = _dense_fhat_inverse(a_diag, g_diag, a_cross, g_cross, 0.05)
    fhat = np.linalg.inv(fhat_inverse)
    count = len(sizes)
    for i in range(count):
        for j in (i, i + 1):
            if j >= count:
                continue
            block = fhat[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]]
            np.testing.assert_allclose(block, ft[i, j], rtol=1e-8,
                                       atol=1e-8 * np.abs(ft[i, j]).max())
    # The inverse, not Fhat, is block-tridiagonal: Fhat's (0, 2) block is not zero.
    far = fhat[offsets[0]:offsets[1], offsets[2]:offsets[3]]
    assert np.abs(far).max() > 1e-3


@pytest.mark.parametrize("sizes,biases", [((4, 5, 2), (True, True, True)),
                                          ((4, 5, 4, 2), (True, False, True, True))])
def test_chain_block_product_equals_dense_xi_lambda_xi(sizes, biases):
    rng = np.random.default_rng(1)
    model = _mlp(list(sizes), list(biases))
    block = _built_chain(model)
    dims_in = [m.input_dim for m in block.members]
    dims_out = [m.output_dim for m in block.members]
    a_diag, g_diag, a_cross, g_cross = _joint_factors(dims_in, dims_out, rng)
    for variable, value in zip(block.input_factors, a_diag):
        variable.assign(value.astype("float32"))
    for variable, value in zip(block.output_grad_factors, g_diag):
        variable.assign(value.astype("float32"))
    for variable, value in zip(block.input_cross_factors, a_cross):
        variable.assign(value.astype("float32"))
    for variable, value in zip(block.output_grad_cross_factors, g_cross):
        variable.assign(value.astype("float32"))
    damping = 0.05
    block.update_inverses(tf.constant(damping))
    grads = [rng.normal(size=v.shape).astype("float32") for v in block.variables]
    result = block.multiply_damped_inverse([tf.constant(g) for g in grads], damping)

    def stacked(values):
        flat, position = [], 0
        for member in block.members:
            count = len(member.variables)
            parts = values[position:position + count]
            matrix = parts[0] if count == 1 else np.concatenate([parts[0], parts[1][None]], 0)
            flat.append(np.asarray(matrix, np.float64).reshape(-1))
            position += count
        return np.concatenate(flat)

    fhat_inverse, _, _ = _dense_fhat_inverse(a_diag, g_diag, a_cross, g_cross, damping)
    expected = fhat_inverse @ stacked(grads)
    actual = stacked([r.numpy() for r in result])
    assert np.linalg.norm(actual - expected) <= 1e-4 * np.linalg.norm(expected)


# ------------------------------------------------------ statistics + update
def _numpy_forward_backward(model, x, y):
    """Per-layer inputs abar and per-example pre-activation gradients g (float64)."""
    layers = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    h = x.astype(np.float64)
    inputs, pre = [], []
    for index, layer in enumerate(layers):
        kernel = layer.kernel.numpy().astype(np.float64)
        bias = layer.bias.numpy().astype(np.float64) if layer.use_bias else 0.0
        inputs.append(np.concatenate([h, np.ones((len(h), 1))], 1) if layer.use_bias else h)
        s = h @ kernel + bias
        pre.append(s)
        h = s if index == len(layers) - 1 else np.tanh(s)
    probs = np.exp(h - h.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    grad = probs - np.eye(h.shape[1])[y]  # d NLL_n / d logits_n
    grads = [None] * len(layers)
    for index in reversed(range(len(layers))):
        grads[index] = grad
        if index:
            kernel = layers[index].kernel.numpy().astype(np.float64)
            grad = (grad @ kernel.T) * (1.0 - np.tanh(pre[index - 1]) ** 2)
    return inputs, grads


def test_training_step_factors_and_update_match_numpy():
    rng = np.random.default_rng(2)
    model = _mlp([4, 5, 3], input_dim=3)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = rng.integers(0, 3, size=32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    lr, damping, l2 = 0.2, 0.05, 0.01
    optimizer = kfac_keras.KFAC(adaptive=None, norm_constraint=None, step_rule="kl_clip", 
        learning_rate=lr, momentum=0.0, damping=damping, l2_reg=l2,
        approximation="tridiagonal", estimation_mode="empirical",
        cov_update_every=1, inv_update_every=1, seed=3)
    step = kfac_keras.make_train_step(model, optimizer, loss)
    block = optimizer.registration.blocks[0]
    assert isinstance(block, DenseChainBlock)
    assert optimizer.registration.chains == [["d0", "d1", "d2"]]

    inputs, grads = _numpy_forward_backward(model, x, y)
    before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        value = loss(y, model(x))
    raw = [g.numpy().astype(np.float64) for g in tape.gradient(value, model.trainable_variables)]
    step(x, y)

    n = len(x)
    moment = lambda a, b: a.T @ b / n  # noqa: E731
    for i in range(3):
        np.testing.assert_allclose(block.input_factors[i].numpy(),
                                   moment(inputs[i], inputs[i]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(block.output_grad_factors[i].numpy(),
                                   moment(grads[i], grads[i]), rtol=1e-5, atol=1e-7)
    for i in range(2):
        np.testing.assert_allclose(block.input_cross_factors[i].numpy(),
                                   moment(inputs[i], inputs[i + 1]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(block.output_grad_cross_factors[i].numpy(),
                                   moment(grads[i], grads[i + 1]), rtol=1e-5, atol=1e-7)

    # The update is -lr * Fhat^{-1} (grad + l2 theta), Fhat^{-1} built densely
    # from the NumPy factors with total damping lambda + eta.
    a_diag = [moment(a, a) for a in inputs]
    g_diag = [moment(g, g) for g in grads]
    a_cross = [moment(inputs[i], inputs[i + 1]) for i in range(2)]
    g_cross = [moment(grads[i], grads[i + 1]) for i in range(2)]
    fhat_inverse, _, _ = _dense_fhat_inverse(a_diag, g_diag, a_cross, g_cross, damping + l2)
    full = [g + l2 * w for g, w in zip(raw, before)]
    vector = np.concatenate([np.concatenate([full[2 * i], full[2 * i + 1][None]], 0).reshape(-1)
                             for i in range(3)])
    expected = -lr * fhat_inverse @ vector
    after = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    change = [a - b for a, b in zip(after, before)]
    actual = np.concatenate([np.concatenate([change[2 * i], change[2 * i + 1][None]], 0).reshape(-1)
                             for i in range(3)])
    assert np.linalg.norm(actual - expected) <= 2e-4 * np.linalg.norm(expected)


# --------------------------------------------------------------- detection
class SubclassedMlp(keras.Model):
    def __init__(self):
        super().__init__()
        self.first = keras.layers.Dense(4, activation="tanh")
        self.second = keras.layers.Dense(4, activation="tanh")
        self.head = keras.layers.Dense(2)

    def call(self, inputs):
        return self.head(self.second(self.first(inputs)))


class ParallelProjections(keras.Model):
    """Q/K-style projections of the same width: consecutive in creation order
    but not a chain."""

    def __init__(self):
        super().__init__()
        self.left = keras.layers.Dense(3)
        self.right = keras.layers.Dense(3)

    def call(self, inputs):
        return self.left(inputs) + self.right(inputs)


def _chains_of(model, **kwargs):
    optimizer = kfac_keras.KFAC(approximation="tridiagonal", **kwargs)
    registration = optimizer.attach(model)
    return registration.chains, registration


def test_functional_and_sequential_chains_are_found_and_reported():
    chains, registration = _chains_of(_mlp([4, 5, 2]))
    assert chains == [["d0", "d1", "d2"]]
    assert "chain[d0 -> d1 -> d2]" in registration.report()
    seq = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu", name="a"),
                            keras.layers.Dense(2, name="b")], name="sequential")
    assert _chains_of(seq)[0] == [["sequential/a", "sequential/b"]]


def test_subclassed_model_chain_found_by_tracing():
    model = SubclassedMlp()
    model(np.zeros((2, 3), "float32"))
    chains, registration = _chains_of(model)
    assert len(chains) == 1 and len(chains[0]) == 3
    assert sum(isinstance(b, DenseChainBlock) for b in registration.blocks) == 1
    parallel = ParallelProjections()
    parallel(np.zeros((2, 3), "float32"))
    chains, registration = _chains_of(parallel)
    assert chains == []
    assert all(type(b) is DenseBlock for b in registration.blocks)


def test_non_chains_keep_block_diagonal_blocks():
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="h")(inputs)
    left = keras.layers.Dense(2, name="left")(h)   # h feeds two Dense layers: a fork
    right = keras.layers.Dense(2, name="right")(h)
    fork = keras.Model(inputs, keras.layers.Add()([left, right]))
    chains, registration = _chains_of(fork)
    assert chains == []
    assert all(type(b) is DenseBlock for b in registration.blocks)

    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="p")(inputs)
    h = keras.layers.Dropout(0.5)(h)               # dropout between: not phi(s)
    h = keras.layers.Dense(4, activation="tanh", name="q")(h)
    out = keras.layers.Dense(2, name="r")(h)
    chains, _ = _chains_of(keras.Model(inputs, out))
    assert chains == [["q", "r"]]

    inputs = keras.Input((5, 3))                   # rank-3 inputs: not a chain
    h = keras.layers.Dense(4, activation="tanh")(inputs)
    out = keras.layers.Dense(2)(h)
    assert _chains_of(keras.Model(inputs, out))[0] == []

    shared = keras.layers.Dense(3, activation="tanh", name="shared")
    inputs = keras.Input((3,))
    out = keras.layers.Dense(2, name="o")(shared(shared(inputs)))  # shared: used twice
    assert _chains_of(keras.Model(inputs, out))[0] == []


def test_tridiagonal_options_are_validated():
    with pytest.raises(ValueError, match="approximation"):
        kfac_keras.KFAC(approximation="full")
    with pytest.raises(ValueError, match="inverse_method"):
        kfac_keras.KFAC(approximation="tridiagonal", inverse_method="eigh")
    config = kfac_keras.KFAC(approximation="tridiagonal").get_config()
    assert config["approximation"] == "tridiagonal"
    assert kfac_keras.KFAC.from_config(config).approximation == "tridiagonal"


def test_tridiagonal_trains_in_fit():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = rng.integers(0, 2, size=64)
    model = _mlp([6, 5, 2])
    model.compile(optimizer=kfac_keras.KFAC(adaptive=None, norm_constraint=None, learning_rate=0.05, momentum=0.5, damping=0.1,
                                            approximation="tridiagonal",
                                            cov_update_every=1, inv_update_every=2, seed=4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    losses = history.history["loss"]
    assert losses[-1] < losses[0]


def test_tridiagonal_with_the_full_adaptive_algorithm_trains():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = (x[:, 0] * x[:, 1] > 0).astype("int32")
    model = _mlp([6, 5, 2])
    options = kfac_keras.AdaptiveOptions(quadratic_model_step=True, adapt_damping=True,
                                         damping_update_every=2)
    model.compile(optimizer=kfac_keras.KFAC(damping=0.1, approximation="tridiagonal",
                                            adaptive=options, cov_update_every=1,
                                            inv_update_every=2, seed=5, step_rule="kl_clip"),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    assert np.all(np.isfinite(history.history["rho"]))
