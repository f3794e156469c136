"""Non-finite guards: one bad batch or one failed decomposition must not end a run.

The training step (`kfac_keras.training.KFACTrainStep`) and the optimizer call
these helpers; everything here runs inside the step as graph ops (`tf.cond`,
variable reads and assignments), with no host round trip, in eager mode, in a
`tf.function` and under XLA alike.

What is guarded, and what happens:

* **The batch** (`batch_is_finite`): if the loss or any gradient is NaN or
  Inf, the step is *skipped*: no statistics update, no decomposition, no
  weight update, the step counter (`optimizer.iterations`) does not advance,
  the model's non-trainable variables (e.g. BatchNormalization moving
  statistics updated by the forward pass) are put back, and
  `optimizer.skipped_steps` is incremented. The next batch runs the same
  step number as if the bad batch had never been seen.
* **The statistics** (`guarded_statistics_update`): the K-FAC statistics
  state (every block's state variables and `num_estimates`) is read before
  the update; if any of it is non-finite afterwards, the old values are
  assigned back and the step is skipped as above. If the state was already
  non-finite *before* the update (it can only get there from outside the
  step: a corrupted checkpoint, or a test that injects NaN), the statistics
  restart: non-finite entries are zeroed and `num_estimates` is reset to 0,
  so the update replaces every factor by the fresh estimate.
* **The decompositions** (`guarded_update_inverses`): a block whose state is
  non-finite is not decomposed (TensorFlow's CPU `eigh` raises on NaN input),
  and a block whose decomposition comes out non-finite (a Cholesky factor of
  a matrix that is not numerically positive definite is NaN) keeps its
  previous decomposition. Either way the damping variable is multiplied by
  `DAMPING_INCREASE_ON_FAILURE` (at most up to `MAX_GUARD_DAMPING`), so the
  next decomposition is better conditioned.
* **The update** (`guarded_apply`): the weights and the optimizer variables
  the update writes (momentum, step counter, ...) are read before the update;
  if any of them is non-finite afterwards (for example a learning rate so
  large that the step overflows float32), they are all assigned back and the
  step counts as skipped. Statistics committed earlier in the same step (they
  were finite) are kept.

Cost: finiteness checks are reductions over the tensors involved; the
statistics state is checked every `cov_update_every` steps, the weights and
momentum every step (`O(parameters)`, small next to preconditioning). The
values read before an update are not copied unless the update writes the
variable (TensorFlow copies on write while an older read is alive).
"""

import math
import numbers
import re

import keras
import numpy as np
import tensorflow as tf

#: Factor by which the damping grows after a failed decomposition.
DAMPING_INCREASE_ON_FAILURE = 10.0
#: The guard never raises the damping above this (it never lowers it either).
MAX_GUARD_DAMPING = 1e6

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


# ------------------------------------------------------------------ checks
def _float_tensors(values):
    tensors = []
    for value in values:
        if value is None:
            continue
        tensor = tf.convert_to_tensor(value)
        if tensor.dtype.is_floating or tensor.dtype.is_complex:
            tensors.append(tensor)
    return tensors


def all_finite(values):
    """A scalar bool tensor: every entry of every floating tensor is finite.

    Args:
        values: tensors or variables; None entries and non-floating tensors
            (integer counters) are ignored.

    Returns:
        A scalar bool tensor (True for an empty list).
    """
    checks = [tf.reduce_all(tf.math.is_finite(t)) for t in _float_tensors(values)]
    if not checks:
        return tf.constant(True)
    if len(checks) == 1:
        return checks[0]
    return tf.reduce_all(tf.stack(checks))


def batch_is_finite(loss, grads):
    """True (scalar bool tensor) if the loss and every gradient are finite."""
    return all_finite([loss] + list(grads))


# --------------------------------------------------------------- snapshots
def _read(variables):
    """Current values of `variables`, read now (ordered before later writes)."""
    return [tf.identity(tf.convert_to_tensor(v)) for v in variables]


def _assign(variables, values):
    for variable, value in zip(variables, values):
        variable.assign(value)


def _unique(variables):
    seen, result = set(), []
    for variable in variables:
        if id(variable) not in seen:
            seen.add(id(variable))
            result.append(variable)
    return result


def block_state_variables(optimizer):
    """Every registered block's state variables (factors, inverses, ...)."""
    registration = optimizer.registration
    if registration is None:
        return []
    state = []
    for block in registration.blocks:
        state.extend(block.state_variables())
    return _unique(state)


def statistics_state_variables(optimizer):
    """The state a statistics update may change: block state and `num_estimates`."""
    return block_state_variables(optimizer) + [optimizer.num_estimates]


def update_state_variables(optimizer, model_variables):
    """Variables a weight update may write: the weights and every optimizer
    variable except the blocks' state and the skipped-step counter."""
    excluded = {id(v) for v in block_state_variables(optimizer)}
    excluded.add(id(optimizer.skipped_steps))
    own = [v for v in optimizer.variables if id(v) not in excluded]
    return _unique(list(model_variables) + own)


