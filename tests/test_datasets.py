"""Tests for benchmarks/mnist_data.py (IDX parsing and the MNIST source chain)."""

import gzip
import os
import struct
import sys
import types

import numpy as np
import pytest

from benchmarks import mnist_data as datasets
from benchmarks.mnist_data import load_mnist, read_idx, upsample_digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DIR = os.environ.get(
    "KFAC_KERAS_DATA_DIR", os.path.join(REPO, "..", "shared", "data", "mnist"))
REAL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _idx_bytes(magic, dims, payload):
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload


def _write(path, data, compress):
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def write_mnist_dir(folder, n=6, prefix="t10k", compress=True, seed=0):
    """Writes a tiny MNIST-like IDX pair; returns (images uint8, labels)."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    ext = ".gz" if compress else ""
    _write(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"),
           _idx_bytes(2051, (n, 28, 28), imgs.tobytes()), compress)
    _write(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"),
           _idx_bytes(2049, (n,), labels.tobytes()), compress)
    return imgs, labels


@pytest.mark.parametrize("compress", [True, False])
def test_tiny_idx_roundtrip(tmp_path, compress):
    imgs, labels = write_mnist_dir(tmp_path, n=7, compress=compress)
    x, y, source = load_mnist(data_dir=str(tmp_path))
    assert x.shape == (7, 784) and x.dtype == np.float32
    np.testing.assert_allclose(x, imgs.reshape(7, -1) / 255.0, rtol=1e-6)
    assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(y, labels)
    assert str(tmp_path) in source and "t10k" in source

    x4, _, _ = load_mnist(data_dir=str(tmp_path), flatten=False, dtype="float64")
    assert x4.shape == (7, 28, 28, 1) and x4.dtype == np.float64


def test_train_files_take_precedence(tmp_path):
    write_mnist_dir(tmp_path, n=4, prefix="t10k", seed=1)
    tr_imgs, _ = write_mnist_dir(tmp_path, n=9, prefix="train", seed=2)
    x, _, source = load_mnist(data_dir=str(tmp_path))
    assert x.shape[0] == 9 and "train" in source
    np.testing.assert_allclose(x[0], tr_imgs[0].reshape(-1) / 255.0, rtol=1e-6)
    x_all, _, _ = load_mnist(data_dir=str(tmp_path), subset="all")
    assert x_all.shape[0] == 13
    x_test, _, _ = load_mnist(data_dir=str(tmp_path), subset="test")
    assert x_test.shape[0] == 4


def test_bad_magic_names_file(tmp_path):
    write_mnist_dir(tmp_path, n=3)
    bad = os.path.join(tmp_path, "t10k-images-idx3-ubyte.gz")
    _write(bad, _idx_bytes(2049, (3, 28, 28), bytes(3 * 784)), True)  # label magic
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz") as exc:
        load_mnist(data_dir=str(tmp_path))
    assert "2051" in str(exc.value)


def test_truncated_and_short_files(tmp_path):
    p = os.path.join(tmp_path, "x-idx3-ubyte")
    _write(p, _idx_bytes(2051, (5, 28, 28), bytes(4 * 784)), False)  # one image short
    with pytest.raises(ValueError, match="x-idx3-ubyte"):
        read_idx(p, expected_magic=2051)
    _write(p, b"\x00\x00", False)
    with pytest.raises(ValueError, match="x-idx3-ubyte"):
        read_idx(p)
    _write(p, _idx_bytes(0x12345678, (1,), b"\x00"), False)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(p)


def test_count_mismatch(tmp_path):
    write_mnist_dir(tmp_path, n=3)
    _write(os.path.join(tmp_path, "t10k-labels-idx1-ubyte.gz"),
           _idx_bytes(2049, (2,), bytes(2)), True)
    with pytest.raises(ValueError, match="labels"):
        load_mnist(data_dir=str(tmp_path))


def test_missing_files_in_named_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        load_mnist(data_dir=str(tmp_path))


def test_env_var(tmp_path, monkeypatch):
    write_mnist_dir(tmp_path, n=2)
    monkeypatch.setenv("KFAC_KERAS_DATA_DIR", str(tmp_path))
    x, _, source = load_mnist()
    assert x.shape == (2, 784)
    assert "KFAC_KERAS_DATA_DIR" in source


def _no_keras(subset, timeout):
    raise OSError("offline (test)")


def test_nothing_available_says_set_env_var(monkeypatch):
    monkeypatch.delenv("KFAC_KERAS_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "_load_keras", _no_keras)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(RuntimeError, match="KFAC_KERAS_DATA_DIR"):
        load_mnist()


def test_sklearn_digits_fallback(monkeypatch):
    monkeypatch.delenv("KFAC_KERAS_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "_load_keras", _no_keras)
    rng = np.random.default_rng(0)
    fake = types.SimpleNamespace(
        images=rng.integers(0, 17, size=(5, 8, 8)).astype(float),
        target=np.array([0, 1, 2, 3, 4]))
    sk = types.ModuleType("sklearn")
    skd = types.ModuleType("sklearn.datasets")
    skd.load_digits = lambda: fake
    sk.datasets = skd
    monkeypatch.setitem(sys.modules, "sklearn", sk)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", skd)
    x, y, source = load_mnist()
    assert x.shape == (5, 784) and 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(y, [0, 1, 2, 3, 4])
    assert "scikit-learn" in source and "NOT MNIST" in source


def test_upsample_digits():
    img = np.full((2, 8, 8), 0.5)
    out = upsample_digits(img)
    assert out.shape == (2, 28, 28)
    np.testing.assert_allclose(out[:, 4:24, 4:24], 0.5)
    assert out[:, :4].sum() == 0 and out[:, :, 24:].sum() == 0
    ramp = np.tile(np.arange(8.0), (1, 8, 1))  # increases along columns
    up = upsample_digits(ramp)[0, 10, 4:24]
    assert np.all(np.diff(up) >= 0) and up[0] == 0 and up[-1] == 7


@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_DIR, "t10k-images-idx3-ubyte.gz")),
                    reason=f"real MNIST not found in {REAL_DIR}")
def test_real_mnist_test_set():
    x, y, source = load_mnist(data_dir=REAL_DIR)
    assert x.shape == (10000, 784)
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    assert np.bincount(y, minlength=10).tolist() == REAL_COUNTS
    assert "10000 images" in source
