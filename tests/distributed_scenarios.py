"""Scenarios for the `tf.distribute` tests, run in fresh subprocesses.

Logical CPU devices must be configured before TensorFlow initialises its
devices, and pytest-xdist workers import other test modules that touch
TensorFlow first, so the tests (`tests/test_distributed_*.py`) run this file
as a script: `python tests/distributed_scenarios.py SCENARIO [ARGS]`. Each
scenario asserts and prints `PASS <what>` lines; the tests look for them.

The oracle for every multi-replica run is a single-device run of the same
model from the same initial weights on the same global batches, in the same
process (K-FAC's single-device math is tested against dense NumPy oracles in
the other test files). Compared: the weights and every optimizer variable
(momentum, damping, counters, factors, decompositions), `rtol=1e-4,
atol=1e-6` (float32 sums in another order); the replicas' copies of every
mirrored variable must be identical. Bases (`inverse_method="eigh"`
eigenvectors, the tridiagonal blocks' generalized eigenvectors) are compared
through `U diag(1 / (|d| + 0.05)) U^T`: column signs, and the vectors of
nearly equal eigenvalues, may change with float32 rounding.
"""

import contextlib
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 8  # = 2 * inv_update_every below
RTOL, ATOL = 1e-4, 1e-6
#: The scenarios' timeouts only stop a hung process; a loaded 2-core machine
#: (the suite runs on two pytest workers, each scenario starts TensorFlow afresh)
#: took up to twice the quiet time, so every timeout is this many times the
#: quiet-machine bound written at the call.
HANG_GUARD_FACTOR = 3


def run_scenario(name, *arguments, timeout=110, env=None):
    """Runs scenario `name` in a fresh Python; returns its stdout after
    checking that it completed."""
    env = dict(os.environ if env is None else env, TF_CPP_MIN_LOG_LEVEL="2")
    # This checkout's kfac_keras, not an installed copy (e.g. of another worktree).
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), name] + [json.dumps(a) for a in arguments],
        capture_output=True, text=True, timeout=HANG_GUARD_FACTOR * timeout, env=env)
    assert result.returncode == 0 and "ALL DONE" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-5000:])
    return result.stdout


def configure_logical_cpus(count):
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 5)).astype("float32")
    y = ((x[:, 0] + x[:, 1] > 0).astype("int32") + (x[:, 2] > 1).astype("int32"))
    return x, y


def build(options, layers=2):
    """A tiny tanh MLP (3 classes) compiled with KFAC; same initial weights
    for every call (seeded), same variable names."""
    import keras
    import kfac_keras
    keras.utils.set_random_seed(1)
    hidden = [keras.layers.Dense(6, activation="tanh", name=f"h{i}") for i in range(layers - 1)]
    model = keras.Sequential([keras.Input((5,))] + hidden
                             + [keras.layers.Dense(3, activation="softmax", name="out")],
                             name="net")
    # The plain update (`step_rule="kl_clip"`, learning rate, fixed damping),
    # unless `options` has `"defaults": True`: then KFAC's defaults (the
    # orthogonal step rule, Levenberg-Marquardt damping) apart from the seed,
    # the update periods and the rest of `options`.
    options = dict(options)
    if options.pop("defaults", False):
        kwargs = dict(seed=3, cov_update_every=2, inv_update_every=4)
    else:
        kwargs = dict(seed=3, learning_rate=0.05, cov_update_every=2, inv_update_every=4,
                      damping=0.05, adaptive=None, norm_constraint=None, step_rule="kl_clip")
    loss_scaling = kwargs.pop("loss_scaling", False) or options.pop("loss_scaling", False)
    kwargs.update(options)
    optimizer = kfac_keras.KFAC(**kwargs)
    # `loss_scaling`: compile with Keras's LossScaleOptimizer around KFAC
    # (what `mixed_float16` does by itself).
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(optimizer)
                  if loss_scaling else optimizer, loss="sparse_categorical_crossentropy")
    return model, optimizer


def state(model, optimizer):
    """Weights and optimizer variables by name, and a check that every
    replica's copy of a mirrored variable is identical."""
    values = {f"weight/{v.path}": np.array(v.numpy()) for v in model.weights}
    values.update({f"optimizer/{v.path}": np.array(v.numpy()) for v in optimizer.variables})
    # The logged K-FAC values (damping, update norm; rho, the predicted
    # change, alpha and mu with adaptive options), not all optimizer variables.
    values.update({f"logged/{key}": np.array(value.numpy())
                   for key, value in optimizer.logged_values().items()})
    for variable in list(model.weights) + list(optimizer.variables):
        copies = getattr(variable.value, "values", None)
        if copies is not None:
            first = copies[0].numpy()
            for copy in copies[1:]:
                assert np.array_equal(first, copy.numpy()), f"replica copies differ: {variable.path}"
    return values


