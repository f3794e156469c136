"""Non-finite guard (issue 7, item 1).

A batch whose loss, gradients or statistics are NaN/Inf skips the step and
leaves every variable as it was; the run then continues exactly as if the
batch had never been seen. The oracle is an independent run on the same data
without the bad batch (bitwise comparison), plus NumPy for the factors
rebuilt after a corrupted state. A failed decomposition keeps the previous
inverses and raises the damping.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from conftest import block_for_layer
from kfac_keras import guards

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
    out = keras.layers.Dense(3, name="out")(h)
    return keras.Model(inputs, out)


def _batches(count, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(size, 4)).astype("float32"),
             rng.integers(0, 3, size=size)) for _ in range(count)]


def _options(**overrides):
    options = dict(learning_rate=0.05, momentum=0.5, damping=0.01,
                   cov_update_every=1, inv_update_every=1, seed=3)
    options.update(overrides)
    return options


def _state(model, optimizer):
    """Every model and optimizer variable except the skipped-step counter."""
    skip = id(optimizer.skipped_steps)
    values = [v.numpy().copy() for v in model.variables]
    values += [v.numpy().copy() for v in optimizer.variables if id(v) != skip]
    return values


def _assert_same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def _make_step(model, optimizer, mode):
    if mode == "jit":
        return kfac_keras.make_train_step(model, optimizer, LOSS, jit_compile=True)
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    return tf.function(step) if mode == "function" else step


def _corrupt(x, kind):
    x = x.copy()
    if kind == "nan_input":  # NaN loss and gradients
        x[3, 1] = np.nan
    elif kind == "inf_input":
        x[0, 0] = np.inf
    elif kind == "huge_input":  # finite loss and gradients, Inf statistics
        x[3] = 1e20
    else:
        raise ValueError(kind)
    return x


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
@pytest.mark.parametrize("kind", ["nan_input", "huge_input"])
def test_bad_batch_is_skipped_and_run_continues_as_if_unseen(mode, kind):
    good = _batches(3)
    bad_x = _corrupt(good[0][0], kind)
    if kind == "huge_input":
        # Precondition: only the statistics are non-finite, so the test
        # exercises the statistics guard, not the batch guard.
        probe = _model()
        with tf.GradientTape() as tape:
            loss = LOSS(good[0][1], probe(bad_x))
        grads = tape.gradient(loss, probe.trainable_variables)
        assert np.isfinite(loss.numpy()) and all(np.isfinite(g.numpy()).all() for g in grads)
        assert not np.isfinite(bad_x.T @ bad_x).all()

    model = _model()
    optimizer = kfac_keras.KFAC(**_options())
    step = _make_step(model, optimizer, mode)
    step(*good[0])
    step(*good[1])
    before = _state(model, optimizer)
    logs = step(bad_x, good[0][1])
    assert int(logs["kfac_skipped_steps"]) == 1
    assert int(optimizer.skipped_steps.numpy()) == 1
    _assert_same(before, _state(model, optimizer))  # factors not poisoned
    step(*good[2])

    reference_model = _model()
    reference = kfac_keras.KFAC(**_options())
    reference_step = _make_step(reference_model, reference, mode)
    for batch in good:
        reference_step(*batch)
    _assert_same(_state(reference_model, reference), _state(model, optimizer))
    assert int(reference.skipped_steps.numpy()) == 0
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


def test_inf_input_with_other_schedule_is_skipped():
    """Statistics every 2 steps, inverses every 3, bad batches at a step with
    and at a step without statistics: skipped steps do not advance the
    schedule, so the run still equals the one without them."""
    good = _batches(5, seed=4)
    options = _options(cov_update_every=2, inv_update_every=3)
    model = _model()
    optimizer = kfac_keras.KFAC(**options)
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    for index, batch in enumerate(good):
        if index in (1, 2):
            step(_corrupt(batch[0], "inf_input"), batch[1])
        step(*batch)
    reference_model = _model()
    reference = kfac_keras.KFAC(**options)
    reference_step = kfac_keras.make_train_step(reference_model, reference, LOSS)
    for batch in good:
        reference_step(*batch)
    _assert_same(_state(reference_model, reference), _state(model, optimizer))
    assert int(optimizer.iterations.numpy()) == len(good)
    assert int(optimizer.skipped_steps.numpy()) == 2


def test_fit_skips_bad_batch_logs_counter_and_keeps_training():
    good = _batches(4, seed=7)
    bad = (_corrupt(good[0][0], "nan_input"), good[0][1])
    with_bad = [good[0], good[1], bad, good[2], good[3]]

    def fit(batches, callbacks=()):
        model = _model()
        model.compile(optimizer=kfac_keras.KFAC(**_options()), loss=LOSS)
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                            callbacks=[kfac_keras.KFACCallback(verbose=0), *callbacks])
        return model, history

    model, history = fit(with_bad, [keras.callbacks.TerminateOnNaN()])
    # Two epochs, one bad batch in each; TerminateOnNaN did not stop the run.
    assert history.history["kfac_skipped_steps"] == [1, 2]
    assert len(history.history["loss"]) == 2
    assert np.isfinite(history.history["loss"]).all()
    reference, reference_history = fit(good)
    _assert_same(_state(reference, reference.optimizer), _state(model, model.optimizer))
    # The logged loss is the mean over the applied batches only.
    np.testing.assert_allclose(history.history["loss"], reference_history.history["loss"],
                               rtol=1e-6)


def test_skipped_batch_restores_batchnorm_moving_statistics():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(5, name="hidden")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    out = keras.layers.Dense(3, name="out")(keras.layers.Activation("tanh")(h))
    model = keras.Model(inputs, out)
    # Statistics only at step 0: the bad step 1 is caught by the batch check.
    optimizer = kfac_keras.KFAC(**_options(cov_update_every=1000, inv_update_every=1000))
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    x, y = _batches(1)[0]
    step(x, y)
    bn = model.get_layer("bn")
    moving = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    before = _state(model, optimizer)
    step(_corrupt(x, "nan_input"), y)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), moving[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), moving[1])
    _assert_same(before, _state(model, optimizer))


def _inverse_variables(block):
    names = ("input_factor_inverse", "output_grad_factor_inverse", "input_eigenvalues",
             "input_eigenvectors", "output_grad_eigenvalues", "output_grad_eigenvectors")
    return [getattr(block, n) for n in names if hasattr(block, n)]


@pytest.mark.parametrize("method", ["cholesky", "inverse", "eigh"])
@pytest.mark.parametrize("jit", [False, True])
def test_nan_factor_keeps_previous_inverses_and_raises_damping(method, jit):
    model = _model()
    optimizer = kfac_keras.KFAC(**_options(inverse_method=method,
                                           decomposition_jit_compile=jit))
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    x, y = _batches(1)[0]
    step(x, y)
    hidden = block_for_layer(optimizer, model.get_layer("hidden"))
    out = block_for_layer(optimizer, model.get_layer("out"))
    previous = [v.numpy().copy() for v in _inverse_variables(hidden)]
    # Poison one factor of `hidden`; give `out` a new, finite factor.
    poisoned = hidden.input_factor.numpy()
    poisoned[1, 2] = poisoned[2, 1] = np.nan
    hidden.input_factor.assign(poisoned)
    new_a = np.diag(np.arange(1.0, 7.0)).astype("float32")
    out.input_factor.assign(new_a)
    damping = float(optimizer.damping.numpy())

    optimizer.update_inverses()

    for variable, value in zip(_inverse_variables(hidden), previous):
        np.testing.assert_array_equal(variable.numpy(), value)
    np.testing.assert_allclose(float(optimizer.damping.numpy()),
                               damping * guards.DAMPING_INCREASE_ON_FAILURE, rtol=1e-6)
    # The healthy block was decomposed with the old damping (NumPy oracle).
    g = out.output_grad_factor.numpy().astype(np.float64)
    a = new_a.astype(np.float64)
    if method == "eigh":
        np.testing.assert_allclose(np.sort(out.input_eigenvalues.numpy()),
                                   np.arange(1.0, 7.0), rtol=1e-6)
    else:
        pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
        expected = np.linalg.inv(a + pi * np.sqrt(damping) * np.eye(len(a)))
        np.testing.assert_allclose(out.input_factor_inverse.numpy(), expected,
                                   rtol=1e-4, atol=1e-7)


def test_failed_cholesky_keeps_previous_inverses_and_raises_damping():
    """A finite factor that is not positive semi-definite: Cholesky gives NaN."""
    model = _model()
    optimizer = kfac_keras.KFAC(**_options(inverse_method="cholesky"))
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    step(*_batches(1)[0])
    hidden = block_for_layer(optimizer, model.get_layer("hidden"))
    previous = [v.numpy().copy() for v in _inverse_variables(hidden)]
    hidden.input_factor.assign(-10.0 * np.eye(5, dtype="float32"))
    # Precondition: this decomposition does fail.
    assert not np.isfinite(tf.linalg.cholesky(
        tf.constant(-9.0 * np.eye(5), tf.float32)).numpy()).all()
    damping = float(optimizer.damping.numpy())
    tf.function(optimizer.update_inverses)()
    for variable, value in zip(_inverse_variables(hidden), previous):
        np.testing.assert_array_equal(variable.numpy(), value)
    assert float(optimizer.damping.numpy()) == pytest.approx(10 * damping, rel=1e-6)


def test_damping_raise_is_capped_and_never_lowers():
    assert float(guards.raised_damping(1e-3)) == pytest.approx(1e-2)
    assert float(guards.raised_damping(0.5 * guards.MAX_GUARD_DAMPING)) == pytest.approx(
        guards.MAX_GUARD_DAMPING)
    assert float(guards.raised_damping(1e7)) == pytest.approx(1e7)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_training_recovers_from_a_corrupted_factor(mode):
    """NaN in the state (from outside the step) restarts the statistics: the
    next statistics update replaces every factor by the fresh estimate."""
    model = _model()
    optimizer = kfac_keras.KFAC(**_options())
    step = _make_step(model, optimizer, mode)
    batches = _batches(3)
    step(*batches[0])
    step(*batches[1])
    hidden = block_for_layer(optimizer, model.get_layer("hidden"))
    poisoned = hidden.input_factor.numpy()
    poisoned[0, 0] = np.nan
    hidden.input_factor.assign(poisoned)
    x, y = batches[2]
    step(x, y)
    assert int(optimizer.skipped_steps.numpy()) == 0
    abar = np.concatenate([x, np.ones((len(x), 1))], axis=1).astype(np.float64)
    np.testing.assert_allclose(hidden.input_factor.numpy(), abar.T @ abar / len(x),
                               rtol=1e-5, atol=1e-6)
    assert float(optimizer.num_estimates.numpy()) == 1.0
    for variable in optimizer.variables + model.variables:
        assert np.isfinite(variable.numpy()).all(), variable.path
    # The inverses were recomputed from the fresh factor (early decomposition).
    a = hidden.input_factor.numpy().astype(np.float64)
    g = hidden.output_grad_factor.numpy().astype(np.float64)
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    damping = float(optimizer.damping.numpy())
    np.testing.assert_allclose(
        hidden.input_factor_inverse.numpy(),
        np.linalg.inv(a + pi * np.sqrt(damping) * np.eye(len(a))), rtol=1e-3, atol=1e-5)


def test_overflowing_update_is_undone():
    """Finite inputs and state, but the step overflows float32: every variable
    the update writes keeps its value, and the step counts as skipped."""
    model = _model()
    optimizer = kfac_keras.KFAC(**_options(cov_update_every=1000, inv_update_every=1000))
    step = kfac_keras.make_train_step(model, optimizer, LOSS)
    batches = _batches(2)
    step(*batches[0])
    hidden = block_for_layer(optimizer, model.get_layer("hidden"))
    hidden.input_factor_inverse.assign(1e30 * np.eye(5, dtype="float32"))
    hidden.output_grad_factor_inverse.assign(1e30 * np.eye(5, dtype="float32"))
    before = _state(model, optimizer)
    step(*batches[1])
    assert int(optimizer.skipped_steps.numpy()) == 1
    _assert_same(before, _state(model, optimizer))
    assert int(optimizer.iterations.numpy()) == 1


def test_normal_training_skips_nothing():
    model = _model()
    optimizer = kfac_keras.KFAC(**_options())
    step = tf.function(kfac_keras.make_train_step(model, optimizer, LOSS))
    first = [v.numpy().copy() for v in model.trainable_variables]
    for batch in _batches(4):
        logs = step(*batch)
    assert int(logs["kfac_skipped_steps"]) == 0
    assert int(optimizer.iterations.numpy()) == 4
    assert not np.array_equal(first[0], model.trainable_variables[0].numpy())


def test_batch_check_sees_loss_and_every_gradient():
    finite = [tf.ones((2, 2)), None, tf.zeros(3)]
    assert bool(guards.batch_is_finite(tf.constant(1.0), finite))
    assert not bool(guards.batch_is_finite(tf.constant(np.nan), finite))
    assert not bool(guards.batch_is_finite(tf.constant(1.0), finite + [tf.constant([np.inf])]))
    # Integer tensors (step counters) are ignored, not rejected.
    assert bool(guards.all_finite([tf.constant(3, tf.int64), tf.constant(1.0)]))


def test_epoch_with_every_batch_skipped_logs_nan_loss():
    """An epoch whose batches were all skipped has no loss: History shows NaN
    (not the 0.0 of an empty mean), and the counter says why."""
    good = _batches(2, seed=5)
    bad = [(_corrupt(x, "nan_input"), y) for x, y in good]
    model = _model()
    model.compile(optimizer=kfac_keras.KFAC(**_options()), loss=LOSS)
    x = np.concatenate([b[0] for b in bad])
    y = np.concatenate([b[1] for b in bad])
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                        callbacks=[kfac_keras.KFACCallback(verbose=0)])
    assert history.history["kfac_skipped_steps"] == [2]
    assert np.isnan(history.history["loss"][0])
