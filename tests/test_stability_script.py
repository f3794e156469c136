"""The long-run stability script (issue 7, item 6), at CI size.

`benchmarks.stability` trains the MNIST autoencoder with default
K-FAC and judges the run; the full-size run (3,000 steps of 1,000 images) is
too slow for CI, so this runs the same script on the same network for a few
steps on small batches, checks its verdict, and checks that the verdict can
be "not stable" (NaN pixels in the data; a loss curve with a 10x jump).
"""

import json

import numpy as np
import pytest

import kfac_keras

from conftest import mnist_dir
from benchmarks import stability


def test_largest_increase_against_hand_computed_values():
    # Running minimum before each step: 4, 2, 2, 1 -> ratios 0.5, 1.5, 0.5, 12.
    ratio, step = stability.largest_increase([4.0, 2.0, 3.0, 1.0, 12.0])
    assert ratio == pytest.approx(12.0) and step == 4
    assert stability.largest_increase([3.0]) == (1.0, 0)
    ratio, step = stability.largest_increase([5.0, 4.0, 3.0])
    assert ratio == pytest.approx(0.8) and step == 1


def test_reduced_size_run_is_stable(tmp_path):
    out = tmp_path / "summary.json"
    status = stability.main([
        "--steps", "24", "--batch-size", "100", "--examples", "1000",
        "--data-dir", mnist_dir(), "--check-every", "8", "--out", str(out)])
    summary = json.loads(out.read_text())
    assert status == 0 and summary["stable"], summary
    assert len(summary["losses"]) == 24
    assert np.isfinite(summary["losses"]).all()
    assert summary["skipped_steps"] == 0 and summary["failed_variable_checks"] == []
    assert summary["largest_increase_ratio"] <= 10.0
    assert summary["loss_last"] < summary["loss_first"]  # it trains
    defaults = kfac_keras.KFAC().get_config()
    for key in ("learning_rate", "momentum", "damping", "cov_update_every", "inv_update_every"):
        assert summary["optimizer_config"][key] == pytest.approx(defaults[key]), key


def test_run_with_nan_pixels_is_reported_unstable(monkeypatch, capsys):
    from benchmarks import mnist_data

    original = mnist_data.load_mnist

    def poisoned(data_dir=None, **kwargs):
        x, y, source = original(data_dir, **kwargs)
        x = x[:200].copy()
        x[150, 10] = np.nan  # one image in the second batch
        return x, y[:200], source + " (one NaN pixel)"

    monkeypatch.setattr(mnist_data, "load_mnist", poisoned)
    status = stability.main(["--steps", "3", "--batch-size", "100", "--examples", "200",
                             "--data-dir", mnist_dir(), "--check-every", "1",
                             "--seed", "1"])
    assert status == 1
    assert "NOT STABLE" in capsys.readouterr().out


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="--steps"):
        stability.run(stability.build_parser().parse_args(["--steps", "0"]))
    with pytest.raises(ValueError, match="--examples"):
        stability.run(stability.build_parser().parse_args(
            ["--examples", "10", "--batch-size", "100"]))