#: Basis variables (eigenvectors, generalized eigenvectors of the
#: tridiagonal blocks) and their eigenvalue variables.
_BASES = {"_eigenvectors": "_eigenvalues", "_sigma_basis": "_sigma_values"}


def _basis_invariant(values, key, suffix):
    """`U diag(1 / (|d| + 0.05)) U^T` for the basis `values[key]` and its
    eigenvalues `d` (for `eigh`, the damped inverse preconditioning uses):
    invariant to the signs of the columns and, nearly, to rotations within
    nearly equal eigenvalues, which float32 rounding may change."""
    basis = values[key].astype(np.float64)
    eigenvalues = values[key.replace(suffix, _BASES[suffix])].astype(np.float64)
    return (basis / (np.abs(eigenvalues) + 0.05)) @ basis.T


def _assert_close(actual, expected, err_msg):
    # Replicas sum in another order than one device, so an entry that is a small
    # difference of large terms carries float32 rounding of the array's scale:
    # the absolute tolerance grows with the array's largest entry.
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL + RTOL * scale,
                               err_msg=err_msg)


def assert_same_state(expected, actual, label):
    assert sorted(expected) == sorted(actual), (sorted(expected), sorted(actual))
    for key in expected:
        suffix = next((s for s in _BASES if key.endswith(s)), None)
        if suffix is not None:
            _assert_close(_basis_invariant(actual, key, suffix),
                          _basis_invariant(expected, key, suffix), f"{label}: {key}")
            continue
        _assert_close(actual[key], expected[key], f"{label}: {key}")
    # The run must have trained: factors and weights moved.
    assert expected["optimizer/kfac/num_estimates"] > 0
    print("PASS", label, flush=True)


def train_single(options, mode, batches, layers=2, epochs=1):
    import kfac_keras
    import tensorflow as tf
    model, optimizer = build(options, layers)
    if mode == "fit":
        x, y = batches
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0,
                  callbacks=[kfac_keras.KFACCallback(verbose=0)])
    else:
        step = tf.function(kfac_keras.make_train_step(model, optimizer))
        for x, y in batches:
            step(x, y)
    return model, optimizer


def train_mirrored(strategy, options, mode, batches, layers=2, epochs=1):
    import kfac_keras
    import tensorflow as tf
    with strategy.scope():
        model, optimizer = build(options, layers)
    if mode == "fit":
        x, y = batches
        with strategy.scope():
            model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0,
                      callbacks=[kfac_keras.KFACCallback(verbose=0)])
        return model, optimizer
    step = kfac_keras.make_train_step(model, optimizer)

    def distributed_step(x, y):
        return strategy.run(step, args=(x, y))

    if mode != "eager":
        distributed_step = tf.function(distributed_step)
    for x, y in batches:
        share = len(x) // strategy.num_replicas_in_sync

        def replica_slice(context, x=x, y=y):
            """Replica r gets examples [r * share, (r + 1) * share)."""
            start = context.replica_id_in_sync_group * share
            return x[start:start + share], y[start:start + share]

        distributed_step(*strategy.experimental_distribute_values_from_function(replica_slice))
    return model, optimizer


def loop_batches(x, y):
    return [(x[i:i + GLOBAL_BATCH], y[i:i + GLOBAL_BATCH])
            for i in range(0, len(x), GLOBAL_BATCH)]


CONFIGURATIONS = {
    "cholesky": ({}, 2),
    "eigh": ({"inverse_method": "eigh"}, 2),
    # EKFAC's scalings every step: with the statistics and a decomposition
    # first (steps 0, 2, 4), with the statistics alone (step 6), and alone in
    # the current basis (odd steps).
    "ekfac": ({"inverse_method": "ekfac", "scale_update_every": 1}, 2),
    "tridiagonal": ({"approximation": "tridiagonal"}, 3),
    "distributed_inverses": ({"distributed_inverses": True}, 4),
    "l2_norm_constraint_weight_decay": (
        {"l2_reg": 1e-3, "norm_constraint": 1e-3, "weight_decay": 1e-2}, 2),
    # KFAC(seed=...) defaults: Levenberg-Marquardt damping every 10 steps (at
    # steps 0 and 10 of its two epochs, see EPOCHS) and the orthogonal step
    # rule; then KL clipping (the defaults of earlier versions) with the
    # damping rule every 2 steps.
    "defaults": ({"defaults": True}, 2),
    "adapt_damping_every_2": ({"defaults": True, "step_rule": "kl_clip", "adaptive": {
        "adapt_damping": True, "min_damping": 1e-3, "damping_update_every": 2}}, 2),
    # Step size and momentum from the quadratic model (2x2 system), with LM damping.
    "quadratic_model_step": ({"defaults": True, "step_rule": "kl_clip", "norm_constraint": None,
                              "adaptive": {"quadratic_model_step": True, "adapt_damping": True,
                                           "min_damping": 1e-3, "damping_update_every": 2}}, 2),
    # The orthogonal step rule (kfac_keras.orthogonal_step) with LM damping.
    "orthogonal": ({"defaults": True, "step_rule": "orthogonal"}, 3),
}


