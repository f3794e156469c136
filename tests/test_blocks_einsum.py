"""EinsumDense (MultiHeadAttention) and Dense-on-sequences blocks vs NumPy.

Oracles: for each equation the row layout is written out by hand as NumPy
transposes (and checked to reproduce the layer's output); factors from those
rows; per-example gradients from separate tapes; exact Fishers of linear
networks from per-example Jacobians. Tolerances: 1e-5 relative (factors,
gradients, exact Fisher), 1e-4 (damped-inverse products).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from block_helpers import (built, exact_fisher, kfac_factors, kronecker_damped_solve,
                           pseudo_sample_captures, relative_error, with_ones)
from kfac_keras.blocks.dense import DenseBlock
from kfac_keras.blocks.einsum_dense import EinsumDenseBlock
from kfac_keras.blocks.errors import UnsupportedLayerError

# (name, equation, output_shape, bias_axes, input shape,
#  input_perm -> (locations..., contracted in kernel order),
#  output_perm -> (locations..., output features in kernel order),
#  kernel_perm -> (contracted..., output features...))
CASES = [
    ("mha query", "abc,cde->abde", (5, 2, 3), "de", (3, 5, 4), (0, 1, 2), (0, 1, 2, 3), (0, 1, 2)),
    ("mha output", "abcd,cde->abe", (5, 4), "e", (3, 5, 2, 3), (0, 1, 2, 3), (0, 1, 2), (0, 1, 2)),
    ("features in the middle", "abc,dc->adb", (3, 5), "d", (3, 5, 4), (0, 1, 2), (0, 2, 1), (1, 0)),
    ("kernel axes reordered", "abc,ecd->abde", (5, 2, 3), "de", (3, 5, 4), (0, 1, 2), (0, 1, 3, 2),
     (1, 0, 2)),
    ("left ellipsis", "...b,bc->...c", (3,), "c", (3, 2, 4, 5), (0, 1, 2, 3), (0, 1, 2, 3), (0, 1)),
    ("right ellipsis", "ab...,bc->ac...", (3, 5), "c", (3, 4, 5), (0, 2, 1), (0, 2, 1), (0, 1)),
]


def _layer(equation, output_shape, bias_axes, shape, seed=0):
    layer = keras.layers.EinsumDense(
        equation, output_shape, bias_axes=bias_axes,
        kernel_initializer=keras.initializers.RandomNormal(seed=seed),
        bias_initializer=keras.initializers.RandomNormal(seed=seed + 1))
    x = np.random.default_rng(seed).normal(size=shape).astype("float32")
    return layer, x, layer(x).numpy()


def _rows(array, perm, width):
    return np.transpose(array, perm).reshape(-1, width)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_einsum_rows_factors_and_matrix_match_numpy(case):
    _, equation, output_shape, bias_axes, shape, in_perm, out_perm, k_perm = case
    layer, x, y = _layer(equation, output_shape, bias_axes, shape)
    kernel = layer.kernel.numpy()
    n_in, n_out = _widths(case, kernel)
    matrix = np.transpose(kernel, k_perm).reshape(n_in, n_out)
    bias_row = _bias_row(case, layer.bias.numpy(), n_out)
    x_rows = _rows(x, in_perm, n_in)
    y_rows = _rows(y, out_perm, n_out)
    # The hand-written layout is right: a Dense layer on the rows.
    np.testing.assert_allclose(x_rows @ matrix + bias_row, y_rows, rtol=1e-5, atol=1e-5)

    block = built(EinsumDenseBlock(layer))
    assert block.has_bias and block.input_dim == n_in + 1 and block.output_dim == n_out
    grads = np.random.default_rng(5).normal(size=y.shape).astype("float32")
    a, g = block.compute_factors([(x, grads)], tf.constant(3.0))
    a_np, g_np = kfac_factors(with_ones(x_rows), _rows(grads, out_perm, n_out), 3)
    assert relative_error(a, a_np) < 1e-5
    assert relative_error(g, g_np) < 1e-5

    dk = np.random.default_rng(6).normal(size=kernel.shape).astype("float32")
    db = np.random.default_rng(7).normal(size=layer.bias.shape).astype("float32")
    as_matrix = block.grads_to_matrix([tf.constant(dk), tf.constant(db)]).numpy()
    np.testing.assert_array_equal(
        as_matrix, np.concatenate([np.transpose(dk, k_perm).reshape(n_in, n_out),
                                   _bias_row(case, db, n_out)]))
    back_k, back_b = block.matrix_to_grads(tf.constant(as_matrix))
    np.testing.assert_array_equal(back_k.numpy(), dk)
    np.testing.assert_array_equal(back_b.numpy(), db)


def _widths(case, kernel):
    """`(prod |contracted|, prod |output features|)` from the equation letters."""
    equation = case[1].replace("...", "")
    inputs, rest = equation.split(",")
    kernel_spec, outputs = rest.split("->")
    sizes = dict(zip(kernel_spec, kernel.shape))
    n_in = int(np.prod([sizes[c] for c in kernel_spec if c in inputs]))
    n_out = int(np.prod([sizes[c] for c in kernel_spec if c in outputs]))
    return n_in, n_out


def _bias_row(case, bias, n_out):
    """The bias as a row in kernel order of the output-feature axes."""
    name = case[0]
    if name == "features in the middle":  # bias (d, 1)
        return bias.reshape(1, n_out)
    if name == "kernel axes reordered":  # bias (d, e); kernel order e, d
        return bias.T.reshape(1, n_out)
    return bias.reshape(1, n_out)


@pytest.mark.parametrize("equation,output_shape,reason", [
    ("abc,bcd->abd", (4, 3), "appear in both input and output"),
    ("abc,cd->ad", (3,), "summed out"),
])
def test_einsum_without_dense_structure_is_refused(equation, output_shape, reason):
    layer = keras.layers.EinsumDense(equation, output_shape)
    layer(np.zeros((2, 4, 5), "float32"))
    with pytest.raises(UnsupportedLayerError, match=reason):
        EinsumDenseBlock(layer)


def test_unsupported_equation_and_partial_bias_fall_back_to_diagonal():
    inputs = keras.Input((4, 5))
    per_position = keras.layers.EinsumDense("abc,bcd->abd", (4, 3), name="per_position")
    partial_bias = keras.layers.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="e",
                                            name="partial_bias")
    model = keras.Model(inputs, keras.layers.Add()([
        keras.layers.Flatten()(per_position(inputs)),
        keras.layers.Flatten()(keras.layers.Reshape((4, 6))(partial_bias(inputs))[:, :, :3])]))
    registration = kfac_keras.register(model)
    rows = {(info["layer_class"], tuple(info["variables"])): info
            for info in registration.describe()}
    by_variable = {}
    for info in registration.describe():
        for path in info["variables"]:
            by_variable[path] = info
    assert by_variable[per_position.kernel.path]["kind"] == "diagonal"
    assert "per-location" in by_variable[per_position.kernel.path]["note"]
    assert by_variable[partial_bias.kernel.path]["kind"] == EinsumDenseBlock.kind
    assert by_variable[partial_bias.bias.path]["kind"] == "diagonal"
    assert "not covered" in by_variable[partial_bias.bias.path]["note"]
    assert len(rows) == 3


def _attention_model(seed=0):
    tokens = keras.Input((4, 6))
    attention = keras.layers.MultiHeadAttention(
        2, 3, name="attention",
        kernel_initializer=keras.initializers.RandomNormal(seed=seed),
        bias_initializer=keras.initializers.RandomNormal(seed=seed + 1))
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(attention(tokens, tokens)))
    return keras.Model(tokens, out), attention


def test_attention_projections_captures_give_per_example_gradients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 6)).astype("float32")
    targets = rng.normal(size=(3, 2)).astype("float32")
    model, attention = _attention_model()
    model(x)
    projections = [attention._query_dense, attention._key_dense, attention._value_dense,
                   attention._output_dense]
    registration = kfac_keras.register(model)
    kinds = {info["block"]: info["kind"] for info in registration.describe()}
    for layer in projections:
        assert kinds[layer.path] == EinsumDenseBlock.kind
    with tf.GradientTape() as tape:
        with registration.capture() as recorder:
            y = model(x)
        objective = tf.reduce_sum(tf.square(y - targets))
    records = [recorder.for_layer(layer)[0] for layer in projections]
    grads = tape.gradient(objective, [pre for _, pre in records])
    # The blocks' per-example rows (used by EKFAC) give per-example matrices.
    from_blocks = []
    for layer, (inputs, _), g in zip(projections, records, grads):
        rows_in, rows_grad = EinsumDenseBlock(layer).per_example_rows([(inputs, g)])
        from_blocks.append(np.einsum("nti,nto->nio", rows_in.numpy(), rows_grad.numpy()))
    for n in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x[n:n + 1]) - targets[n]))
        per_example = tape.gradient(
            loss, [v for layer in projections for v in (layer.kernel, layer.bias)])
        for i, ((inputs, _), g) in enumerate(zip(records, grads)):
            inputs = inputs.numpy()[n].reshape(4, -1)
            g = g.numpy()[n].reshape(4, -1)
            dk, db = per_example[2 * i], per_example[2 * i + 1]
            expected = np.concatenate([dk.numpy().reshape(inputs.shape[1], -1),
                                       db.numpy().reshape(1, -1)])
            assert relative_error(with_ones(inputs).T @ g, expected) < 1e-5
            assert relative_error(from_blocks[i][n], expected) < 1e-5


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_einsum_damped_inverse_matches_dense_kronecker(method):
    layer, x, y = _layer("abcd,cde->abe", (5, 4), "e", (3, 5, 2, 3))
    grads = np.random.default_rng(1).normal(size=y.shape).astype("float32")
    block = built(EinsumDenseBlock(layer, inverse_method=method))
    block.update_statistics([(x, grads)], None, tf.constant(3.0), 0.0)
    damping = 0.03
    block.update_inverses(tf.constant(damping))
    rng = np.random.default_rng(2)
    dk = rng.normal(size=layer.kernel.shape).astype("float32")
    db = rng.normal(size=layer.bias.shape).astype("float32")
    out_k, out_b = block.multiply_damped_inverse([dk, db], damping)
    expected = kronecker_damped_solve(block.input_factor.numpy(),
                                      block.output_grad_factor.numpy(),
                                      np.concatenate([dk.reshape(6, 4), db[None]]),
                                      damping, method)
    actual = np.concatenate([out_k.numpy().reshape(6, 4), out_b.numpy()[None]])
    assert relative_error(actual, expected) < 1e-4


# -------------------------------------------------- theory: exact where it must be
def test_dense_chain_on_sequences_blocks_equal_exact_fisher():
    """Linear Dense -> Dense applied at every position of `(B, T, d)` inputs,
    squared error on every output. Derivatives are independent of the
    activations (linear net), and the output noise is i.i.d. across
    positions and the network acts per position, so derivatives at different
    positions are uncorrelated and identically distributed: positions-as-
    locations K-FAC is exact for both layers."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 3, 4)).astype("float32")
    first = keras.layers.Dense(3, name="first")
    second = keras.layers.Dense(2, name="second")
    model = keras.Sequential([keras.Input((3, 4)), first, second, keras.layers.Flatten()])
    for layer in (first, second):
        captures, _, _ = pseudo_sample_captures(model, layer, x)
        a, g = built(DenseBlock(layer)).compute_factors(captures, tf.constant(5.0))
        exact = exact_fisher(model, [layer.kernel, layer.bias], x)
        assert relative_error(np.kron(a.numpy(), g.numpy()), exact) < 1e-5


def test_attention_style_projection_block_equals_exact_fisher():
    """A linear EinsumDense "abc,cde->abde" with squared error on all outputs:
    a Dense layer per position (same argument as above), so exact."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 3, 4)).astype("float32")
    layer = keras.layers.EinsumDense("abc,cde->abde", (3, 2, 2), bias_axes="de")
    model = keras.Sequential([keras.Input((3, 4)), layer, keras.layers.Flatten()])
    captures, _, _ = pseudo_sample_captures(model, layer, x)
    a, g = built(EinsumDenseBlock(layer)).compute_factors(captures, tf.constant(5.0))
    exact = exact_fisher(model, [layer.kernel, layer.bias], x)
    assert relative_error(np.kron(a.numpy(), g.numpy()), exact) < 1e-5
