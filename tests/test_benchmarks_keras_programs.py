"""The keras-io-style programs benchmark: its synthetic data, the verdict, and a smoke run."""

import csv
import dataclasses
import os
import struct

import numpy as np
import pytest

from benchmarks import keras_program_models as models
from benchmarks import keras_programs



def _write_tiny_mnist(folder, count):
    """Random 28x28 digits as the uncompressed MNIST test-set IDX pair."""
    images = np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    with open(os.path.join(folder, "t10k-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">HBBIII", 0, 0x08, 3, count, 28, 28) + images.tobytes())
    with open(os.path.join(folder, "t10k-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">HBBI", 0, 0x08, 1, count) + bytes(count))


def test_order_task_labels_say_whether_a_comes_before_b():
    tokens, labels = models.order_task(200, 9, 6, seed=3)
    assert tokens.shape == (200, 9) and tokens.dtype == np.int32
    for row, label in zip(tokens, labels):
        assert sorted(row[row < 3].tolist()) == [1, 2]
        assert label == int(list(row).index(1) < list(row).index(2))
    assert 0.3 < labels.mean() < 0.7


def test_synthetic_reviews_have_imdb_shapes_and_front_padding():
    x, labels = models.synthetic_reviews(60, seed=0)
    assert x.shape == (60, models.MAXLEN) and set(np.unique(labels)) <= {0, 1}
    assert x.min() >= 0 and x.max() < models.VOCAB_SIZE
    for row in x:
        nonzero = np.flatnonzero(row)
        # pad_sequences' layout: zeros only in front, then the review.
        assert nonzero.size and np.all(row[nonzero[0]:] > 0)


def test_noisy_images_are_clipped_noise_around_the_images():
    images = np.full((4, 28, 28, 1), 0.5, np.float32)
    noisy = models.noisy_images(images, noise_factor=0.4, seed=1)
    assert noisy.dtype == np.float32 and noisy.min() >= 0.0 and noisy.max() <= 1.0
    # Noise of standard deviation 0.4 (a little less after clipping at 0 and 1).
    assert 0.3 < float(np.std(noisy - images)) < 0.4
    assert abs(float(np.mean(noisy - images))) < 0.02


def test_model_builders_reject_unknown_variants():
    with pytest.raises(ValueError, match="bilstm"):
        models.build_recurrent_classifier("gru", 5, 6, 4)
    with pytest.raises(ValueError, match="batched"):
        models.TokenAndPositionEmbedding(5, 10, 4, position="sinusoidal")


def _result(*values, key):
    return {"epochs": [{key: v} for v in values], "seconds": 1.0, "blocks": None}


def test_kfac_at_least_adam_uses_the_metric_direction():
    accuracy = keras_programs.PROGRAMS["bilstm"]
    loss = keras_programs.PROGRAMS["denoising"]
    k = "val_accuracy"
    assert keras_programs.kfac_at_least_adam(
        accuracy, {"adam": _result(0.5, 0.8, key=k), "kfac": _result(0.9, 0.8, key=k)})
    assert not keras_programs.kfac_at_least_adam(
        accuracy, {"adam": _result(0.81, key=k), "kfac": _result(0.8, key=k)})
    k = "val_loss"
    assert keras_programs.kfac_at_least_adam(
        loss, {"adam": _result(0.2, key=k), "kfac": _result(0.1, key=k)})
    assert not keras_programs.kfac_at_least_adam(
        loss, {"adam": _result(0.1, key=k), "kfac": _result(float("nan"), key=k)})
    assert keras_programs.kfac_at_least_adam(loss, {"adam": _result(0.1, key=k)}) is None


def test_parser_rejects_unknown_programs_and_bad_options():
    parser = keras_programs.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--programs", "vae"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--kfac-options", "[1]"])
    with pytest.raises(SystemExit):
        keras_programs.main(["--epochs", "0"])


def test_run_program_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match="adam"):
        keras_programs.run_program(keras_programs.PROGRAMS["denoising"], "sgd", None, epochs=1)


def test_entry_point_smoke(tmp_path, monkeypatch):
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    _write_tiny_mnist(data_dir, 96)
    program = dataclasses.replace(keras_programs.PROGRAMS["denoising"], quick=(64, 32, 2),
                                  batch_size=32)
    monkeypatch.setitem(keras_programs.PROGRAMS, "denoising", program)
    code = keras_programs.main(["--quick", "--programs", "denoising", "--data-dir", str(data_dir),
                                "--out-dir", str(tmp_path / "out")])
    assert code == 0
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["optimizer"], r["epoch"]) for r in rows] == [
        ("adam", "1"), ("adam", "2"), ("kfac", "1"), ("kfac", "2")]
    assert all(r["validation_metric"] == "val_loss" and np.isfinite(float(r["validation_value"]))
               for r in rows)
    # Wall time since the start of fit grows from epoch to epoch.
    assert float(rows[1]["seconds"]) > float(rows[0]["seconds"])
    text = (tmp_path / "out" / "results.md").read_text()
    assert "96 images" in text
    assert "transposed conv" in text and "| 2 |" in text