#: Epochs (of `STEPS` steps) per configuration, 1 unless listed: the default
#: damping rule runs every 10 steps, so "defaults" needs more than 10 steps
#: to apply it after the first step.
EPOCHS = {"defaults": 2}


def scenario_mirrored_equivalence(names):
    """Fit and custom loop (in a tf.function, and eagerly for the default
    configuration) under MirroredStrategy(2 CPUs) == one device."""
    import kfac_keras
    import tensorflow as tf
    print("kfac_keras from", os.path.dirname(kfac_keras.__file__), flush=True)
    configure_logical_cpus(2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = data()
    for name in names:
        options, layers = CONFIGURATIONS[name]
        for mode in ("loop", "fit", "eager"):
            if mode != "loop" and name not in ("cholesky", "defaults", "ekfac"):
                continue  # the modes share the step; one run of fit and eager suffices
            epochs = EPOCHS.get(name, 1)
            batches = (x, y) if mode == "fit" else loop_batches(x, y) * epochs
            expected = state(*train_single(options, mode, batches, layers, epochs))
            actual = state(*train_mirrored(strategy, options, mode, batches, layers, epochs))
            assert_same_state(expected, actual, f"{name}/{mode}")
            if options.get("defaults"):
                # The rule ran: rho was defined and the damping moved.
                assert np.isfinite(expected["logged/rho"]), expected["logged/rho"]
                assert expected["logged/damping"] != 1e-2, expected["logged/damping"]
                print("PASS", f"{name}/{mode}/damping_adapted", flush=True)


def weighted_data(zero_batch):
    """`data()` with sample weights: within every batch the first replica's
    half weighs `uniform(0.5, 2)`, the second's is 3/4 zeros, so the
    replicas' weighted counts differ from their example counts; with
    `zero_batch` the third batch weighs 0 throughout (its `G` estimate is 0,
    which leaves the tridiagonal chain's generalized eigenproblems too
    ill-conditioned for the float32 comparison, so only Dense blocks get it)."""
    x, y = data()
    rng = np.random.default_rng(7)
    weight = rng.uniform(0.5, 2.0, len(x)).astype("float32")
    half = GLOBAL_BATCH // 2
    for start in range(0, len(x), GLOBAL_BATCH):
        weight[start + half:start + GLOBAL_BATCH - 2] = 0.0
    if zero_batch:
        # A statistics step (cov_update_every=2) whose weights are all 0: the
        # input factors stay as they are.
        weight[2 * GLOBAL_BATCH:3 * GLOBAL_BATCH] = 0.0
    return x, y, weight


def scenario_mirrored_weighted():
    """Sample weights with zeros (unevenly split over the replicas): custom
    loop and `fit` under MirroredStrategy(2 CPUs) == one device; the
    replicas' input-factor estimates are averaged with their weighted counts
    `m_w` as weights. Dense blocks and a tridiagonal chain (cross factors)."""
    import kfac_keras
    import tensorflow as tf
    configure_logical_cpus(2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for name, options, layers in (("cholesky", {}, 2),
                                  ("tridiagonal", {"approximation": "tridiagonal"}, 3)):
        x, y, weight = weighted_data(zero_batch=name == "cholesky")
        for mode in ("loop", "fit"):
            if mode == "fit" and name != "cholesky":
                continue
            model, optimizer = build(options, layers)
            if mode == "fit":
                model.fit(x, y, sample_weight=weight, batch_size=GLOBAL_BATCH, shuffle=False,
                          verbose=0, callbacks=[kfac_keras.KFACCallback(verbose=0)])
            else:
                step = tf.function(kfac_keras.make_train_step(model, optimizer))
                for start in range(0, len(x), GLOBAL_BATCH):
                    batch = slice(start, start + GLOBAL_BATCH)
                    step(x[batch], y[batch], weight[batch])
            expected = state(model, optimizer)
            with strategy.scope():
                model, optimizer = build(options, layers)
            if mode == "fit":
                with strategy.scope():
                    model.fit(x, y, sample_weight=weight, batch_size=GLOBAL_BATCH,
                              shuffle=False, verbose=0,
                              callbacks=[kfac_keras.KFACCallback(verbose=0)])
            else:
                step = kfac_keras.make_train_step(model, optimizer)
                distributed_step = tf.function(
                    lambda *args: strategy.run(step, args=args))
                share = GLOBAL_BATCH // 2
                for start in range(0, len(x), GLOBAL_BATCH):
                    def replica_slice(context, start=start):
                        first = start + context.replica_id_in_sync_group * share
                        part = slice(first, first + share)
                        return x[part], y[part], weight[part]

                    distributed_step(
                        *strategy.experimental_distribute_values_from_function(replica_slice))
            assert_same_state(expected, state(model, optimizer), f"weighted/{name}/{mode}")


def scenario_mirrored_guard():
    """An Inf in one replica's half of a statistics-step batch skips the step
    on both replicas; factors and weights are those of the single-device run
    (which skips the same batch); the factors are unchanged by that step."""
    import tensorflow as tf
    configure_logical_cpus(2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = data()
    x = x.copy()
    bad_step = 2  # a statistics step (cov_update_every=2)
    x[bad_step * GLOBAL_BATCH + GLOBAL_BATCH - 1, 0] = np.inf  # second replica's half
    batches = loop_batches(x, y)
    expected = state(*train_single({}, "loop", batches))
    assert expected["optimizer/kfac/skipped_steps"] == 1

    import kfac_keras
    with strategy.scope():
        model, optimizer = build({})
    step = kfac_keras.make_train_step(model, optimizer)

    @tf.function
    def distributed_step(x, y):
        return strategy.run(step, args=(x, y))

    before_bad = None
    for index, (xb, yb) in enumerate(batches):
        if index == bad_step:
            before_bad = state(model, optimizer)
        for xs, ys in strategy.experimental_distribute_dataset(
                tf.data.Dataset.from_tensors((xb, yb))):
            distributed_step(xs, ys)
        if index == bad_step:
            after_bad = state(model, optimizer)
            for key, value in before_bad.items():
                if key != "optimizer/kfac/skipped_steps":
                    assert np.array_equal(value, after_bad[key]), f"bad step changed {key}"
            assert after_bad["optimizer/kfac/skipped_steps"] == 1
            print("PASS guard/bad_step_changes_nothing", flush=True)
    actual = state(model, optimizer)
    assert_same_state(expected, actual, "guard/final_state")

    # BatchNormalization's moving statistics, written by each replica's
    # forward pass, are put back on every replica when the step is skipped.
    import keras
    with strategy.scope():
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6),
                                  keras.layers.BatchNormalization(),
                                  keras.layers.Activation("tanh"),
                                  keras.layers.Dense(3, activation="softmax")])
        optimizer = kfac_keras.KFAC(seed=0, cov_update_every=2, inv_update_every=4,
                                    learning_rate=0.05, adaptive=None, norm_constraint=None)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    step = kfac_keras.make_train_step(model, optimizer)

    @tf.function
    def batchnorm_step(x, y):
        return strategy.run(step, args=(x, y))

    def moving_statistics():
        return [copy.numpy() for v in model.non_trainable_weights for copy in v.value.values]

    for index, (xb, yb) in enumerate(batches[:bad_step + 2]):
        before = moving_statistics()
        for xs, ys in strategy.experimental_distribute_dataset(
                tf.data.Dataset.from_tensors((xb, yb))):
            batchnorm_step(xs, ys)
        unchanged = all(np.array_equal(a, b) for a, b in zip(before, moving_statistics()))
        assert unchanged == (index == bad_step), (index, unchanged)
    assert int(optimizer.skipped_steps.numpy()) == 1
    print("PASS guard/batchnorm_statistics_restored", flush=True)


