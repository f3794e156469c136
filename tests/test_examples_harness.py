"""Tests for the benchmark harness (benchmarks/harness.py and the modules it uses) and the
autoencoder example's command line."""

import csv
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import keras

from benchmarks import batches, cli, harness, optimizers, plotting, reports, targets, timing
from benchmarks.autoencoder import (batch_size_schedule,
                                             make_autoencoder)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DIR = os.environ.get(
    "KFAC_KERAS_DATA_DIR", os.path.join(REPO, "..", "shared", "data", "mnist"))
HAVE_REAL = os.path.isfile(os.path.join(REAL_DIR, "t10k-images-idx3-ubyte.gz"))


# -- smoothing and time-to-target ------------------------------------------


def test_moving_average_trailing():
    v = [4.0, 2.0, 6.0, 0.0, 8.0]
    np.testing.assert_allclose(targets.moving_average(v, 2), [4, 3, 4, 3, 4])
    np.testing.assert_allclose(targets.moving_average(v, 1), v)
    out = targets.moving_average([1.0, float("nan"), 1.0, 1.0], 2)
    assert math.isnan(out[1]) and math.isnan(out[2]) and out[3] == 1.0


def test_steps_and_seconds_to_target_synthetic():
    loss = np.array([10, 9, 8, 7, 6, 5, 4, 3, 2, 1], dtype=float)
    hist = {"loss": loss, "elapsed": 0.5 * np.arange(1, 11), "window": 1}
    out = targets.steps_and_seconds_to_target(hist, [8, 5.5, 0.5])
    assert out[8] == (3, 1.5)
    assert out[5.5] == (6, 3.0)
    assert out[0.5] == (None, None)
    # with a 3-step moving average the loss 8.0 is first reached at step 4 (mean 8)
    out3 = targets.steps_and_seconds_to_target(hist, [8.0], window=3)
    assert out3[8.0] == (4, 2.0)
    # loss_scale multiplies the history before comparing
    scaled = targets.steps_and_seconds_to_target(hist, [80], loss_scale=10.0)
    assert scaled[80] == (3, 1.5)
    # a run_optimizer-style dict with an explicit smoothed curve
    run = {"history": {"loss": loss, "smoothed": loss[::-1].copy(),
                       "elapsed": np.arange(1, 11.0)}}
    assert targets.steps_and_seconds_to_target(run, [10])[10] == (1, 1.0)


# -- TimedLossHistory --------------------------------------------------------


def _feed(cb, losses, sizes):
    """Feeds a callback the size-weighted running means Keras would log."""
    cb.on_train_begin()
    cb.on_epoch_begin(0)
    tot, cnt = 0.0, 0.0
    for i, (l, m) in enumerate(zip(losses, sizes)):
        tot += l * m
        cnt += m
        cb.on_train_batch_end(i, {"loss": np.float32(tot / cnt)})


def test_timed_history_recovers_per_batch_loss():
    rng = np.random.default_rng(0)
    losses = rng.uniform(0.05, 0.3, size=300)
    cb = timing.TimedLossHistory(warmup_steps=2)
    _feed(cb, losses, [1000] * 300)
    h = cb.result()
    np.testing.assert_allclose(h["loss"], losses, rtol=2e-4)
    assert h["steps_run"] == 300 and h["warmup_steps"] == 2
    assert np.all(np.diff(h["elapsed"]) >= 0)
    # warm-up steps are charged the median post-warm-up step time
    med = np.median(h["step_seconds"][2:])
    np.testing.assert_allclose(h["elapsed"][1], 2 * med)
    assert h["compile_seconds"] == pytest.approx(h["step_seconds"][:2].sum())

    sizes = [int(s) for s in rng.integers(100, 5000, size=50)]
    cb2 = timing.TimedLossHistory(batch_sizes=sizes)
    _feed(cb2, losses[:50], sizes)
    np.testing.assert_allclose(cb2.result()["loss"], losses[:50], rtol=1e-4)


