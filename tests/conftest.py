"""Shared test setup: quiet TensorFlow, deterministic seeds, small helpers."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(REPO), "shared", "data", "mnist")


@pytest.fixture(autouse=True)
def _seed_everything():
    import keras

    keras.utils.set_random_seed(1234)
    yield


def block_for_layer(optimizer, layer):
    """The registered block whose layer is `layer`."""
    for block in optimizer.registration.blocks:
        if block.layer is layer:
            return block
    raise KeyError(layer.name)


def mnist_dir():
    """The MNIST IDX folder used by tests."""
    return os.environ.get("KFAC_KERAS_DATA_DIR", DEFAULT_DATA_DIR)