MIXED_RTOL, MIXED_ATOL = 2e-2, 1e-4


def scenario_mirrored_loss_scaling(policy):
    """Dynamic loss scaling (Keras's LossScaleOptimizer around KFAC) with
    KFAC's defaults: the custom-loop step under MirroredStrategy(2 CPUs)
    equals the single-device step on the same global batches, the dynamic
    loss scale included; an Inf in the second replica's half of one batch
    skips the step on both replicas, halves the scale and leaves the weights,
    momentum and factors as they were.

    `policy`: `"float32"` (the LossScaleOptimizer passed to `compile`; same
    tolerances as the other scenarios, so the loss-scaling logic is exact)
    or `"mixed_float16"` (which wraps KFAC by itself; with `step_rule="kl_clip"`;
    `rtol=2e-2, atol=1e-4`:
    the forward pass runs in float16, whose rounding differs with the number
    of rows in a matrix product, and 8 steps amplify it)."""
    import keras
    import kfac_keras
    import tensorflow as tf
    configure_logical_cpus(2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    keras.mixed_precision.set_global_policy(policy)
    x, y = data()
    x = x.copy()
    bad_step = 4  # a statistics step (cov_update_every=2)
    x[bad_step * GLOBAL_BATCH + GLOBAL_BATCH - 1, 1] = np.inf  # second replica's half
    batches = loop_batches(x, y)

    def full_state(model, optimizer):
        # KFAC's variables built with the LossScaleOptimizer carry its name.
        values = {re.sub(r"optimizer/loss_scale_optimizer(_\d+)?/", "optimizer/", key): value
                  for key, value in state(model, optimizer).items()}
        scaler = model.optimizer
        assert isinstance(scaler, keras.optimizers.LossScaleOptimizer)
        values["loss_scale"] = np.array(scaler.dynamic_scale.numpy())
        values["loss_scale_counter"] = np.array(scaler.step_counter.numpy())
        return values

    def train(distributed):
        with (strategy.scope() if distributed else contextlib.nullcontext()):
            # mixed_float16 on the KL-clipped rule: the orthogonal default
            # pushes every singular value of the step to ~1, which amplifies
            # float16's row-count-dependent rounding past these tolerances
            # (one output-kernel entry 5.9% off after 8 steps); float32 checks
            # the default rule's loss-scaling logic exactly.
            rule = {"step_rule": "kl_clip"} if policy == "mixed_float16" else {}
            model, optimizer = build({"defaults": True, "loss_scaling": policy == "float32",
                                      **rule})
        step = kfac_keras.make_train_step(model)  # model.optimizer: the LossScaleOptimizer
        run = tf.function(lambda a, b: strategy.run(step, args=(a, b)) if distributed
                          else step(a, b))
        history = []
        for index, (xb, yb) in enumerate(batches):
            if distributed:
                for xs, ys in strategy.experimental_distribute_dataset(
                        tf.data.Dataset.from_tensors((xb, yb))):
                    run(xs, ys)
            else:
                run(xb, yb)
            history.append(full_state(model, optimizer))
        return history

    expected, actual = train(False), train(True)
    for key, value in actual[-1].items():
        if "factor" in key:
            assert value.dtype == np.float32, (key, value.dtype)
    before, after = actual[bad_step - 1], actual[bad_step]
    assert after["optimizer/kfac/skipped_steps"] == 1
    assert after["loss_scale"] == before["loss_scale"] / 2
    for key, value in before.items():
        if key.startswith(("weight/", "optimizer/kfac/net_")):
            assert np.array_equal(value, after[key]), f"skipped step changed {key}"
    print(f"PASS {policy}/skipped_step", flush=True)
    if policy == "mixed_float16":
        worst = max(float(np.max(np.abs(actual[-1][k] - v) / (np.abs(v) + MIXED_ATOL / MIXED_RTOL)))
                    for k, v in expected[-1].items() if np.all(np.isfinite(v)))
        print(f"mixed_float16: largest relative difference {worst:.2e}", flush=True)
        global RTOL, ATOL
        RTOL, ATOL = MIXED_RTOL, MIXED_ATOL
    assert_same_state(expected[-1], actual[-1], f"{policy}/final_state")


def build_layers_model(normalization=None):
    """Embedding -> Conv2D (3x3, tanh) -> [BatchNormalization] -> Dense
    softmax over 6-token sequences, compiled with KFAC's defaults (seed and
    update periods of `build`); same initial weights for every call.
    `normalization`: None, or the `synchronized` argument of the
    BatchNormalization layer."""
    import keras
    import kfac_keras
    keras.utils.set_random_seed(1)
    layers = [keras.Input((6,), dtype="int32"), keras.layers.Embedding(10, 4, name="emb"),
              keras.layers.Reshape((6, 4, 1)),
              keras.layers.Conv2D(3, (3, 3), activation="tanh", name="conv")]
    if normalization is not None:
        layers.append(keras.layers.BatchNormalization(synchronized=normalization, name="bn"))
    layers += [keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax", name="out")]
    model = keras.Sequential(layers, name="net")
    optimizer = kfac_keras.KFAC(seed=3, cov_update_every=2, inv_update_every=4)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    return model, optimizer


def token_data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, size=(GLOBAL_BATCH * STEPS, 6)).astype("int32")
    return x, (x[:, 0] % 3).astype("int32")


def scenario_mirrored_layers():
    """Embedding + Conv2D under `fit` with MirroredStrategy(2 CPUs) equals one
    device. With BatchNormalization (synchronized=False) each replica
    normalizes its half of the batch by that half's statistics (Keras's
    rule), so the model differs from one device normalizing the whole batch:
    the test checks that it trains with identical trainable weights and
    K-FAC state on both replicas. `synchronized=True` is refused."""
    import kfac_keras
    import tensorflow as tf
    configure_logical_cpus(2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = token_data()

    def fit(model):
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[kfac_keras.KFACCallback(verbose=0)])

    model, optimizer = build_layers_model()
    fit(model)
    expected = state(model, optimizer)
    with strategy.scope():
        model, optimizer = build_layers_model()
        fit(model)
    kinds = sorted(b.kind for b in optimizer.registration.blocks)
    assert kinds == ["kronecker (conv, KFC)", "kronecker (dense)",
                     "kronecker (embedding, diagonal A)"], kinds
    assert_same_state(expected, state(model, optimizer), "layers/embedding_conv2d")

    with strategy.scope():
        model, optimizer = build_layers_model(normalization=False)
        fit(model)
    for variable in list(model.trainable_weights) + list(optimizer.variables):
        copies = [c.numpy() for c in variable.value.values]
        assert np.all(np.isfinite(copies[0])), variable.path
        assert np.array_equal(copies[0], copies[1]), f"replica copies differ: {variable.path}"
    assert int(optimizer.num_estimates.numpy()) > 0
    print("PASS layers/batchnorm_trains", flush=True)

    with strategy.scope():
        model, optimizer = build_layers_model(normalization=True)
        try:
            fit(model)
        except NotImplementedError as error:
            assert "synchronized=True" in str(error) and "'bn'" in str(error), str(error)
            assert optimizer.registration is None
            print("PASS layers/synchronized_batchnorm_refused", flush=True)
        else:
            raise AssertionError("BatchNormalization(synchronized=True): no NotImplementedError")


def scenario_mirrored_no_arguments():
    """`KFAC()` with no arguments (the orthogonal step rule at learning rate
    1e-2, Levenberg-Marquardt damping every 10 steps, statistics every 10 and
    decompositions every 20 steps, a random seed) under `fit` with
    MirroredStrategy(2 CPUs), 3 epochs of 8 steps: the logged loss is finite
    and falls, the rule ran (rho finite), the factors were estimated and
    decomposed (step 20), and both replicas hold identical weights and K-FAC
    state."""
    import keras
    import kfac_keras
    import tensorflow as tf
    configure_logical_cpus(2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = data()
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                                  keras.layers.Dense(3, activation="softmax")])
        optimizer = kfac_keras.KFAC()
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=3, shuffle=False, verbose=0,
                            callbacks=[kfac_keras.KFACCallback(verbose=0)])
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert np.isfinite(history.history["rho"][-1]), history.history
    assert int(optimizer.num_estimates.numpy()) == 3  # steps 0, 10, 20
    state(model, optimizer)  # asserts identical replica copies
    print("PASS no_arguments/fit", flush=True)


