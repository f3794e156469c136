"""Recurrent blocks (`kfac_keras.blocks.recurrent`) against independent
computations: the captured forward pass against Keras's own layer call, the
factors against NumPy recursions (float64) whose per-example, per-step
pre-activation gradients come from central finite differences, and the
damped-inverse product against `np.kron`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from kfac_keras.blocks import recurrent
from tests.block_helpers import built, kfac_factors, kronecker_damped_solve, relative_error

BATCH, STEPS, FEATURES, UNITS = 3, 4, 2, 3


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _numpy_simple_rnn(x, weights, offsets):
    kernel, recurrent_kernel, bias = weights
    h = np.zeros((x.shape[0], recurrent_kernel.shape[0]))
    inputs = []
    for t in range(x.shape[1]):
        inputs.append(np.concatenate([x[:, t], h], axis=1))
        h = np.tanh(x[:, t] @ kernel + h @ recurrent_kernel + bias + offsets[0][:, t])
    return h, [np.stack(inputs, axis=1)]


def _numpy_lstm(x, weights, offsets):
    kernel, recurrent_kernel, bias = weights
    units = recurrent_kernel.shape[0]
    h = np.zeros((x.shape[0], units))
    c = np.zeros_like(h)
    inputs = []
    for t in range(x.shape[1]):
        inputs.append(np.concatenate([x[:, t], h], axis=1))
        z = x[:, t] @ kernel + h @ recurrent_kernel + bias + offsets[0][:, t]
        i, f, g, o = (z[:, k * units:(k + 1) * units] for k in range(4))
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
    return h, [np.stack(inputs, axis=1)]


def _numpy_gru(x, weights, offsets):
    """GRU with reset_after=True; offsets[0] on the input projection p_t,
    offsets[1] on the recurrent projection q_t."""
    kernel, recurrent_kernel, bias = weights
    units = recurrent_kernel.shape[0]
    h = np.zeros((x.shape[0], units))
    previous = []
    for t in range(x.shape[1]):
        previous.append(h)
        p = x[:, t] @ kernel + bias[0] + offsets[0][:, t]
        q = h @ recurrent_kernel + bias[1] + offsets[1][:, t]
        update = _sigmoid(p[:, :units] + q[:, :units])
        reset = _sigmoid(p[:, units:2 * units] + q[:, units:2 * units])
        candidate = np.tanh(p[:, 2 * units:] + reset * q[:, 2 * units:])
        h = update * h + (1.0 - update) * candidate
    return h, [x, np.stack(previous, axis=1)]


NUMPY_FORWARD = {"SimpleRNN": (_numpy_simple_rnn, 1), "LSTM": (_numpy_lstm, 4),
                 "GRU": (_numpy_gru, 3)}


def _finite_difference_grads(forward, x, weights, coefficients, gates, projections):
    """Per-example, per-step d(sum_k C_nk h_nk)/d offset, by central differences."""
    shape = (x.shape[0], x.shape[1], gates * UNITS)
    grads = []
    epsilon = 1e-6
    for which in range(projections):
        grad = np.zeros(shape)
        for t in range(shape[1]):
            for k in range(shape[2]):
                values = []
                for sign in (1.0, -1.0):
                    offsets = [np.zeros(shape) for _ in range(projections)]
                    offsets[which][:, t, k] = sign * epsilon
                    h, _ = forward(x, weights, offsets)
                    values.append(np.sum(coefficients * h, axis=1))
                grad[:, t, k] = (values[0] - values[1]) / (2 * epsilon)
        grads.append(grad)
    return grads


def _tiny_model(layer):
    model = keras.Sequential([keras.Input((STEPS, FEATURES)), layer])
    # Non-trivial biases, so the homogeneous coordinate is tested too.
    for variable in model.trainable_variables:
        if "bias" in variable.path:
            variable.assign(np.random.default_rng(5).normal(size=variable.shape) * 0.5)
    return model


def _captured(model, x, coefficients):
    """The block, its recorded captures (with objective gradients) and the output."""
    registration = kfac_keras.register(model)
    block = registration.blocks[0]
    with tf.GradientTape() as tape:
        with registration.capture() as recorder:
            y = model(x, training=True)
        objective = tf.reduce_sum(y * coefficients)
    records = recorder.for_layer(block.layer)
    grads = tape.gradient(objective, [pre for _, pre in records])
    return block, [(inputs, g) for (inputs, _), g in zip(records, grads)], y


@pytest.mark.parametrize("kind", ["SimpleRNN", "LSTM", "GRU"])
def test_factors_match_numpy_recursion(kind):
    model = _tiny_model(getattr(keras.layers, kind)(UNITS))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, STEPS, FEATURES))
    coefficients = rng.normal(size=(BATCH, UNITS))
    block, captures, y = _captured(model, tf.constant(x, tf.float32),
                                   tf.constant(coefficients, tf.float32))
    forward, gates = NUMPY_FORWARD[kind]
    weights = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    projections = 2 if kind == "GRU" else 1
    zero = [np.zeros((BATCH, STEPS, gates * UNITS))] * projections
    expected_y, inputs = forward(x, weights, zero)
    np.testing.assert_allclose(y.numpy(), expected_y, atol=1e-5)
    grads = _finite_difference_grads(forward, x, weights, coefficients, gates, projections)

    parts = block.parts if kind == "GRU" else (block,)
    part_captures = [captures[0::2], captures[1::2]] if kind == "GRU" else [captures]
    assert len(parts) == projections
    for part, part_inputs, part_grads, captured in zip(parts, inputs, grads, part_captures):
        np.testing.assert_allclose(captured[0][1].numpy(), part_grads, atol=1e-5)
        input_factor, grad_factor = part.compute_factors(captured, tf.constant(float(BATCH)))
        rows = np.concatenate([part_inputs, np.ones(part_inputs.shape[:-1] + (1,))], axis=-1)
        expected_a, expected_g = kfac_factors(rows, part_grads, BATCH)
        assert relative_error(input_factor.numpy(), expected_a) < 1e-5
        assert relative_error(grad_factor.numpy(), expected_g) < 1e-4


def _block_and_factors(kind, inverse_method):
    model = _tiny_model(getattr(keras.layers, kind)(UNITS))
    block = built(recurrent.make_recurrent_block(model.layers[0], inverse_method))
    rng = np.random.default_rng(7)
    parts = block.parts if kind == "GRU" else (block,)
    factors = []
    for part in parts:
        a = rng.normal(size=(part.input_dim, part.input_dim + 2))
        g = rng.normal(size=(part.output_dim, part.output_dim + 2))
        a, g = a @ a.T / a.shape[1], g @ g.T / g.shape[1]
        part.input_factor.assign(a.astype(np.float32))
        part.output_grad_factor.assign(g.astype(np.float32))
        factors.append((a, g))
    return model, block, factors


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("inverse_method", ["cholesky", "eigh"])
def test_damped_inverse_matches_numpy_kron(kind, inverse_method):
    model, block, factors = _block_and_factors(kind, inverse_method)
    damping = 0.1
    block.update_inverses(damping)
    rng = np.random.default_rng(8)
    grads = [rng.normal(size=v.shape).astype(np.float32) for v in block.variables]
    result = [r.numpy() for r in block.multiply_damped_inverse(grads, damping)]
    kernel, recurrent_kernel, bias = grads
    if kind == "GRU":
        matrices = [np.concatenate([kernel, bias[:1]]), np.concatenate([recurrent_kernel, bias[1:]])]
    else:
        matrices = [np.concatenate([kernel, recurrent_kernel, bias[None]])]
    expected = [kronecker_damped_solve(a, g, m, damping, inverse_method)
                for (a, g), m in zip(factors, matrices)]
    if kind == "GRU":
        expected = [expected[0][:-1], expected[1][:-1],
                    np.stack([expected[0][-1], expected[1][-1]])]
    else:
        n_in = kernel.shape[0]
        expected = [expected[0][:n_in], expected[0][n_in:-1], expected[0][-1]]
    for actual, wanted in zip(result, expected):
        assert actual.shape == wanted.shape
        assert relative_error(actual, wanted) < 1e-4


CONFIGURATIONS = [
    {},
    {"return_sequences": True},
    {"go_backwards": True, "return_sequences": True},
    {"return_state": True},
    {"use_bias": False, "unroll": True},
    {"activation": "relu"},
]


@pytest.mark.parametrize("kind", ["SimpleRNN", "LSTM", "GRU"])
@pytest.mark.parametrize("options", CONFIGURATIONS, ids=lambda o: ",".join(o) or "default")
def test_captured_forward_equals_keras_call(kind, options):
    layer = getattr(keras.layers, kind)(UNITS, **options)
    inputs = keras.Input((STEPS, FEATURES))
    outputs = layer(inputs)
    model = keras.Model(inputs, outputs)
    x = tf.constant(np.random.default_rng(1).normal(size=(BATCH, STEPS, FEATURES)), tf.float32)
    expected = tf.nest.map_structure(lambda t: t.numpy(), model(x, training=True))
    registration = kfac_keras.register(model)
    assert registration.blocks[0].kind.startswith("kronecker (")
    with registration.capture():
        captured = model(x, training=True)
    for actual, wanted in zip(tf.nest.flatten(captured), tf.nest.flatten(expected)):
        np.testing.assert_allclose(actual.numpy(), wanted, atol=2e-6)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_initial_state_and_graph_mode(kind):
    layer = getattr(keras.layers, kind)(UNITS, return_sequences=True)
    sequence = keras.Input((STEPS, FEATURES))
    states = [keras.Input((UNITS,)) for _ in range(2 if kind == "LSTM" else 1)]
    model = keras.Model([sequence] + states, layer(sequence, initial_state=states))
    rng = np.random.default_rng(2)
    x = [tf.constant(rng.normal(size=(BATCH, STEPS, FEATURES)), tf.float32)] + [
        tf.constant(rng.normal(size=(BATCH, UNITS)), tf.float32) for _ in states]
    expected = model(x, training=True).numpy()
    registration = kfac_keras.register(model)

    @tf.function
    def captured():
        with registration.capture():
            return model(x, training=True)

    np.testing.assert_allclose(captured().numpy(), expected, atol=2e-6)


def test_bidirectional_lstm_gets_two_blocks_and_same_outputs():
    model = keras.Sequential([
        keras.Input((STEPS, FEATURES)),
        keras.layers.Bidirectional(keras.layers.LSTM(UNITS, return_sequences=True)),
        keras.layers.Bidirectional(keras.layers.GRU(UNITS), merge_mode="sum"),
    ])
    x = tf.constant(np.random.default_rng(3).normal(size=(BATCH, STEPS, FEATURES)), tf.float32)
    expected = model(x, training=True).numpy()
    registration = kfac_keras.register(model)
    kinds = [b.kind for b in registration.blocks]
    assert kinds == ["kronecker (recurrent)"] * 2 + ["kronecker (gru)"] * 2
    covered = [id(v) for b in registration.blocks for v in b.variables]
    assert sorted(covered) == sorted(id(v) for v in model.trainable_variables)
    with registration.capture():
        captured = model(x, training=True)
    np.testing.assert_allclose(captured.numpy(), expected, atol=2e-6)


@pytest.mark.parametrize("layer, reason", [
    (keras.layers.LSTM(UNITS, stateful=True), "stateful"),
    (keras.layers.GRU(UNITS, dropout=0.2), "dropout"),
    (keras.layers.SimpleRNN(UNITS, recurrent_dropout=0.2), "dropout"),
    (keras.layers.GRU(UNITS, reset_after=False), "reset_after"),
])
def test_unsupported_options_fall_back_to_diagonal_with_reason(layer, reason):
    batch = (BATCH,) if layer.stateful else ()
    model = keras.Sequential([keras.Input(batch_shape=batch + (STEPS, FEATURES))
                              if batch else keras.Input((STEPS, FEATURES)), layer])
    registration = kfac_keras.register(model)
    (block,) = registration.blocks
    assert block.kind == "diagonal"
    assert reason in block.registration_note
    assert len(block.variables) == len(model.trainable_variables)
    with pytest.raises(ValueError, match=reason):
        kfac_keras.register(model, layer_blocks={layer.name: "kronecker"})


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "SimpleRNN"])
@pytest.mark.parametrize("options", [
    {"return_sequences": True}, {"go_backwards": True},
    {"return_sequences": True, "zero_output_for_mask": True}], ids=lambda o: ",".join(o))
def test_masked_captured_forward_equals_keras_call(kind, options):
    layer = getattr(keras.layers, kind)(UNITS, **options)
    model = keras.Sequential([keras.Input((STEPS,)), keras.layers.Embedding(5, 2, mask_zero=True),
                              layer])
    # Padding at both ends and in the middle, and one unpadded row.
    tokens = tf.constant([[0, 1, 2, 0], [3, 4, 1, 2], [2, 0, 0, 4]])
    expected = model(tokens, training=True).numpy()
    registration = kfac_keras.register(model)
    with registration.capture():
        captured = model(tokens, training=True)
    np.testing.assert_allclose(captured.numpy(), expected, atol=2e-6)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_masked_trailing_steps_add_nothing_to_the_factors(kind):
    """Masking the last steps of every sequence must give the statistics of the
    truncated sequences: the same `A` (a sum over steps) and `G` scaled by
    (kept steps / all steps), since `G` averages over all steps."""
    rng = np.random.default_rng(4)
    features = rng.normal(size=(BATCH, STEPS, FEATURES)).astype("float32")
    coefficients = tf.constant(rng.normal(size=(BATCH, UNITS)), tf.float32)
    kept = 2
    keep = np.zeros((BATCH, STEPS), bool)
    keep[:, :kept] = True

    def factors(x, mask):
        keras.utils.set_random_seed(9)
        inputs = keras.Input((x.shape[1], FEATURES))
        mask_input = keras.Input((x.shape[1],), dtype="bool")
        layer = getattr(keras.layers, kind)(UNITS)
        model = keras.Model([inputs, mask_input], layer(inputs, mask=mask_input))
        registration = kfac_keras.register(model)
        block = registration.blocks[0]
        with tf.GradientTape() as tape:
            with registration.capture() as recorder:
                y = model([x, mask], training=True)
            objective = tf.reduce_sum(y * coefficients)
        records = recorder.for_layer(layer)
        grads = tape.gradient(objective, [pre for _, pre in records])
        captures = [(inputs, g) for (inputs, _), g in zip(records, grads)]
        parts = block.parts if kind == "GRU" else (block,)
        part_captures = [captures[0::2], captures[1::2]] if kind == "GRU" else [captures]
        return [[f.numpy() for f in part.compute_factors(c, tf.constant(float(BATCH)))]
                for part, c in zip(parts, part_captures)]

    masked = factors(features, keep)
    truncated = factors(features[:, :kept], keep[:, :kept])
    for (a_masked, g_masked), (a_truncated, g_truncated) in zip(masked, truncated):
        assert relative_error(a_masked, a_truncated) < 1e-5
        assert relative_error(g_masked, g_truncated * kept / STEPS) < 1e-5


@pytest.mark.parametrize("options, kinds", [
    ({"layer_blocks": {"LSTMCell": "diagonal"}}, ["diagonal"] * 2),
    ("forward layer by name", ["diagonal", "kronecker (recurrent)"]),
    ({"exclude_layers": ["LSTMCell"]}, ["identity"] * 2),
    ({"layer_blocks": {"Bidirectional": "diagonal"}}, ["diagonal"] * 2),
    ({"layer_blocks": {"LSTMCell": "kronecker"}}, ["kronecker (recurrent)"] * 2),
])
def test_block_choice_by_cell_layer_or_wrapper(options, kinds):
    model = keras.Sequential([
        keras.Input((STEPS, FEATURES)), keras.layers.Bidirectional(keras.layers.LSTM(UNITS))])
    if options == "forward layer by name":
        options = {"layer_blocks": {model.layers[0].forward_layer.name: "diagonal"}}
    registration = kfac_keras.register(model, **options)
    assert sorted(b.kind for b in registration.blocks) == kinds
    covered = sorted(id(v) for b in registration.blocks for v in b.variables)
    assert covered == sorted(id(v) for v in model.trainable_variables)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_per_example_rows_give_keras_per_example_gradients(kind):
    """`sum_t abar_{n,t} g_{n,t}^T` from the captures (EKFAC's per-example
    rows) equals each example's gradient of Keras's own layer (no capture)."""
    model = _tiny_model(getattr(keras.layers, kind)(UNITS))
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(BATCH, STEPS, FEATURES)), tf.float32)
    coefficients = tf.constant(rng.normal(size=(BATCH, UNITS)), tf.float32)
    block, captures, _ = _captured(model, x, coefficients)
    parts = block.parts if kind == "GRU" else (block,)
    part_captures = [captures[0::2], captures[1::2]] if kind == "GRU" else [captures]
    per_example = []
    for part, captured in zip(parts, part_captures):
        inputs, grads = part.per_example_rows(captured)
        per_example.append(np.einsum("nti,ntj->nij", inputs.numpy(), grads.numpy()))
    for n in range(BATCH):
        with tf.GradientTape() as tape:
            objective = tf.reduce_sum(model(x[n:n + 1], training=True) * coefficients[n])
        kernel, recurrent_kernel, bias = [g.numpy() for g in
                                          tape.gradient(objective, block.variables)]
        if kind == "GRU":
            expected = [np.concatenate([kernel, bias[:1]]),
                        np.concatenate([recurrent_kernel, bias[1:]])]
        else:
            expected = [np.concatenate([kernel, recurrent_kernel, bias[None]])]
        for actual, wanted in zip(per_example, expected):
            np.testing.assert_allclose(actual[n], wanted, atol=1e-5)
