"""MNIST loading for the benchmarks, notebooks and tests (not part of the installed package).

``load_mnist`` looks for data in this order:

1. The ``data_dir`` argument, else the ``KFAC_KERAS_DATA_DIR`` environment
   variable: a folder holding MNIST in the original IDX format. The folder must
   contain the test set (``t10k-images-idx3-ubyte[.gz]`` and
   ``t10k-labels-idx1-ubyte[.gz]``). If the training set
   (``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``) is
   there too, the default ``subset="auto"`` returns **the training set only**,
   the set the K-FAC paper trains on. Otherwise it returns the test set, which
   stands in as the training set on machines that have only the 10,000 test
   images. Pass ``subset="train"``, ``"test"`` or ``"all"`` (train followed by
   test) to pick a subset yourself. If a folder is named, whether by argument
   or by environment variable, and it has no usable files, you get an error.
   The loader does not quietly fall back to another source.
2. ``keras.datasets.mnist.load_data()``. This works if the file is already in
   the Keras cache (``$KERAS_HOME/datasets/mnist.npz``) or the download host
   can be reached. The loader first tries to open a TCP connection with a
   short time-out, so an offline machine fails in a few seconds and doesn't
   hang. ``"auto"`` and ``"train"`` give the 60,000 training images.
3. scikit-learn's bundled ``load_digits`` (1,797 images, 8x8, 17 grey
   levels), if scikit-learn can be imported. Each digit is upsampled
   bilinearly to 20x20 and padded to 28x28, the same layout MNIST uses (a
   20x20 digit centred in a 28x28 frame). This is a stand-in, not MNIST.

If none of these works, a ``RuntimeError`` tells you to set
``KFAC_KERAS_DATA_DIR``.

IDX files are parsed here, without any other library. Gzip is detected from
the file's first bytes, not from its name. The header is checked: the magic
number (2051 for images, 2049 for labels), the item counts, and the data
length. A bad header raises a ``ValueError`` that names the file.
"""

from __future__ import annotations

import gzip
import os
import socket
import struct
import threading

import numpy as np

__all__ = [
    "ENV_VAR",
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "load_mnist",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "load_mnist_idx_dir",
    "upsample_digits",
]

ENV_VAR = "KFAC_KERAS_DATA_DIR"
IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_KERAS_MNIST_HOST = ("storage.googleapis.com", 443)


# --------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":
            try:
                with gzip.GzipFile(fileobj=f) as g:
                    return g.read()
            except (OSError, EOFError) as e:
                raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
        return f.read()


def read_idx(path: str, expected_magic: int | None = None) -> np.ndarray:
    """Reads one IDX file (gzip-compressed or raw) into a numpy array.

    Args:
        path: file to read.
        expected_magic: if given, the 32-bit magic number the file must have
            (2051 for MNIST images, 2049 for labels).

    Raises:
        ValueError: naming ``path`` when the header is malformed, the magic
            number is wrong, or the data length doesn't match the header.
    """
    path = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: file too short for an IDX header ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: bad IDX magic number {magic} (expected {expected_magic})"
        )
    zero, type_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file (magic number {magic})")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header ({len(raw)} bytes, need {header_len})"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        raise ValueError(
            f"{path}: IDX header announces shape {tuple(dims)} "
            f"({expected} data bytes) but the file has {actual} data bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx_images(path: str) -> np.ndarray:
    """Reads an MNIST image file (magic 2051): uint8 array (N, rows, cols)."""
    arr = read_idx(path, expected_magic=IMAGES_MAGIC)
    return arr


def read_idx_labels(path: str) -> np.ndarray:
    """Reads an MNIST label file (magic 2049): uint8 array (N,)."""
    arr = read_idx(path, expected_magic=LABELS_MAGIC)
    if arr.size and arr.max() > 9:
        raise ValueError(f"{path}: label values outside 0..9 (max {arr.max()})")
    return arr


def _find(data_dir: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz",
                 stem.replace("-idx", ".idx")):
        p = os.path.join(data_dir, name)
        if os.path.isfile(p):
            return p
    return None


def _read_pair(images_path: str, labels_path: str):
    x = read_idx_images(images_path)
    y = read_idx_labels(labels_path)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{images_path}: {x.shape[0]} images but {labels_path} has "
            f"{y.shape[0]} labels"
        )
    return x, y


def load_mnist_idx_dir(data_dir: str, subset: str = "auto"):
    """Loads MNIST from a folder of IDX files.

    Returns ``(x_uint8 (N, 28, 28), y_uint8 (N,), description)``.
    ``subset`` is ``"auto"`` (train set if present, else test set), ``"train"``,
    ``"test"`` or ``"all"`` (train then test).
    """
    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"MNIST data folder {data_dir!r} does not exist")
    test_x = _find(data_dir, "t10k-images-idx3-ubyte")
    test_y = _find(data_dir, "t10k-labels-idx1-ubyte")
    train_x = _find(data_dir, "train-images-idx3-ubyte")
    train_y = _find(data_dir, "train-labels-idx1-ubyte")
    has_test = test_x is not None and test_y is not None
    has_train = train_x is not None and train_y is not None
    if not has_test:
        raise FileNotFoundError(
            f"{data_dir!r} does not contain t10k-images-idx3-ubyte.gz and "
            "t10k-labels-idx1-ubyte.gz (MNIST IDX files)"
        )
    if subset == "auto":
        subset = "train" if has_train else "test"
    if subset in ("train", "all") and not has_train:
        raise FileNotFoundError(
            f"subset={subset!r} needs train-images-idx3-ubyte.gz and "
            f"train-labels-idx1-ubyte.gz in {data_dir!r}"
        )
    parts, names = [], []
    if subset in ("train", "all"):
        parts.append(_read_pair(train_x, train_y))
        names.append("train")
    if subset in ("test", "all"):
        parts.append(_read_pair(test_x, test_y))
        names.append("t10k")
    if subset not in ("train", "test", "all"):
        raise ValueError(f"unknown subset {subset!r}")
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    desc = f"IDX files in {data_dir} ({'+'.join(names)}, {x.shape[0]} images)"
    return x, y, desc


