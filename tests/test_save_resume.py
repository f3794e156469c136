"""Exact resume (issue 7, item 3).

Train N steps, save, load in a *new process*, train M more: the weights and
every optimizer variable (factors, inverses or eigenbases, momentum, damping,
counters, adaptive state) must equal those of N+M uninterrupted steps,
bitwise, with `tf.config.experimental.enable_op_determinism()` in both
processes. The oracle is the uninterrupted run itself. Covered:

* `model.save("m.keras")` -> `keras.models.load_model` (safe mode) -> `fit`,
  for several K-FAC configurations (Cholesky, eigh, EKFAC, tridiagonal,
  adaptive step and damping) and blocks (Dense, diagonal, Conv2D,
  DepthwiseConv2D, BatchNormalization), including loading and saving again
  before training;
* `tf.train.Checkpoint` with a custom loop (`make_train_step`);
* `keras.callbacks.BackupAndRestore` in a single-process `fit` interrupted by
  an exception, with the callbacks in either order.

This file is also the worker script: `python test_save_resume.py PHASE SPEC`
runs one phase in a fresh interpreter.
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

N_STEPS, M_STEPS, BATCH = 4, 5, 8

# name -> KFAC options. Statistics every 2 steps and decompositions every 3,
# so the schedule straddles the save point. `fit` runs as a `tf.function` for
# GRAPH_CONFIGS and eagerly (`run_eagerly=True`, same ops, no tracing cost)
# for the others, to keep this file fast.
CONFIGS = {
    "cholesky": dict(momentum=0.9),
    "eigh": dict(inverse_method="eigh"),
    "adaptive": dict(adaptive=dict(quadratic_model_step=True, adapt_damping=True,
                                   damping_update_every=2), step_rule="kl_clip"),
    "tridiagonal": dict(approximation="tridiagonal", momentum=0.5),
    "ekfac": dict(inverse_method="ekfac"),
    "layers": dict(momentum=0.9),  # on the CNN of _build_model("cnn")
}
MODEL_OF = {"layers": "cnn"}  # other configs train the MLP
GRAPH_CONFIGS = ("cholesky",)
CHECKPOINT_CONFIGS = ("cholesky",)


# ---------------------------------------------------------------- worker
def _kfac(options):
    import kfac_keras

    base = dict(damping=0.01, cov_update_every=2, inv_update_every=3, seed=11)
    base.update(options)
    if "adaptive" not in options:
        base.setdefault("learning_rate", 0.05)
    return kfac_keras.KFAC(**base)


def _build_model(kind="mlp"):
    import keras

    keras.utils.set_random_seed(5)
    if kind == "cnn":  # conv, depthwise-conv and scale-and-shift blocks
        inputs = keras.Input((6, 6, 2))
        h = keras.layers.Conv2D(3, 3, activation="tanh", name="conv")(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        h = keras.layers.DepthwiseConv2D(2, activation="tanh", name="depthwise")(h)
        out = keras.layers.Dense(3, name="out")(keras.layers.Flatten()(h))
        return keras.Model(inputs, out)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="h1")(inputs)
    h = keras.layers.Dense(7, activation="tanh", name="h2")(h)
    h = keras.layers.PReLU(name="prelu")(h)  # a diagonal block
    out = keras.layers.Dense(3, name="out")(h)
    return keras.Model(inputs, out)


def _data(steps, kind="mlp"):
    rng = np.random.default_rng(0)
    shape = (6, 6, 2) if kind == "cnn" else (6,)
    x = rng.normal(size=(steps * BATCH,) + shape).astype("float32")
    y = rng.integers(0, 3, size=steps * BATCH)
    return x, y


def _compile(model, options, run_eagerly=False):
    import keras

    model.compile(optimizer=_kfac(options),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=run_eagerly)


def _fit(model, x, y, **kwargs):
    import kfac_keras

    callbacks = kwargs.pop("callbacks", [kfac_keras.KFACCallback(verbose=0)])
    return model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0,
                     callbacks=callbacks, **kwargs)


def _dump(path, model, optimizer):
    arrays = {}
    for index, variable in enumerate(model.weights):
        arrays[f"model_{index:03d}"] = variable.numpy()
    for index, variable in enumerate(optimizer.variables):
        arrays[f"optimizer_{index:03d}"] = variable.numpy()
    names = [v.path for v in model.weights] + [v.path for v in optimizer.variables]
    np.savez(path, names=np.array(names), **arrays)


def _phase_first(spec):
    """Uninterrupted runs; saves after N steps on the way."""
    import keras
    import tensorflow as tf

    import kfac_keras

    out = spec["dir"]
    split = N_STEPS * BATCH
    for name in spec["configs"]:
        x, y = _data(N_STEPS + M_STEPS, MODEL_OF.get(name, "mlp"))
        model = _build_model(MODEL_OF.get(name, "mlp"))
        _compile(model, CONFIGS[name], run_eagerly=name not in GRAPH_CONFIGS)
        _fit(model, x[:split], y[:split])
        model.save(os.path.join(out, f"{name}.keras"))
        _fit(model, x[split:], y[split:])
        _dump(os.path.join(out, f"{name}_full.npz"), model, model.optimizer)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = _data(N_STEPS + M_STEPS)
    for name in spec["checkpoint_configs"]:
        model = _build_model()
        optimizer = _kfac(CONFIGS[name])
        step = tf.function(kfac_keras.make_train_step(model, optimizer, loss))
        for index in range(N_STEPS + M_STEPS):
            if index == N_STEPS:
                tf.train.Checkpoint(model=model, optimizer=optimizer).write(
                    os.path.join(out, f"{name}_ckpt"))
            step(x[index * BATCH:(index + 1) * BATCH], y[index * BATCH:(index + 1) * BATCH])
        _dump(os.path.join(out, f"{name}_ckpt_full.npz"), model, optimizer)


def _phase_resume(spec):
    """Loads what `_phase_first` saved and trains the remaining M steps."""
    import keras
    import tensorflow as tf

    import kfac_keras

    out = spec["dir"]
    split = N_STEPS * BATCH
    for name in spec["configs"]:
        x, y = _data(N_STEPS + M_STEPS, MODEL_OF.get(name, "mlp"))
        model = keras.models.load_model(os.path.join(out, f"{name}.keras"), safe_mode=True)
        if name == "cholesky":
            # Load, save again before any training, load that: nothing lost.
            again = os.path.join(out, f"{name}_again.keras")
            model.save(again)
            model = keras.models.load_model(again, safe_mode=True)
        model.run_eagerly = name not in GRAPH_CONFIGS
        _fit(model, x[split:], y[split:])
        _dump(os.path.join(out, f"{name}_resumed.npz"), model, model.optimizer)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = _data(N_STEPS + M_STEPS)
    for name in spec["checkpoint_configs"]:
        model = _build_model()
        keras.utils.set_random_seed(99)  # restored values must not depend on it
        for variable in model.weights:
            variable.assign(np.random.default_rng(1).normal(size=variable.shape))
        optimizer = _kfac(CONFIGS[name])
        tf.train.Checkpoint(model=model, optimizer=optimizer).read(
            os.path.join(out, f"{name}_ckpt")).assert_nontrivial_match()
        step = tf.function(kfac_keras.make_train_step(model, optimizer, loss))
        for index in range(N_STEPS, N_STEPS + M_STEPS):
            step(x[index * BATCH:(index + 1) * BATCH], y[index * BATCH:(index + 1) * BATCH])
        _dump(os.path.join(out, f"{name}_ckpt_resumed.npz"), model, optimizer)


class _Interrupt(Exception):
    pass


def _phase_backup(spec):
    """`BackupAndRestore` in one process: interrupted at epoch 2 of 4, then
    resumed by a new model and optimizer; compared with an uninterrupted fit."""
    import keras

    import kfac_keras

    out = spec["dir"]
    x, y = _data(3)
    epochs = 4

    def fresh():
        model = _build_model()
        _compile(model, CONFIGS["cholesky"], run_eagerly=True)
        return model

    model = fresh()
    _fit(model, x, y, epochs=epochs)
    _dump(os.path.join(out, "backup_full.npz"), model, model.optimizer)

    class InterruptAtEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise _Interrupt()

    for order in ("backup_first", "kfac_first"):
        backup_dir = os.path.join(out, f"backup_{order}")

        def callbacks(extra=()):
            backup = keras.callbacks.BackupAndRestore(backup_dir)
            kfac = kfac_keras.KFACCallback(verbose=0)
            pair = [backup, kfac] if order == "backup_first" else [kfac, backup]
            return pair + list(extra)

        try:
            _fit(fresh(), x, y, epochs=epochs, callbacks=callbacks([InterruptAtEpoch()]))
        except _Interrupt:
            pass
        else:
            raise AssertionError("the interrupting callback did not fire")
        model = fresh()
        history = _fit(model, x, y, epochs=epochs, callbacks=callbacks())
        assert len(history.history["loss"]) == 2, history.history  # epochs 2 and 3 only
        _dump(os.path.join(out, f"backup_{order}.npz"), model, model.optimizer)


def _run_phase(phase, spec):
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    if phase == "first":
        _phase_first(spec)
    elif phase == "resume":  # a new process; BackupAndRestore shares it
        _phase_resume(spec)
        _phase_backup(spec)
    else:
        raise ValueError(phase)


# ----------------------------------------------------------------- tests
def _subprocess(phase, spec, tmp):
    spec_path = os.path.join(tmp, f"{phase}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, os.path.abspath(__file__), phase, spec_path],
                            env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("resume"))
    spec = {"dir": tmp, "configs": list(CONFIGS), "checkpoint_configs": list(CHECKPOINT_CONFIGS)}
    _subprocess("first", spec, tmp)
    _subprocess("resume", spec, tmp)
    return tmp


def _assert_bitwise_equal(expected_path, got_path):
    expected, got = np.load(expected_path), np.load(got_path)
    assert sorted(expected.files) == sorted(got.files), "different variable counts"
    names = list(expected["names"])
    keys = sorted(k for k in expected.files if k != "names")
    assert len(keys) == len(names)
    optimizer_keys = [k for k in keys if k.startswith("optimizer_")]
    assert len(optimizer_keys) > 10  # the K-FAC state is really there
    for key, name in zip(keys, names):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{key}: {name}")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_keras_save_load_resumes_bitwise(runs, config):
    _assert_bitwise_equal(os.path.join(runs, f"{config}_full.npz"),
                          os.path.join(runs, f"{config}_resumed.npz"))


@pytest.mark.parametrize("config", CHECKPOINT_CONFIGS)
def test_tf_checkpoint_resumes_bitwise(runs, config):
    _assert_bitwise_equal(os.path.join(runs, f"{config}_ckpt_full.npz"),
                          os.path.join(runs, f"{config}_ckpt_resumed.npz"))


@pytest.mark.parametrize("order", ["backup_first", "kfac_first"])
def test_backup_and_restore_resumes_bitwise(runs, order):
    _assert_bitwise_equal(os.path.join(runs, "backup_full.npz"),
                          os.path.join(runs, f"backup_{order}.npz"))


def test_resumed_state_is_not_the_initial_state(runs):
    """Guards the oracle: the saved K-FAC state differs from a fresh one, so a
    resume that silently dropped it could not pass the bitwise tests."""
    full = np.load(os.path.join(runs, "cholesky_full.npz"))
    names = list(full["names"])
    factors = [k for k, n in zip(sorted(k for k in full.files if k != "names"), names)
               if "factor" in n and "inverse" not in n]
    assert factors and all(np.any(full[k] != 0) for k in factors)


# In-process checks of the error paths (no subprocess needed).
def _trained(options, x, y):
    model = _build_model()
    _compile(model, options, run_eagerly=True)
    _fit(model, x, y)
    return model


def test_loading_state_from_other_block_layout_raises(tmp_path):
    x, y = _data(2)
    path = str(tmp_path / "w.weights.h5")
    _trained(CONFIGS["cholesky"], x, y).save_weights(path)
    model = _build_model()
    _compile(model, CONFIGS["eigh"], run_eagerly=True)  # 6 state variables per block, not 4
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    with pytest.raises(ValueError, match="inverse_method"):
        _fit(model, x, y)


def test_loading_state_saved_before_training_warns_and_restores_what_exists(tmp_path):
    x, y = _data(2)
    path = str(tmp_path / "w.weights.h5")
    model = _build_model()
    _compile(model, CONFIGS["cholesky"])
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(7)
    model.save_weights(path)  # no K-FAC blocks yet
    trained = _trained(CONFIGS["cholesky"], x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained.load_weights(path)
    assert any("start from scratch" in str(w.message) for w in caught)
    assert int(trained.optimizer.iterations.numpy()) == 7


if __name__ == "__main__":
    with open(sys.argv[2]) as spec_file:
        _run_phase(sys.argv[1], json.load(spec_file))