def scenario_mirrored_unsupported():
    """Options K-FAC cannot run with under 2 replicas raise
    NotImplementedError naming them, before any K-FAC state exists."""
    import keras
    import kfac_keras
    import tensorflow as tf
    configure_logical_cpus(2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = data()
    cases = {
        "jit_compile": ({}, "jit_compile", {"jit_compile": True}),
    }
    for label, (options, expected_word, step_kwargs) in cases.items():
        with strategy.scope():
            model, optimizer = build(options)
        try:
            kfac_keras.make_train_step(model, optimizer, **step_kwargs)
        except NotImplementedError as error:
            message = str(error)
            assert expected_word in message and "MirroredStrategy with 2 replicas" in message, message
            assert optimizer.registration is None
            print("PASS unsupported", label, flush=True)
        else:
            raise AssertionError(f"{label}: no NotImplementedError")
    with strategy.scope():
        model, optimizer = build({})
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(reduction="sum"))
        try:
            model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0,
                      callbacks=[kfac_keras.KFACCallback(verbose=0)])
        except NotImplementedError as error:
            assert "reduction='sum'" in str(error), str(error)
            assert optimizer.registration is None
            print("PASS unsupported fit", flush=True)
        else:
            raise AssertionError("fit with reduction='sum': no NotImplementedError")


