"""Scale-and-shift blocks (BatchNorm/LayerNorm/GroupNorm/RMSNorm) vs NumPy.

Oracles: `x_hat` recomputed in NumPy from the layer's input and the
normalization formula; per-example gradients of gamma/beta from separate
tapes (the whole batch is fed, so BatchNormalization uses the same batch
statistics, and only example n's loss is differentiated); the per-entry
2x2 Fisher and its damped inverse by NumPy `solve`. Tolerances: 1e-4
relative for gradients and moments (float32 normalization), 1e-5 for products.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from block_helpers import built, relative_error
from kfac_keras.blocks.scale_shift import ScaleShiftBlock


def _x_hat_batch_norm(h, layer):
    axes = tuple(range(h.ndim - 1))
    return (h - h.mean(axes)) / np.sqrt(h.var(axes) + layer.epsilon)


def _x_hat_layer_norm(h, layer):
    axes = tuple(layer.axis)
    mean = h.mean(axes, keepdims=True)
    return (h - mean) / np.sqrt(h.var(axes, keepdims=True) + layer.epsilon)


def _x_hat_group_norm(h, layer):
    n, t, c = h.shape
    grouped = h.reshape(n, t, layer.groups, c // layer.groups)
    mean = grouped.mean((1, 3), keepdims=True)
    var = grouped.var((1, 3), keepdims=True)
    return ((grouped - mean) / np.sqrt(var + layer.epsilon)).reshape(h.shape)


def _x_hat_rms_norm(h, layer):
    return h / np.sqrt(np.mean(np.square(h), -1, keepdims=True) + layer.epsilon)


LAYERS = [
    ("batch norm", lambda: keras.layers.BatchNormalization(name="norm"), _x_hat_batch_norm, 2),
    ("batch norm no center", lambda: keras.layers.BatchNormalization(center=False, name="norm"),
     _x_hat_batch_norm, 1),
    ("batch norm no scale", lambda: keras.layers.BatchNormalization(scale=False, name="norm"),
     None, 1),
    ("layer norm", lambda: keras.layers.LayerNormalization(name="norm"), _x_hat_layer_norm, 2),
    ("layer norm two axes", lambda: keras.layers.LayerNormalization(axis=[-2, -1], name="norm"),
     _x_hat_layer_norm, 2),
    ("group norm", lambda: keras.layers.GroupNormalization(groups=2, name="norm"),
     _x_hat_group_norm, 2),
    ("rms norm", lambda: keras.layers.RMSNormalization(name="norm"), _x_hat_rms_norm, 1),
]


def _model(norm, shared=False):
    inputs = keras.Input((3, 4))
    dense = keras.layers.Dense(4, name="dense", bias_initializer="random_normal")
    h = dense(inputs)
    if shared:
        other = keras.layers.Dense(4, name="other", bias_initializer="random_normal")(inputs)
        y = keras.layers.Concatenate(axis=1)([norm(h), norm(other)])
    else:
        y = norm(h)
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(y))
    return keras.Model(inputs, out), dense


def _randomize(norm, seed):
    rng = np.random.default_rng(seed)
    for variable in norm.trainable_variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))


def _captures_and_per_example(model, norm, x, targets):
    registration = kfac_keras.register(model)
    block = registration.block_of(norm.trainable_variables[0])
    assert isinstance(block, ScaleShiftBlock)
    with tf.GradientTape() as tape:
        with registration.capture() as recorder:
            y = model(x, training=True)
        objective = tf.reduce_sum(tf.square(y - targets))
    records = recorder.for_layer(norm)
    grads = tape.gradient(objective, [out for _, out in records])
    captures = [(tangent, g) for (tangent, _), g in zip(records, grads)]
    per_example = []
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x, training=True)[n] - targets[n]))
        per_example.append([g.numpy().reshape(-1)
                            for g in tape.gradient(loss, block.variables)])
    return block, captures, records, per_example


@pytest.mark.parametrize("name,make,x_hat,count", LAYERS, ids=[c[0] for c in LAYERS])
def test_per_example_gradients_and_x_hat(name, make, x_hat, count):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3, 4)).astype("float32")
    targets = rng.normal(size=(5, 2)).astype("float32")
    norm = make()
    model, dense = _model(norm)
    _randomize(norm, 1)
    block, captures, records, per_example = _captures_and_per_example(model, norm, x, targets)
    assert len(block.variables) == count
    assert block.kind == ("scale-shift (2x2 per entry)" if count == 2 else "scale-shift (diagonal)")
    if x_hat is not None:
        h = x.astype(np.float64) @ dense.kernel.numpy() + dense.bias.numpy()
        np.testing.assert_allclose(records[0][0].numpy(), x_hat(h, norm), rtol=1e-4, atol=1e-4)
    dscale, dshift = block.per_example_grads(captures)
    computed = [d.numpy() for d in (dscale, dshift) if d is not None]
    for index in range(count):
        expected = np.stack([per_example[n][index] for n in range(len(x))])
        assert relative_error(computed[index], expected) < 1e-4


def test_shared_normalization_sums_uses_per_example():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 4)).astype("float32")
    targets = rng.normal(size=(4, 2)).astype("float32")
    norm = keras.layers.LayerNormalization(name="norm")
    model, _ = _model(norm, shared=True)
    _randomize(norm, 2)
    block, captures, records, per_example = _captures_and_per_example(model, norm, x, targets)
    assert len(records) == 2
    dscale, dshift = block.per_example_grads(captures)
    for index, computed in enumerate((dscale, dshift)):
        expected = np.stack([per_example[n][index] for n in range(len(x))])
        assert relative_error(computed, expected) < 1e-4


@pytest.mark.parametrize("make,count", [
    (lambda: keras.layers.BatchNormalization(name="norm"), 2),
    (lambda: keras.layers.LayerNormalization(center=False, name="norm"), 1),
])
def test_moments_and_damped_inverse_match_numpy(make, count):
    rng = np.random.default_rng(2)
    norm = make()
    norm.build((None, 3, 4))
    block = built(ScaleShiftBlock(norm))
    tangent = rng.normal(size=(6, 3, 4)).astype("float32")
    grads = rng.normal(size=(6, 3, 4)).astype("float32")
    block.update_statistics([(tangent, grads)], None, tf.constant(6.0), 0.0)
    per_example = [(tangent * grads).sum(1), grads.sum(1)][:count]  # (n, c) each
    damping = 0.07
    v = [rng.normal(size=(4,)).astype("float32") for _ in range(count)]
    out = block.multiply_damped_inverse(v, damping)
    for c in range(4):
        rows = np.stack([p[:, c] for p in per_example], axis=1).astype(np.float64)
        fisher = rows.T @ rows / 6
        expected = np.linalg.solve(fisher + damping * np.eye(count), [vi[c] for vi in v])
        assert relative_error([o.numpy()[c] for o in out], expected) < 1e-5
    np.testing.assert_allclose(block.scale_moment.numpy(),
                               np.mean(np.square(per_example[0]), 0), rtol=1e-5)
    if count == 2:
        np.testing.assert_allclose(block.cross_moment.numpy(),
                                   np.mean(per_example[0] * per_example[1], 0), rtol=1e-5)


def test_xla_and_plain_graph_captures_give_the_same_steps():
    """`fit` with `jit_compile=True` (XLA) and without: the capture paths
    (forward-mode tangents for LayerNorm, ids for the Embedding, patches for
    Conv1D) give the same weights after two K-FAC steps."""
    def build():
        keras.utils.set_random_seed(3)
        tokens = keras.Input((5,), dtype="int32")
        s = keras.layers.Embedding(9, 4)(tokens)
        s = keras.layers.Conv1D(4, 2, padding="same")(s)
        s = keras.layers.LayerNormalization()(s)
        out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(s))
        return keras.Model(tokens, out)

    rng = np.random.default_rng(0)
    x = rng.integers(0, 9, size=(32, 5)).astype("int32")
    y = rng.integers(0, 3, size=(32,)).astype("int32")
    weights = []
    for jit in (False, True):
        model = build()
        model.compile(optimizer=kfac_keras.KFAC(learning_rate=0.05, damping=0.1, seed=2,
                                                cov_update_every=1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[kfac_keras.KFACCallback(verbose=0)])
        weights.append([v.numpy() for v in model.trainable_variables])
    initial = [v.numpy() for v in build().trainable_variables]
    for plain, xla, start in zip(*weights, initial):
        np.testing.assert_allclose(plain, xla, rtol=1e-4, atol=1e-5)
        assert not np.allclose(plain, start)
