"""Tests for the scaling benchmark (benchmarks/scaling.py), the MNIST
CNN benchmark (benchmarks/mnist_cnn.py) and the harness hooks they
use (run_optimizer's `evaluate`, write_results' `extra_columns`)."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import keras

import kfac_keras
from benchmarks import harness, optimizers, reports
from benchmarks.mnist_cnn import classification_accuracy, make_cnn, train_test_split
from benchmarks.scaling import make_mlp, optimizer_state_bytes
from benchmarks.scaling_report import fit_power_law

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DIR = os.environ.get(
    "KFAC_KERAS_DATA_DIR", os.path.join(REPO, "..", "shared", "data", "mnist"))
HAVE_REAL = os.path.isfile(os.path.join(REAL_DIR, "t10k-images-idx3-ubyte.gz"))


def _run_cli(module, args, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# -- exponent fit --------------------------------------------------------------


def test_fit_power_law_recovers_exact_exponent():
    sizes = np.array([256, 512, 1024, 2048, 4096], dtype=float)
    for exponent, prefactor in ((2.7, 3.5e-6), (1.0, 0.25), (-0.5, 40.0)):
        times = prefactor * sizes ** exponent
        p, c = fit_power_law(sizes, times)
        assert abs(p - exponent) < 1e-10
        assert abs(c - prefactor) <= 1e-9 * prefactor
    # two points define the line exactly; points off a power law get the
    # least-squares slope, here times (1, 2, 8) at sizes (1, 2, 4): with
    # l = log 2 the centred logs are (-l, 0, l) and (-4l/3, -l/3, 5l/3), so
    # the slope is 3 l^2 / (2 l^2) = 1.5.
    p, _ = fit_power_law([2.0, 8.0], [5.0, 80.0])
    assert abs(p - 2.0) < 1e-12
    lx, ly = np.log([1.0, 2.0, 4.0]), np.log([1.0, 2.0, 8.0])
    slope = np.sum((lx - lx.mean()) * (ly - ly.mean())) / np.sum((lx - lx.mean()) ** 2)
    assert abs(fit_power_law([1, 2, 4], [1, 2, 8])[0] - slope) < 1e-12
    assert abs(slope - 1.5) < 1e-12


@pytest.mark.parametrize("sizes,times", [
    ([1.0], [1.0]),
    ([1.0, 2.0], [1.0]),
    ([1.0, 2.0], [1.0, 0.0]),
    ([1.0, 2.0], [1.0, float("nan")]),
    ([3.0, 3.0], [1.0, 2.0]),
])
def test_fit_power_law_rejects_bad_input(sizes, times):
    with pytest.raises(ValueError):
        fit_power_law(sizes, times)


# -- memory accounting -----------------------------------------------------------


def _tiny_model():
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, activation="relu", name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="d2")(h))


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_state_bytes_against_hand_count(method):
    model = _tiny_model()
    optimizer = kfac_keras.KFAC(inverse_method=method)
    optimizer.attach(model)
    counted = optimizer_state_bytes(optimizer)
    # Hand count, float32 = 4 bytes. Parameters: 3*4+4 + 4*2+2 = 26.
    # Factors, with the bias as a homogeneous input coordinate:
    # A1 (3+1)^2, G1 4^2, A2 (4+1)^2, G2 2^2.
    factor_dims = [4, 4, 5, 2]
    assert counted["momentum"] == 26 * 4
    assert counted["factors"] == 4 * sum(d * d for d in factor_dims)  # 244
    if method == "cholesky":  # one inverse per factor
        assert counted["decompositions"] == 4 * sum(d * d for d in factor_dims)
    else:  # eigenvalues + eigenvectors per factor
        assert counted["decompositions"] == 4 * sum(d + d * d for d in factor_dims)
    # the rest are scalars (step counter, learning rate, damping, counters)
    assert 0 < counted["other"] <= 16 * 8
    assert counted["total"] == sum(counted[k] for k in
                                   ("momentum", "factors", "decompositions", "other"))

    adam = keras.optimizers.Adam()
    adam.build(model.trainable_variables)
    adam_bytes = optimizer_state_bytes(adam)
    assert adam_bytes["slots"] == 2 * 26 * 4  # first and second moments
    assert 0 < adam_bytes["other"] <= 4 * 8


def test_state_bytes_of_the_benchmark_mlp():
    width = 8
    model = make_mlp(width)
    dims = [(784, width), (width, width), (width, 10)]
    assert [tuple(l.kernel.shape) for l in model.layers[1:]] == dims
    optimizer = kfac_keras.KFAC()
    optimizer.attach(model)
    counted = optimizer_state_bytes(optimizer)
    params = sum(i * o + o for i, o in dims)
    assert counted["momentum"] == 4 * params
    assert counted["factors"] == 4 * sum((i + 1) ** 2 + o ** 2 for i, o in dims)
    assert counted["decompositions"] == counted["factors"]


# -- CNN: split and accuracy ------------------------------------------------------


def test_train_test_split_is_disjoint_fixed_and_complete():
    train, test = train_test_split(10_000)
    assert train.size == 8000 and test.size == 2000
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(10_000))
    np.random.seed(123)  # the global RNG state must not matter
    keras.utils.set_random_seed(99)
    train2, test2 = train_test_split(10_000)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(test, test2)
    # a random subset, not a block of consecutive images
    assert test.min() < 100 and test.max() > 9_900
    # small data sets hold out a fifth
    small_train, small_test = train_test_split(100)
    assert small_test.size == 20 and np.intersect1d(small_train, small_test).size == 0
    with pytest.raises(ValueError, match="num_examples"):
        train_test_split(1)
    with pytest.raises(ValueError, match="test_size"):
        train_test_split(100, test_size=0)


def test_classification_accuracy_matches_numpy_argmax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype("float32")
    kernel = rng.normal(size=(4, 3))
    bias = rng.normal(size=(3,))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.layers[0].set_weights([kernel.astype("float32"), bias.astype("float32")])
    logits = x.astype(np.float64) @ kernel + bias  # float64 oracle
    predicted = np.argmax(logits, axis=1)
    top2 = np.sort(logits, axis=1)
    assert np.min(top2[:, -1] - top2[:, -2]) > 1e-4  # no near-ties
    labels = predicted.copy()
    labels[30:] = (labels[30:] + 1) % 3  # 20 wrong on purpose
    assert classification_accuracy(model, x, labels, batch_size=16) == pytest.approx(0.6)
    labels = rng.integers(0, 3, size=50)
    expected = float(np.mean(predicted == labels))
    assert classification_accuracy(model, x, labels) == pytest.approx(expected)
    with pytest.raises(ValueError, match="examples"):
        classification_accuracy(model, x, labels[:10])


def test_cnn_architecture():
    model = make_cnn()
    kinds = [type(l).__name__ for l in model.layers[1:]]
    assert kinds == ["Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten",
                     "Dense", "Dense"]
    assert model.output_shape == (None, 10) and model.layers[-1].name == "logits"
    assert model.get_layer("flatten").output.shape[-1] == 800


def test_evaluate_hook_and_extra_columns(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    calls = []

    def evaluate(model):
        calls.append(model)
        return {"test_accuracy": classification_accuracy(model, x, y)}

    def make_model():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="out")])

    specs = optimizers.get_optimizer_specs(["adam"], output_layer_name="out")
    bench = harness.benchmark_optimizers(
        specs, make_model, x, y,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps=6, batch_size=16, seed=0, grid=True, quick=True, grid_steps=3,
        jit="off", evaluate=evaluate)
    run = bench["runs"]["adam"]
    assert len(calls) == 1  # final run only, not the two grid runs
    assert len(bench["grids"]["adam"]["grid"]) == 2
    accuracy = run["evaluation"]["test_accuracy"]
    assert accuracy == classification_accuracy(calls[0], x, y)
    text = reports.write_results(
        bench["runs"], [0.5], str(tmp_path), extra_columns=[
            ("test accuracy", lambda r: round(r["evaluation"]["test_accuracy"], 4)),
            ("missing", lambda r: None)])
    header = [line for line in text.splitlines() if line.startswith("| optimizer")][0]
    assert "| test accuracy | missing |" in header
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["test accuracy"]) == round(accuracy, 4)
    assert rows[0]["missing"] == ""


# -- command lines -------------------------------------------------------------------


def test_scaling_quick_cli(tmp_path):
    out = tmp_path / "scaling"
    stdout = _run_cli("benchmarks.scaling",
                      ["--quick", "--widths", "16,32", "--batches", "50,100",
                       "--fixed-batch", "100", "--fixed-width", "16", "--repeats", "2",
                       "--out-dir", str(out)], tmp_path)
    assert "tensorflow" in stdout and "Fitted exponents" in stdout
    for name in ("results.md", "results.csv", "exponents.csv", "time_vs_width.png",
                 "time_vs_batch.png", "memory_vs_width.png"):
        assert (out / name).is_file(), name
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    width_rows = [r for r in rows if r["sweep"] == "width"]
    batch_rows = [r for r in rows if r["sweep"] == "batch"]
    decomposition_rows = [r for r in rows if r["sweep"] == "decomposition"]
    assert [(int(r["width"]), int(r["batch"])) for r in width_rows] == [(16, 100), (32, 100)]
    assert [(int(r["width"]), int(r["batch"])) for r in batch_rows] == [(16, 50), (16, 100)]
    assert [int(r["n"]) for r in decomposition_rows] == [16, 32]
    # the shared point (16, 100) is measured once and listed in both sweeps
    assert width_rows[0]["adam_step_ms"] == batch_rows[1]["adam_step_ms"]
    for r in width_rows + batch_rows:
        for column in ("adam_step_ms", "kfac_plain_step_ms", "kfac_statistics_step_ms",
                       "kfac_decomposition_call_ms", "kfac_step_amortised_ms",
                       "ratio_kfac_to_adam"):
            value = float(r[column])
            assert math.isfinite(value) and value > 0, (column, r[column])
        assert int(r["kfac_state_bytes"]) > int(r["adam_state_bytes"]) > 0
    for r in decomposition_rows:
        assert float(r["cholesky_inverse_ms"]) > 0 and float(r["eigh_ms"]) > 0
    # the width-sweep state bytes match the hand formula of make_mlp (float32)
    for r in width_rows:
        n = int(r["width"])
        dims = [(784, n), (n, n), (n, 10)]
        assert int(r["kfac_factors_bytes"]) == 4 * sum((i + 1) ** 2 + o ** 2 for i, o in dims)
        assert int(r["adam_state_bytes"]) - 2 * 4 * sum(i * o + o for i, o in dims) <= 32
    with open(out / "exponents.csv") as f:
        exponents = list(csv.DictReader(f))
    assert {(e["quantity"], e["versus"]) for e in exponents} >= {
        ("kfac_step_amortised_ms", "width"), ("cholesky_inverse_ms", "n"),
        ("adam_step_ms", "batch")}
    assert all(math.isfinite(float(e["exponent_all"])) for e in exponents)
    md = (out / "results.md").read_text()
    assert md.count("\n| 16 |") == 3  # width, decomposition and memory tables
    assert md.count("\n| 50 |") == 1 and "Fitted exponents" in md


@pytest.mark.skipif(not HAVE_REAL, reason=f"real MNIST not found in {REAL_DIR}")
def test_mnist_cnn_quick_cli(tmp_path):
    out = tmp_path / "cnn"
    stdout = _run_cli("benchmarks.mnist_cnn",
                      ["--quick", "--optimizers", "kfac,adam", "--steps", "12",
                       "--data-dir", REAL_DIR, "--out-dir", str(out)], tmp_path)
    assert "8000 training and 2000 held-out test images" in stdout
    for name in ("results.md", "results.csv", "loss_vs_steps.png", "loss_vs_seconds.png",
                 "histories.json"):
        assert (out / name).is_file(), name
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["kfac", "adam"]
    for r in rows:
        assert r["steps_run"] == "12" and r["batch_size"] == "250"
        accuracy = float(r["test accuracy"])
        assert 0.0 <= accuracy <= 1.0
        assert math.isfinite(float(r["per_step_ms"])) and float(r["per_step_ms"]) > 0
    md = (out / "results.md").read_text()
    assert "test accuracy" in md and "\n| K-FAC |" in md and "\n| Adam |" in md
    with open(out / "histories.json") as f:
        histories = json.load(f)
    assert len(histories["adam"]["loss"]) == 12


# -- timing helper: the amortised period does steady-state work -------------------


@pytest.mark.parametrize("skip_startup,expected_decompositions", [(False, 2), (True, 1)])
def test_kfac_period_seconds_period_contents(skip_startup, expected_decompositions):
    """One timed inv_update_every period (steps 2..21 after 2 warm-up steps)
    holds two statistics updates (steps 10, 20) and, once the start-up phase
    is skipped, one decomposition (step 20); without skipping, the start-up
    rule (decompose after each of the first three estimates) adds step 10."""
    import tensorflow as tf

    from benchmarks import step_cost, timing

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(40, 784)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=40).astype("int32"))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    _, optimizer, step = step_cost.build_kfac_step(lambda: make_mlp(8), x, y, loss)
    assert (optimizer.cov_update_every, optimizer.inv_update_every) == (10, 20)
    block = optimizer.registration.blocks[1]
    events = {"statistics": [], "decompositions": []}
    state = {"step": 0, "inverse": None, "factor": None}

    def observed_step():
        result = step()
        inverse = block.input_factor_inverse.numpy().copy()
        factor = block.input_factor.numpy().copy()
        if state["inverse"] is not None:
            if not np.array_equal(inverse, state["inverse"]):
                events["decompositions"].append(state["step"])
            if not np.array_equal(factor, state["factor"]):
                events["statistics"].append(state["step"])
        state.update(step=state["step"] + 1, inverse=inverse, factor=factor)
        return result

    durations = timing.kfac_period_seconds(observed_step, optimizer, 1,
                                           skip_startup=skip_startup)
    assert durations.shape == (1,) and durations[0] > 0
    assert state["step"] == 22
    assert events["statistics"] == [10, 20]
    assert len(events["decompositions"]) == expected_decompositions
    assert events["decompositions"][-1] == 20
