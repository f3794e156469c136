"""The Colab notebooks in colab/: structure of the committed files, and a full run of each.

`test_notebook_runs` executes every notebook top to bottom (nbclient, a kernel
on this interpreter) at the small size (`KFAC_KERAS_NOTEBOOK_SMALL=1`), from a
temporary copy, so the committed notebook and its saved outputs are never
touched; any cell error fails the test. The other tests check what the issue
asks of the committed files (badge, Colab-only install cell, saved outputs of
a real run, notebooks in sync with colab/build_notebooks.py) and the small
helpers of benchmarks/notebook_helpers.py against hand-computed values.
"""

import hashlib
import importlib.util
import os
import shutil

import nbformat
import numpy as np
import pytest

from benchmarks import notebook_helpers as nbu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
DATA_DIR = os.environ.get(
    "KFAC_KERAS_DATA_DIR", os.path.join(os.path.dirname(REPO), "shared", "data", "mnist"))
NOTEBOOKS = ("quickstart", "autoencoder_paper", "convnet_and_transformer",
             "custom_loop_and_distributed", "tuning")
CELL_TIMEOUT = 600  # seconds per cell; the longest small-size cell takes ~30 s here


def _path(name):
    return os.path.join(COLAB, f"{name}.ipynb")


def _read(name):
    return nbformat.read(_path(name), as_version=4)