# ----------------------------------------------------------------- guards
def _restart_statistics(optimizer, state):
    """Zeroes non-finite entries of the statistics state; restarts the EMA."""
    for variable in state:
        value = tf.convert_to_tensor(variable)
        if value.dtype.is_floating:
            variable.assign(tf.where(tf.math.is_finite(value), value,
                                     tf.zeros_like(value)))
    optimizer.num_estimates.assign(tf.zeros_like(optimizer.num_estimates))
    return tf.constant(True)


def guarded_statistics_update(optimizer, due, batch_ok, update_fn):
    """Runs `update_fn` (a statistics update) with the non-finite guard.

    Args:
        optimizer: the `KFAC` optimizer (attached).
        due: scalar bool tensor, statistics are scheduled this step.
        batch_ok: scalar bool tensor, the batch's loss and gradients are finite.
        update_fn: callable with no arguments that updates the statistics.

    Returns:
        `(updated, ok)`: scalar bool tensors; `updated` is True if new
        statistics were committed, `ok` is False if the step must be skipped
        (bad batch, or statistics that came out non-finite and were undone).
    """
    state = statistics_state_variables(optimizer)

    def update():
        healthy = all_finite(state)
        tf.cond(healthy, lambda: tf.constant(True),
                lambda: _restart_statistics(optimizer, state))
        before = _read(state)
        update_fn()
        finite = all_finite(state)

        def undo():
            _assign(state, before)
            return tf.constant(True)

        tf.cond(finite, lambda: tf.constant(True), undo)
        return finite

    updated = tf.cond(tf.logical_and(due, batch_ok), update, lambda: tf.constant(False))
    ok = tf.logical_and(batch_ok, tf.logical_or(updated, tf.logical_not(due)))
    return updated, ok


def restore_if_skipped(ok, variables, values):
    """Assigns `values` back to `variables` unless `ok` (scalar bool tensor)."""
    if not variables:
        return tf.constant(True)

    def undo():
        _assign(variables, values)
        return tf.constant(True)

    return tf.cond(ok, lambda: tf.constant(True), undo)


def read_values(variables):
    """Reads `variables` now, for `restore_if_skipped`."""
    return _read(variables)


def run_if(ok, fn):
    """Runs `fn` (returning a scalar bool tensor) only if `ok`; else False."""
    return tf.cond(ok, fn, lambda: tf.constant(False))


def _guarded_block_inverses(block, damping):
    state = list(block.state_variables())
    if not state:
        block.update_inverses(damping)
        return tf.constant(True)
    before = _read(state)

    def decompose():
        block.update_inverses(damping)
        return all_finite(state)

    succeeded = tf.cond(all_finite(before), decompose, lambda: tf.constant(False))

    def keep_previous():
        _assign(state, before)
        return tf.constant(True)

    tf.cond(succeeded, lambda: tf.constant(True), keep_previous)
    return succeeded


def raised_damping(damping):
    """The damping after a failed decomposition: `x10`, capped, never lowered."""
    damping = tf.convert_to_tensor(damping)
    raised = tf.minimum(damping * DAMPING_INCREASE_ON_FAILURE,
                        tf.cast(MAX_GUARD_DAMPING, damping.dtype))
    return tf.maximum(damping, raised)


def guarded_update_inverses(optimizer, damping):
    """Decomposes every block; a failed block keeps its previous decomposition.

    Args:
        optimizer: the attached `KFAC` optimizer.
        damping: the total damping the decompositions use.

    Returns:
        A scalar bool tensor, True if every block was decomposed. When one
        failed, `optimizer.damping` was raised (see `raised_damping`).
    """
    succeeded = all_true(decompose_blocks(optimizer.registration.blocks, damping))
    raise_damping_unless(optimizer, succeeded)
    return succeeded


def decompose_blocks(blocks, damping):
    """Decomposes `blocks` (a failed block keeps its previous decomposition);
    returns one scalar bool tensor per block, True if it was decomposed."""
    return [_guarded_block_inverses(block, damping) for block in blocks]


def all_true(flags):
    """Scalar bool tensor: every flag in the list is True (True if empty)."""
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)


def raise_damping_unless(optimizer, succeeded):
    """Applies `raised_damping` to `optimizer.damping` unless `succeeded`."""
    current = tf.convert_to_tensor(optimizer.damping)
    optimizer.damping.assign(tf.where(succeeded, current, raised_damping(current)))


def guarded_apply(optimizer, model_variables, ok, apply_fn):
    """Runs the weight update `apply_fn` if `ok`, and undoes it if it overflows.

    Args:
        optimizer: the attached `KFAC` optimizer.
        model_variables: the model's trainable variables.
        ok: scalar bool tensor, the step's inputs and statistics were finite.
        apply_fn: callable with no arguments that applies the update.

    Returns:
        A scalar bool tensor, True if the update was applied. Otherwise
        `optimizer.skipped_steps` was incremented and every variable the
        update may write holds its value from before the step.
    """
    watched = update_state_variables(optimizer, model_variables)
    before = _read(watched)

    def update():
        apply_fn()
        return all_finite(watched)

    applied = tf.cond(ok, update, lambda: tf.constant(False))

    def undo():
        _assign(watched, before)
        return tf.constant(True)

    tf.cond(tf.logical_and(ok, tf.logical_not(applied)), undo, lambda: tf.constant(True))
    optimizer.skipped_steps.assign_add(
        tf.cast(tf.logical_not(applied), optimizer.skipped_steps.dtype))
    return applied