def free_ports(count):
    """`count` free TCP ports on 127.0.0.1 (bound, read, released)."""
    import socket
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def worker_environment(ports, index):
    """Environment of worker `index` of a loopback MultiWorkerMirroredStrategy."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": index}}))


def save_state(path, values):
    np.savez(path, **{key.replace("/", "|"): value for key, value in values.items()})


def load_state(path):
    with np.load(path) as archive:
        return {key.replace("|", "/"): archive[key] for key in archive.files}


#: KFAC's defaults (Levenberg-Marquardt damping, KL clipping) with the seed
#: and update periods of `build`.
MULTIWORKER_OPTIONS = {"defaults": True}


def scenario_multiworker_worker(output_path):
    """One worker of a 2-worker MultiWorkerMirroredStrategy (TF_CONFIG set by
    the caller): the custom-loop step on the global batches (each worker
    feeds its replica's half), then save the state. (Keras 3 `fit` itself
    fails under MultiWorkerMirroredStrategy with any optimizer, when it
    reduces scalar logs: tensorflow/tensorflow#72388,
    keras-team/keras#20585.)"""
    import tensorflow as tf
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == 2
    x, y = data()
    model, optimizer = train_mirrored(strategy, MULTIWORKER_OPTIONS, "loop", loop_batches(x, y))
    save_state(output_path, state(model, optimizer))


def scenario_multiworker(directory, timeout):
    """Starts two loopback workers (bounded by `timeout` seconds), runs the
    single-process oracle meanwhile, and compares each worker's final state
    with it."""
    ports = free_ports(2)
    outputs = [os.path.join(directory, f"worker{index}.npz") for index in range(2)]
    workers = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "multiworker_worker", json.dumps(path)],
        env=worker_environment(ports, index), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for index, path in enumerate(outputs)]
    try:
        x, y = data()
        expected = state(*train_single(MULTIWORKER_OPTIONS, "loop", loop_batches(x, y)))
        for index, worker in enumerate(workers):
            log, _ = worker.communicate(timeout=HANG_GUARD_FACTOR * timeout)
            assert worker.returncode == 0, f"worker {index}:\n{log[-5000:]}"
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for index, path in enumerate(outputs):
        assert_same_state(expected, load_state(path), f"multiworker/worker{index}")