def _text(cell):
    """All text a code cell printed (streams and text/plain results)."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("display_data", "execute_result"):
            parts.append(output.data.get("text/plain", ""))
    return "".join(parts)


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _load_builder():
    spec = importlib.util.spec_from_file_location(
        "colab_build_notebooks", os.path.join(COLAB, "build_notebooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------ committed files
def test_the_notebook_set_is_complete():
    found = sorted(f[:-len(".ipynb")] for f in os.listdir(COLAB) if f.endswith(".ipynb"))
    assert found == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_badge_install_cell_and_real_outputs(name):
    notebook = _read(name)
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    assert ("https://colab.research.google.com/github/kfac-keras/kfac_keras/blob/main/colab/"
            f"{name}.ipynb") in first.source
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    install = code_cells[0].source
    assert 'if "google.colab" in sys.modules:' in install
    # Colab: clone, install the package from the clone, and put the clone's root
    # (benchmarks/, the helpers) on sys.path; elsewhere only the path.
    assert "!git clone -q --depth 1 {KFAC_KERAS_REPO} {repo_root}" in install
    assert "%pip install -q {repo_root}" in install
    assert "sys.path.insert(0, repo_root)" in install
    assert 'KFAC_KERAS_REPO = os.environ.get("KFAC_KERAS_REPO"' in install
    # Saved outputs come from one top-to-bottom run: every code cell ran, in order.
    assert [c.execution_count for c in code_cells] == list(range(1, len(code_cells) + 1))
    for cell in code_cells:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
    printed = "".join(_text(c) for c in code_cells)
    assert "Size: " in printed  # which size produced the saved outputs
    assert "This notebook ran in" in printed
    assert "Data: " in printed  # which data set the run used
    images = [o for c in code_cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "no plot was saved"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_matches_its_generator(name):
    built = _load_builder().build(name)
    committed = _read(name)
    assert [(c.cell_type, c.source) for c in committed.cells] == \
        [(c.cell_type, c.source) for c in built.cells]


# ------------------------------------------------------------ full runs
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    committed = _path(name)
    before = _digest(committed)
    copy = tmp_path / f"{name}.ipynb"
    shutil.copyfile(committed, copy)
    env = {"KFAC_KERAS_DATA_DIR": DATA_DIR} if os.path.isdir(DATA_DIR) else {}
    # Raises CellExecutionError (with the cell's traceback) on any error.
    executed = nbu.execute_notebook(copy, small=True, cwd=str(tmp_path),
                                    timeout=CELL_TIMEOUT, env=env)
    code_cells = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells)
    printed = "".join(_text(c) for c in code_cells)
    assert "Size: SMALL" in printed  # the switch reached the kernel
    if env:
        assert "[via $KFAC_KERAS_DATA_DIR]" in printed
    assert _digest(committed) == before


# ------------------------------------------------------------ helpers
@pytest.mark.parametrize("value, expected", [
    (None, False), ("", False), ("0", False), ("false", False), ("No", False),
    ("off", False), ("1", True), ("true", True), (" YES ", True), ("on", True)])
def test_small_mode_reads_the_switch(value, expected):
    environ = {} if value is None else {nbu.SMALL_ENV_VAR: value}
    assert nbu.small_mode(environ) is expected
    assert nbu.choose(small="s", tutorial="t", environ=environ) == ("s" if expected else "t")
    assert nbu.size_banner(environ).startswith("Size: SMALL") is expected


def test_small_mode_rejects_other_values():
    with pytest.raises(ValueError, match="KFAC_KERAS_NOTEBOOK_SMALL='2'"):
        nbu.small_mode({nbu.SMALL_ENV_VAR: "2"})


def test_step_values_records_each_step_and_skips_missing_keys():
    recorder = nbu.StepValues(keys=("damping", "rho"))
    recorder.on_train_begin()
    recorder.on_train_batch_end(0, {"loss": 1.0, "damping": 0.5})
    recorder.on_train_batch_end(1, {"loss": 0.9, "damping": 0.25, "rho": float("nan")})
    arrays = recorder.arrays()
    np.testing.assert_array_equal(arrays["damping"], [0.5, 0.25])
    assert np.isnan(arrays["rho"]).all() and arrays["rho"].shape == (1,)
    recorder.on_train_begin()  # a new fit starts empty
    assert recorder.arrays() == {}
    with pytest.raises(TypeError, match="keys"):
        nbu.StepValues(keys="damping")


def test_fit_timer_leaves_the_time_between_epochs_out(monkeypatch):
    import time

    clock = {"now": 0.0}
    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    timer = nbu.FitTimer(warmup_steps=0)

    def at(t, hook, *args):
        clock["now"] = t
        hook(*args)

    at(0.0, timer.on_train_begin)
    at(0.0, timer.on_epoch_begin, 0)
    at(1.0, timer.on_train_batch_end, 0, {"loss": 4.0})   # batch losses 4, 2
    at(2.0, timer.on_train_batch_end, 1, {"loss": 3.0})   # running mean (4 + 2) / 2
    at(10.0, timer.on_epoch_begin, 1)                      # 8 s of validation in between
    at(11.5, timer.on_train_batch_end, 0, {"loss": 1.0})  # a new epoch: mean restarts
    at(12.0, timer.on_train_batch_end, 1, {"loss": 0.75})  # batch loss 0.5
    result = timer.result()
    np.testing.assert_allclose(result["wall"], [1.0, 2.0, 3.5, 4.0])
    np.testing.assert_allclose(result["step_seconds"], [1.0, 1.0, 1.5, 0.5])
    np.testing.assert_allclose(result["loss"], [4.0, 2.0, 1.0, 0.5])


def test_target_table_counts_steps_and_seconds_by_hand():
    # 12 losses; window 10 trailing averages by hand: the average first drops to
    # <= 2.0 at step 3 ((3 + 2 + 1) / 3 = 2) and never reaches 0.5.
    losses = np.array([3.0, 2.0, 1.0] + [1.0] * 9)
    elapsed = 0.5 * np.arange(1, 13)
    run = {"label": "hand", "per_step_ms": 500.0,
           "history": {"loss": losses, "elapsed": elapsed}}
    table = nbu.target_table([run], targets=(2.0, 0.5), loss_scale=1.0)
    header, rule, row = table.splitlines()
    assert "<= 2: steps / s" in header and "<= 0.5: steps / s" in header
    assert row.split() == ["hand", "500", "3", "/", "1.5", "-"]
    scaled = nbu.target_table([run], targets=(20.0,), loss_scale=10.0)
    assert scaled.splitlines()[2].split() == ["hand", "500", "3", "/", "1.5"]


def test_execute_notebook_rejects_a_non_bool_size(tmp_path):
    path = tmp_path / "empty.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), path)
    with pytest.raises(TypeError, match="small"):
        nbu.execute_notebook(path, small=1)


def test_execute_notebook_fails_on_a_cell_error(tmp_path):
    import nbclient.exceptions

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("x = 1"),
                      nbformat.v4.new_code_cell("raise RuntimeError('boom')")]
    path = tmp_path / "failing.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="boom"):
        nbu.execute_notebook(path, small=False, timeout=120)


def test_keep_outputs_copies_outputs_only_for_unchanged_code():
    builder = _load_builder()
    saved = builder.build("quickstart")
    for count, cell in enumerate((c for c in saved.cells if c.cell_type == "code"), start=1):
        cell.execution_count = count
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"out {count}\n")]
    saved.metadata["language_info"] = {"name": "python", "version": "3.x"}
    # Markdown edits keep the outputs, cell by cell, and the kernel's metadata.
    built = builder.build("quickstart")
    built.cells[0].source += "\n\nan edited sentence"
    kept = builder.carry_outputs(built, saved)
    kept_code = [c for c in kept.cells if c.cell_type == "code"]
    assert [c.execution_count for c in kept_code] == list(range(1, len(kept_code) + 1))
    assert [c.outputs[0].text for c in kept_code] == [
        f"out {i}\n" for i in range(1, len(kept_code) + 1)]
    assert kept.metadata["language_info"]["version"] == "3.x"
    assert kept.cells[0].source.endswith("an edited sentence")
    # A changed code cell: its saved outputs would not be those of the code shown.
    changed = builder.build("quickstart")
    next(c for c in changed.cells if c.cell_type == "code").source += "\nx = 1"
    with pytest.raises(ValueError, match="code cell 1 changed"):
        builder.carry_outputs(changed, saved)
    fewer = builder.build("quickstart")
    fewer.cells = [c for c in fewer.cells if c.source != kept_code[-1].source]
    with pytest.raises(ValueError, match="code cells"):
        builder.carry_outputs(fewer, saved)