# ------------------------------------------------------- argument checking
#: Keyword arguments of `keras.optimizers.Optimizer` that KFAC passes through.
BASE_OPTIMIZER_ARGUMENTS = (
    "weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
    "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
    "gradient_accumulation_steps",
)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_float32_number(name, value):
    """Raises ValueError if a valid Python number does not fit float32.

    K-FAC keeps its hyperparameters in float32 (variables and constants in
    the step): a value that overflows to Inf, or a positive value that
    underflows to 0, would silently change meaning.
    """
    if not _is_number(value) or not math.isfinite(value):
        return value
    magnitude = abs(float(value))
    if magnitude > _FLOAT32_MAX or (0.0 < magnitude < _FLOAT32_TINY):
        raise ValueError(
            f"`{name}` must be representable in float32 (magnitude 0 or in "
            f"[{_FLOAT32_TINY:g}, {_FLOAT32_MAX:g}]); received {value!r}.")
    return value


def check_base_optimizer_arguments(kwargs):
    """Checks the keyword arguments KFAC passes to the Keras base optimizer.

    Keras accepts, for example, a negative `clipnorm` or a string
    `weight_decay` at construction and fails (or misbehaves) at the first
    step; K-FAC rejects them here, naming the argument, the value and what is
    allowed.

    Args:
        kwargs: the `**kwargs` given to `KFAC`.

    Raises:
        TypeError / ValueError: naming the first bad argument.
    """
    unknown = sorted(set(kwargs) - set(BASE_OPTIMIZER_ARGUMENTS))
    if unknown:
        given = ", ".join(f"{name}={kwargs[name]!r}" for name in unknown)
        raise TypeError(
            f"KFAC got unexpected keyword argument(s) {given}; the base "
            f"optimizer arguments it accepts are {list(BASE_OPTIMIZER_ARGUMENTS)}.")

    def number(name, low, low_open, high=None, high_open=False, integer=False,
               allow_none=True):
        value = kwargs.get(name)
        if value is None and allow_none:
            return
        kind = "an integer" if integer else "a number"
        if not _is_number(value) or (integer and not isinstance(value, numbers.Integral)):
            raise TypeError(
                f"`{name}` must be {kind}" + (" or None" if allow_none else "")
                + f"; received {value!r} of type {type(value).__name__}.")
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be finite; received {value!r}.")
        bad_low = value <= low if low_open else value < low
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high:
            interval = (("(" if low_open else "[") + f"{low!r}, "
                        + ("inf" if high is None else repr(high))
                        + (")" if high_open or high is None else "]"))
            raise ValueError(f"`{name}` must be in {interval}; received {value!r}.")
        if not integer:
            check_float32_number(name, value)
        elif value > 2**31 - 1:
            raise ValueError(
                f"`{name}` must be at most {2**31 - 1}; received {value!r}.")

    number("weight_decay", 0.0, False)
    number("clipnorm", 0.0, True)
    number("clipvalue", 0.0, True)
    number("global_clipnorm", 0.0, True)
    number("loss_scale_factor", 0.0, True)
    if "ema_momentum" in kwargs:
        number("ema_momentum", 0.0, False, 1.0, False, allow_none=False)
    number("ema_overwrite_frequency", 1, False, integer=True)
    number("gradient_accumulation_steps", 0, False, integer=True)
    if "use_ema" in kwargs and not isinstance(kwargs["use_ema"], bool):
        raise TypeError(
            f"`use_ema` must be a bool; received {kwargs['use_ema']!r} of type "
            f"{type(kwargs['use_ema']).__name__}.")
    clips = [n for n in ("clipnorm", "clipvalue", "global_clipnorm")
             if kwargs.get(n) is not None]
    if len(clips) > 1:
        raise ValueError(
            f"Only one of `clipnorm`, `clipvalue` and `global_clipnorm` may be "
            f"set; received {', '.join(f'{n}={kwargs[n]!r}' for n in clips)}.")


_VALID_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.>-]*$")


def check_name(name):
    """The optimizer name must be usable as a TensorFlow name scope.

    TensorFlow rejects other names only when it builds the first graph (deep
    inside the first training step), so they are rejected here.
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a string; received {name!r} of type "
                        f"{type(name).__name__}.")
    if not _VALID_NAME.match(name):
        raise ValueError(
            "`name` must be a TensorFlow scope name: an ASCII letter, digit or "
            "'.', then letters, digits or any of '_.>-' (no spaces or '/'); "
            f"received {name!r}.")
    return name


def is_keras_schedule(value):
    """True for a `keras.optimizers.schedules.LearningRateSchedule`."""
    return isinstance(value, keras.optimizers.schedules.LearningRateSchedule)