RESUME_EPOCHS = 3


def scenario_mirrored_resume_worker(backup_dir, output_path, kill_after_steps):
    """`fit` under MirroredStrategy(2 CPUs) with `BackupAndRestore` (saved at
    each epoch end) and KFACCallback; with `kill_after_steps` > 0 the process
    SIGKILLs itself after that many steps, else it trains to the end and
    saves the state."""
    import signal

    import keras
    import kfac_keras
    import tensorflow as tf
    configure_logical_cpus(2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    class KillAfter(keras.callbacks.Callback):
        def __init__(self, steps):
            super().__init__()
            self.steps, self.seen = steps, 0

        def on_train_batch_end(self, batch, logs=None):
            self.seen += 1
            if self.seen == self.steps:
                print("KILLING", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    x, y = data()
    with strategy.scope():
        model, optimizer = build({})
        callbacks = [keras.callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False),
                     kfac_keras.KFACCallback(verbose=0)]
        if kill_after_steps:
            callbacks.append(KillAfter(kill_after_steps))
        history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=RESUME_EPOCHS,
                            shuffle=False, verbose=0, callbacks=callbacks)
    print("EPOCHS_TRAINED", len(history.history["loss"]), flush=True)
    save_state(output_path, state(model, optimizer))


def scenario_mirrored_resume(directory, kill_after_steps, timeout):
    """Kill-and-resume: a 2-replica `fit` is SIGKILLed mid-epoch after
    `kill_after_steps` steps, restarted (BackupAndRestore restores the last
    epoch-end backup), and must end with the state of an uninterrupted
    single-device `fit` on the same data order."""
    backup_dir = os.path.join(directory, "backup")
    output = os.path.join(directory, "resumed.npz")

    def run(kill):
        return subprocess.run(
            [sys.executable, os.path.abspath(__file__), "mirrored_resume_worker",
             json.dumps(backup_dir), json.dumps(output), json.dumps(kill)],
            capture_output=True, text=True, timeout=HANG_GUARD_FACTOR * timeout,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))

    killed = run(kill_after_steps)
    assert killed.returncode == -9 and "KILLING" in killed.stdout, (
        killed.returncode, killed.stdout[-2000:] + killed.stderr[-3000:])
    assert not os.path.exists(output)
    assert os.path.exists(os.path.join(backup_dir, "training_metadata.json"))
    print("PASS resume/killed", flush=True)
    resumed = run(0)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    # Killed in epoch `kill_after_steps // STEPS`; resumed from the backup
    # made at the end of the epoch before it.
    remaining = RESUME_EPOCHS - kill_after_steps // STEPS
    assert f"EPOCHS_TRAINED {remaining}" in resumed.stdout, resumed.stdout

    import kfac_keras
    model, optimizer = build({})
    x, y = data()
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=RESUME_EPOCHS, shuffle=False, verbose=0,
              callbacks=[kfac_keras.KFACCallback(verbose=0)])
    expected = state(model, optimizer)
    assert expected["optimizer/kfac/iteration"] == RESUME_EPOCHS * STEPS
    assert_same_state(expected, load_state(output), "resume/final_state")