# --------------------------------------------------------------------------
# keras.datasets fallback
# --------------------------------------------------------------------------


def _keras_cache_file() -> str:
    home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras"
    )
    return os.path.join(home, "datasets", "mnist.npz")


def _host_reachable(host: str, port: int, timeout: float) -> bool:
    """True if a TCP connection to host:port opens within ``timeout`` s.

    Name resolution can't be given a time-out, so the check runs in a daemon
    thread that is abandoned when the time-out passes.
    """
    result = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def _load_keras(subset: str, timeout: float):
    cached = os.path.isfile(_keras_cache_file())
    if not cached and not _host_reachable(*_KERAS_MNIST_HOST, timeout=timeout):
        raise OSError("MNIST is not in the Keras cache and the download host "
                      "cannot be reached")
    import keras

    (xtr, ytr), (xte, yte) = keras.datasets.mnist.load_data()
    if subset in ("auto", "train"):
        x, y, what = xtr, ytr, "train"
    elif subset == "test":
        x, y, what = xte, yte, "test"
    else:
        x, y, what = np.concatenate([xtr, xte]), np.concatenate([ytr, yte]), "train+test"
    how = "cached copy" if cached else "downloaded"
    return x, y, f"keras.datasets.mnist.load_data() ({how}, {what}, {x.shape[0]} images)"


# --------------------------------------------------------------------------
# scikit-learn digits fallback
# --------------------------------------------------------------------------


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation matrix, pixel-centre aligned."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


def upsample_digits(images: np.ndarray, inner: int = 20, size: int = 28) -> np.ndarray:
    """Bilinearly upsamples (N, h, w) images to ``inner`` x ``inner`` and
    pads them with zeros to ``size`` x ``size`` (centred). Values are kept
    in the input's range."""
    images = np.asarray(images, dtype=np.float64)
    n, h, w = images.shape
    rows = _bilinear_matrix(h, inner)
    cols = _bilinear_matrix(w, inner)
    up = np.einsum("ih,nhw,jw->nij", rows, images, cols)
    out = np.zeros((n, size, size))
    off = (size - inner) // 2
    out[:, off:off + inner, off:off + inner] = up
    return out


def _load_sklearn_digits():
    from sklearn.datasets import load_digits  # noqa: PLC0415 (optional dep)

    d = load_digits()
    imgs = np.asarray(d.images, dtype=np.float64) / 16.0  # 0..16 -> 0..1
    x = upsample_digits(imgs)
    x = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    y = np.asarray(d.target, dtype=np.uint8)
    return x, y, (f"scikit-learn load_digits ({x.shape[0]} 8x8 digits upsampled "
                  "to 28x28; a stand-in, NOT MNIST)")


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def load_mnist(data_dir=None, flatten=True, dtype="float32", subset="auto",
               allow_download=True, download_timeout=3.0):
    """Loads MNIST (or a stand-in) as ``(x, y, source)``.

    Args:
        data_dir: folder with MNIST IDX files. Defaults to the
            ``KFAC_KERAS_DATA_DIR`` environment variable.
        flatten: if True, ``x`` has shape (N, 784); else (N, 28, 28, 1).
        dtype: floating dtype of ``x``. Pixels are scaled to [0, 1].
        subset: ``"auto"``, ``"train"``, ``"test"`` or ``"all"`` (see the
            module docstring).
        allow_download: try ``keras.datasets.mnist.load_data()`` when no folder
            is given.
        download_timeout: seconds allowed for the reachability check.

    Returns:
        ``x`` (float, in [0, 1]), ``y`` (int64 labels 0..9), and ``source``,
        a readable string saying where the data came from.
    """
    if subset not in ("auto", "train", "test", "all"):
        raise ValueError(f"unknown subset {subset!r}")
    origin = "data_dir argument"
    if data_dir is None and os.environ.get(ENV_VAR):
        data_dir = os.environ[ENV_VAR]
        origin = f"${ENV_VAR}"

    errors = []
    if data_dir is not None:
        x, y, desc = load_mnist_idx_dir(data_dir, subset=subset)
        source = f"MNIST from {desc} [via {origin}]"
    else:
        loaded = None
        if allow_download:
            try:
                loaded = _load_keras(subset, download_timeout)
            except Exception as e:  # noqa: BLE001 - any failure means "offline"
                errors.append(f"keras.datasets.mnist: {e}")
        if loaded is None:
            try:
                loaded = _load_sklearn_digits()
            except ImportError as e:
                errors.append(f"scikit-learn digits: {e}")
        if loaded is None:
            raise RuntimeError(
                "No MNIST data found. Set the environment variable "
                f"{ENV_VAR} (or pass data_dir=) to a folder with the MNIST IDX "
                "files t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
                "(optionally train-*.gz too). Tried: " + "; ".join(errors)
            )
        x, y, source = loaded
        if not source.startswith("scikit"):
            source = "MNIST from " + source

    x = np.asarray(x, dtype=dtype)  # a fresh float copy of the uint8 pixels
    x /= 255.0
    if flatten:
        x = x.reshape(x.shape[0], -1)
    else:
        x = x.reshape(x.shape[0], x.shape[1], x.shape[2], 1)
    return x, np.asarray(y, dtype=np.int64), source
