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

import tensorflow as tf

#: Factor by which the damping grows after a failed decomposition.
DAMPING_INCREASE_ON_FAILURE = 10.0
#: The guard never raises the damping above this (it never lowers it either).
MAX_GUARD_DAMPING = 1e6


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


def guarded_update_inverses(blocks, damping_variable, damping):
    """Decomposes every block; a failed block keeps its previous decomposition.

    Args:
        blocks: the registered blocks.
        damping_variable: the optimizer's damping variable (`lambda`), raised
            when a block fails (see `raised_damping`).
        damping: the total damping the decompositions use.

    Returns:
        A scalar bool tensor, True if every block was decomposed.
    """
    succeeded = all_true(decompose_blocks(blocks, damping))
    raise_damping_unless(damping_variable, succeeded)
    return succeeded


def decompose_blocks(blocks, damping):
    """Decomposes `blocks` (a failed block keeps its previous decomposition);
    returns one scalar bool tensor per block, True if it was decomposed."""
    return [_guarded_block_inverses(block, damping) for block in blocks]


def all_true(flags):
    """Scalar bool tensor: every flag in the list is True (True if empty)."""
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)


def raise_damping_unless(damping_variable, succeeded):
    """Applies `raised_damping` to `damping_variable` unless `succeeded`."""
    current = tf.convert_to_tensor(damping_variable)
    damping_variable.assign(tf.where(succeeded, current, raised_damping(current)))


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