def test_timed_history_matches_real_per_batch_loss():
    """With a zero learning rate the recorded per-batch losses must equal the
    model's loss on each batch of the fixed-order dataset."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")

    def make_model():
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])

    res = harness.run_optimizer(make_model, lambda: keras.optimizers.SGD(0.0), x, y,
                               "mse", 16, 12, 3, False)
    assert res["steps_run"] == 12
    keras.utils.set_random_seed(3)
    model = make_model()  # same seed -> same weights as the run
    ds = batches.make_dataset(x, y, 16, 12, 3)
    expected = [float(np.mean((model(xb).numpy() - yb.numpy()) ** 2)) for xb, yb in ds]
    np.testing.assert_allclose(res["history"]["loss"], expected, rtol=1e-4)
    assert res["per_step_ms"] > 0 and res["compile_seconds"] > 0


def test_dataset_order_is_fixed():
    x = np.arange(40, dtype="float32").reshape(20, 2)
    a = [b[0].numpy() for b in batches.make_dataset(x, None, 8, 6, seed=5)]
    b = [b[0].numpy() for b in batches.make_dataset(x, None, 8, 6, seed=5)]
    c = [b[0].numpy() for b in batches.make_dataset(x, None, 8, 6, seed=6)]
    assert len(a) == 6 and all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    # first 20 examples drawn = one full epoch, without repetition
    first = np.concatenate(a)[:20, 0]
    assert sorted(first.tolist()) == list(range(0, 40, 2))
    # variable batch sizes (schedule)
    sizes = [3, 5, 20, 20]
    sched = [b[0].numpy() for b in batches.make_dataset(x, None, 0, 4, 5, sizes)]
    assert [len(s) for s in sched] == sizes
    assert sorted(sched[2][:, 0].tolist()) == list(range(0, 40, 2))


def test_batch_size_schedule():
    s = batch_size_schedule(600, 1000, 10000, full_step=500)
    assert s[0] == 1000 and s[498] < 10000 and s[499] == 10000 and s[-1] == 10000
    assert all(b2 >= b1 for b1, b2 in zip(s, s[1:]))
    # m_k = m_1 exp((k-1)/b) with b = 499 / ln 10
    b = 499 / math.log(10)
    assert s[100] == round(1000 * math.exp(100 / b))
    assert batch_size_schedule(3, 5000, 1000) == [1000, 1000, 1000]


# -- learning-rate grid search ------------------------------------------------


def _fake(best):
    calls = []

    def run(lr):
        calls.append(lr)
        return (math.log10(lr) - math.log10(best)) ** 2

    return run, calls


def test_grid_search_interior_winner_does_not_extend():
    run, calls = _fake(1e-3)
    g = harness.lr_grid_search(run, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], verbose=False)
    assert g["winner"] == 1e-3 and g["extensions"] == [] and not g["at_edge"]
    assert len(calls) == 5


def test_grid_search_extends_at_high_edge():
    run, calls = _fake(0.013)  # edge value 0.01 wins; 0.03 is tried and loses
    g = harness.lr_grid_search(run, [1e-3, 3e-3, 1e-2], verbose=False)
    assert g["extensions"] == [0.03]
    assert g["winner"] == 0.01 and not g["at_edge"]
    assert g["grid"] == [1e-3, 3e-3, 1e-2, 0.03]
    run, calls = _fake(0.05)  # 0.03 wins and is the new edge -> 0.09 is tried too
    g = harness.lr_grid_search(run, [1e-3, 3e-3, 1e-2], verbose=False)
    assert g["extensions"] == [0.03, 0.09]
    assert g["winner"] == 0.03 and not g["at_edge"]


def test_grid_search_extends_at_most_twice_and_flags_edge():
    run, calls = _fake(1e-7)  # far below the grid
    g = harness.lr_grid_search(run, [1e-3, 1e-2, 1e-1], verbose=False)
    assert g["extensions"] == [3.33e-4, 1.11e-4]
    assert g["winner"] == 1.11e-4 and g["at_edge"]
    assert len(calls) == 5


def test_grid_search_treats_divergence_as_worst():
    def run(lr):
        return {"final_loss": float("nan") if lr > 5e-3 else lr * -1.0}

    g = harness.lr_grid_search(run, [1e-3, 3e-3, 1e-2], verbose=False)
    assert g["winner"] == 3e-3 and math.isinf(g["scores"][1e-2])


# -- writers -------------------------------------------------------------------


def _fake_run(name, lr, losses, step_s):
    losses = np.asarray(losses, dtype=float)
    h = {"loss": losses, "smoothed": losses, "elapsed": step_s * np.arange(1, len(losses) + 1),
         "step_seconds": np.full(len(losses), step_s), "steps_run": len(losses),
         "window": 1}
    return {"name": name, "display": name.upper(), "lr": lr, "history": h,
            "final_loss": losses[-1], "per_step_ms": step_s * 1e3,
            "compile_seconds": 1.0, "jit_compile": False, "batch_size": 100}


def test_writers_produce_files(tmp_path):
    runs = {
        "kfac": _fake_run("kfac", None, [0.5, 0.3, 0.2, 0.1], 0.2),
        "adam": _fake_run("adam", 1e-3, [0.5, 0.4, 0.3, 0.2, 0.15, 0.1], 0.1),
        "sgd": _fake_run("sgd", 1e-2, [0.5, 0.45, 0.4], 0.1),
    }
    text = reports.write_results(runs, [3.0, 1.0], str(tmp_path), title="T",
                                loss_scale=10.0, loss_name="summed", raw_loss_name="mean",
                                notes=["a note"])
    for f in ("results.md", "results.csv", "ratios.csv"):
        assert (tmp_path / f).is_file()
    assert "a note" in text and "K-FAC speed-up" in text
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["kfac", "adam", "sgd"]
    with open(tmp_path / "ratios.csv") as f:
        ratios = list(csv.reader(f))[1:]
    assert len(ratios) == 4  # 2 baselines x 2 targets

    # Unscaled targets. K-FAC: 0.3 at step 2 (0.4 s), 0.1 at step 4 (0.8 s);
    # Adam: 0.3 at step 3 (0.3 s), 0.1 at step 6 (0.6 s); SGD never (3 steps, 0.3 s).
    reports.write_results(runs, [0.3, 0.1], str(tmp_path), basename="unscaled")
    with open(tmp_path / "unscaled.csv") as f:
        rows = {r["optimizer"]: r for r in csv.DictReader(f)}
    assert rows["kfac"]["steps_to_0.3"] == "2" and rows["kfac"]["seconds_to_0.3"] == "0.4"
    assert rows["adam"]["steps_to_0.1"] == "6" and rows["sgd"]["steps_to_0.1"] == ""
    ratio_rows = targets.compute_ratios(runs, [0.3, 0.1])
    assert ("adam", 0.3, "1.50x", "0.75x") in ratio_rows
    assert ("sgd", 0.3, ">1.50x", ">0.75x") in ratio_rows
    assert ("sgd", 0.1, ">0.75x", ">0.38x") in ratio_rows or \
        ("sgd", 0.1, ">0.75x", ">0.37x") in ratio_rows
    # scaled: the same curves x10 against targets x10 give the same table
    with open(tmp_path / "results.csv") as f:
        scaled = {r["optimizer"]: r for r in csv.DictReader(f)}
    assert scaled["kfac"]["steps_to_3"] == "2" and scaled["adam"]["steps_to_1"] == "6"

    paths = plotting.write_loss_plots(runs, str(tmp_path), targets=[0.3])
    assert all(os.path.getsize(p) > 1000 for p in paths)
    md = reports.write_grid_table({"adam": harness.lr_grid_search(
        lambda lr: abs(lr - 1e-3), [1e-4, 1e-3, 1e-2], verbose=False)})
    assert "(best)" in md
    assert os.path.getsize(reports.save_histories(runs, str(tmp_path))) > 0


def test_optimizer_specs_and_parser():
    specs = optimizers.get_optimizer_specs(["adam", "sgd", "nesterov", "muon"],
                                       output_layer_name="output_logits", verbose=False)
    assert [s.name for s in specs] == ["adam", "sgd", "nesterov", "muon"]
    opts = [s.build(None) for s in specs]
    assert opts[2].nesterov and opts[1].momentum == 0.9
    assert opts[3].exclude_layers == ["output_logits"]
    assert opts[3].weight_decay == 0.0 and opts[3].adam_weight_decay == 0.0
    sgd = optimizers.get_optimizer_specs(["sgd"], grids={"sgd": ((0.1, 1.0), (1.0,))})[0]
    assert sgd.grid == (0.1, 1.0) and sgd.quick_grid == (1.0,)
    args = cli.build_common_parser("x", default_steps=10, quick_steps=2).parse_args(
        ["--optimizers", "adam,muon", "--lrs", "adam=0.01"])
    assert args.optimizers == ["adam", "muon"] and args.lrs == {"adam": 0.01}
    assert args.batch_size == 1000 and args.out_dir.endswith(os.path.join("benchmark_results", "x"))
    with pytest.raises(SystemExit):
        cli.build_common_parser("x", default_steps=10, quick_steps=2).parse_args(
            ["--optimizers", "adam,rmsprop"])


def test_autoencoder_architecture():
    keras.utils.set_random_seed(0)
    m = make_autoencoder()
    dense = [l for l in m.layers if isinstance(l, keras.layers.Dense)]
    assert [l.units for l in dense] == [1000, 500, 250, 30, 250, 500, 1000, 784]
    acts = [l.activation.__name__ for l in dense]
    assert acts == ["tanh"] * 3 + ["linear"] + ["tanh"] * 3 + ["linear"]
    assert dense[-1].name == "output_logits"


# -- end to end --------------------------------------------------------------


@pytest.mark.skipif(not HAVE_REAL, reason=f"real MNIST not found in {REAL_DIR}")
def test_autoencoder_cli_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.autoencoder", "--quick",
           "--optimizers", "adam,sgd", "--steps", "5", "--no-grid",
           "--data-dir", REAL_DIR, "--out-dir", str(out)]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    elapsed = time.perf_counter() - t
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "IDX files" in proc.stdout
    for f in ("results.md", "results.csv", "loss_vs_steps.png",
              "loss_vs_seconds.png", "histories.json"):
        assert (out / f).is_file(), f
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["adam", "sgd"]
    assert all(r["steps_run"] == "5" for r in rows)
    # No hard time limit (a loaded CI machine varies); ~20 s on an idle 2-core box.
    print(f"quick CLI run: {elapsed:.1f} s")


def test_benchmark_optimizers_tiny_model(capsys):
    """Orchestration on a tiny model: grid search (quick: no extension), final
    runs, and a broken optimizer that is reported and left out."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0]], dtype="float32")).astype("float32")

    def make_model():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="out")])

    def broken(lr):
        raise RuntimeError("broken optimizer (test)")

    specs = [
        optimizers.OptimizerSpec("sgd", "SGD", lambda lr: keras.optimizers.SGD(lr), 0.01,
                             (0.01, 0.03), (0.01, 0.03)),
        optimizers.OptimizerSpec("adam", "Adam", lambda lr: keras.optimizers.Adam(lr), 0.01),
        optimizers.OptimizerSpec("bad", "Broken", broken, 0.1),
    ]
    out = harness.benchmark_optimizers(
        specs, make_model, x, y, "mse", steps=12, batch_size=32, seed=0,
        grid=True, quick=True, grid_steps=6, jit="off", warmup_steps=2)
    runs, grids = out["runs"], out["grids"]
    assert list(runs) == ["sgd", "adam"]
    assert grids["sgd"]["grid"] == [0.01, 0.03] and "adam" not in grids
    assert grids["sgd"]["winner"] == 0.03  # faster descent on least squares
    assert runs["sgd"]["lr"] == grids["sgd"]["winner"] and runs["adam"]["lr"] == 0.01
    assert all(r["steps_run"] == 12 for r in runs.values())
    assert not any(r["jit_compile"] for r in runs.values())
    assert "leaving it out" in capsys.readouterr().out