RESUME_SAVE_EVERY = 4


def scenario_multiworker_resume_worker(directory, kill_after_steps):
    """One worker of a 2-worker MultiWorkerMirroredStrategy custom loop over
    `RESUME_EPOCHS` epochs, restoring the latest `tf.train.Checkpoint` of the
    chief (worker 0) if there is one and saving one every
    `RESUME_SAVE_EVERY` steps (the chief into `directory/chief`, the other
    worker into its own directory, as every worker must save). With
    `kill_after_steps` > 0 the worker SIGKILLs itself after that many steps of
    this run; at the end each worker saves its state to
    `directory/final<index>.npz`."""
    import signal

    import kfac_keras
    import tensorflow as tf
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    index = strategy.cluster_resolver.task_id
    with strategy.scope():
        model, optimizer = build({})
    step = kfac_keras.make_train_step(model, optimizer)

    @tf.function
    def distributed_step(x, y):
        return strategy.run(step, args=(x, y))

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    chief_directory = os.path.join(directory, "chief")
    latest = tf.train.latest_checkpoint(chief_directory)
    if latest is not None:
        checkpoint.restore(latest).assert_existing_objects_matched()
    manager = tf.train.CheckpointManager(
        checkpoint, chief_directory if index == 0 else os.path.join(directory, f"worker{index}"),
        max_to_keep=2)
    first = int(optimizer.iterations.numpy())
    print("STARTING_AT", first, flush=True)
    batches = loop_batches(*data())
    share = GLOBAL_BATCH // strategy.num_replicas_in_sync
    for number in range(first, RESUME_EPOCHS * STEPS):
        x, y = batches[number % STEPS]

        def replica_slice(context, x=x, y=y):
            start = context.replica_id_in_sync_group * share
            return x[start:start + share], y[start:start + share]

        distributed_step(*strategy.experimental_distribute_values_from_function(replica_slice))
        if (number + 1) % RESUME_SAVE_EVERY == 0:
            manager.save()
        if kill_after_steps and number + 1 - first == kill_after_steps:
            print("KILLING", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    save_state(os.path.join(directory, f"final{index}.npz"), state(model, optimizer))


def scenario_multiworker_resume(directory, kill_after_steps, timeout):
    """Kill-and-resume with 2 loopback workers: worker 1 SIGKILLs itself after
    `kill_after_steps` steps; the job (both workers) is then stopped and
    restarted, resumes from the chief's last checkpoint and must end with the
    state of an uninterrupted single-process run."""

    def start(kill, ports):
        return [subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "multiworker_resume_worker",
             json.dumps(directory), json.dumps(kill if index == 1 else 0)],
            env=worker_environment(ports, index), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) for index in range(2)]

    workers = start(kill_after_steps, free_ports(2))
    try:
        log, _ = workers[1].communicate(timeout=HANG_GUARD_FACTOR * timeout)
        assert workers[1].returncode == -9 and "KILLING" in log, (workers[1].returncode, log[-4000:])
    finally:
        for worker in workers:  # the job restarts: stop the surviving worker too
            if worker.poll() is None:
                worker.kill()
            worker.communicate()
    assert os.path.exists(os.path.join(directory, "chief", "checkpoint"))
    print("PASS multiworker_resume/killed", flush=True)

    workers = start(0, free_ports(2))
    try:
        logs = [worker.communicate(timeout=HANG_GUARD_FACTOR * timeout)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log[-5000:]
        resumed_at = RESUME_SAVE_EVERY * (kill_after_steps // RESUME_SAVE_EVERY)
        assert f"STARTING_AT {resumed_at}" in log, log[-3000:]

    x, y = data()
    expected = state(*train_single({}, "loop", loop_batches(x, y) * RESUME_EPOCHS))
    for index in range(2):
        assert_same_state(expected, load_state(os.path.join(directory, f"final{index}.npz")),
                          f"multiworker_resume/worker{index}")


if __name__ == "__main__":
    scenario = sys.argv[1]
    arguments = [json.loads(a) for a in sys.argv[2:]]
    globals()[f"scenario_{scenario}"](*arguments)
    print("ALL DONE", flush=True)