def test_choose_jit_compile_with_fake_probe():
    def probe(jit, steps):
        if jit:
            return {"per_step_ms": 3.0}
        return {"per_step_ms": 5.0}

    choice, t = harness.choose_jit_compile(probe, verbose=False)
    assert choice is True and t == {False: 5.0, True: 3.0}

    def xla_fails(jit, steps):
        if jit:
            raise RuntimeError("no XLA kernel")
        return {"per_step_ms": 5.0}

    assert harness.choose_jit_compile(xla_fails, verbose=False)[0] is False


def test_kfac_options_flag_is_parsed_and_validated():
    parser = cli.build_common_parser("x", default_steps=10, quick_steps=2)
    args = parser.parse_args(["--kfac-options", '{"norm_constraint": 3e-4, "adaptive": null}',
                              "--kfac-damping", "0.05"])
    assert cli.kfac_kwargs_from_args(args) == {
        "norm_constraint": 3e-4, "adaptive": None, "damping": 0.05}
    with pytest.raises(SystemExit):  # not a JSON object
        parser.parse_args(["--kfac-options", "[1]"])
    bad = parser.parse_args(["--kfac-options", '{"damping": -1}'])
    with pytest.raises(ValueError, match="damping"):
        cli.kfac_kwargs_from_args(bad)


def test_protocol_notes_name_the_learning_rate_source():
    parser = cli.build_common_parser("x", default_steps=10, quick_steps=2)
    searched = cli.protocol_notes(parser.parse_args([]), 20, "auto")
    assert "grid search of 20-step runs" in searched[1]
    assert "K-FAC runs with its default learning rate" in searched[1]
    assert "per-batch training loss" in searched[0] and searched[2].startswith("jit_compile: auto")
    fixed = cli.protocol_notes(parser.parse_args(["--no-grid", "--lrs", "adam=0.01"]), 20,
                                  "off", loss_name="training cross-entropy")
    assert "--no-grid" in fixed[1] and "fixed by --lrs" in fixed[1]
    assert "per-batch training cross-entropy" in fixed[0]


def test_parse_positive_list_and_evaluation_column():
    assert cli.parse_positive_list("120, 100,80", "--targets") == (120.0, 100.0, 80.0)
    for bad in ("", "1,x", "1,-2", "0", "1,inf", "nan"):
        with pytest.raises(ValueError, match="--targets"):
            cli.parse_positive_list(bad, "--targets")
    column = reports.evaluation_column("acc", digits=2)
    assert column({"evaluation": {"acc": 0.9876}}) == 0.99
    assert column({"evaluation": None}) is None and column({}) is None


def test_autoencoder_refuses_bad_targets_before_any_run(capsys):
    from benchmarks import autoencoder
    with pytest.raises(SystemExit) as raised:
        autoencoder.main(["--quick", "--targets", "120,-1", "--optimizers", "adam"])
    assert raised.value.code == 2
    assert "--targets must be positive numbers" in capsys.readouterr().err
