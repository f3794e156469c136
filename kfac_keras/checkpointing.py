"""Restoring K-FAC state that is created after Keras loads the optimizer.

The problem. Keras saves an optimizer as the list of its variables, by
creation index (`save_own_variables`: `store["0"]`, `store["1"]`, ...), and
loads it the same way. `keras.models.load_model` (and `model.load_weights`,
and `keras.callbacks.BackupAndRestore`) build the optimizer from the model's
trainable variables and then load it. But a KFAC optimizer creates most of
its state (every block's factors, inverses, eigenbases, ...) in
`KFAC.attach(model)`, which runs later, at the start of `fit`
(`KFACCallback`) or in `make_train_step`, because choosing the blocks needs
the model. Keras's base loader sees more saved variables than existing ones
and skips the whole optimizer with a warning.

The design. Variables are created in a fixed order: `KFAC.build` first
(iteration, learning rate, momentum slots, damping, counters: the same for a
given model and config), then `attach`, block by block in registration order
(the same for the same model and options). So a saved list is always "the
variables of `build`, then those of `attach`", and:

* `load_optimizer_variables` (called by `KFAC.load_own_variables`) assigns
  the saved values of the variables that exist now (checking shapes) and, if
  the optimizer is not attached yet, keeps the rest in memory;
* `restore_pending` (called at the end of `KFAC.attach`, once the blocks have
  created their variables) checks that the count and every shape match and
  assigns the kept values, so the first step after loading already uses the
  saved factors, inverses, counters and momentum;
* `save_optimizer_variables` (`KFAC.save_own_variables`) saves the kept
  values too, so a model loaded and saved again before training keeps its
  K-FAC state.

A mismatch (the model or the options that choose blocks differ from the
saved run) raises a `ValueError` that says so, rather than silently starting
from fresh curvature. `tf.train.Checkpoint` needs none of this: it tracks the
optimizer's variable list by index and restores variables created after
`restore()` as they are appended (deferred restoration). One caveat there:
values TensorFlow still holds for deferred restoration are not written by a
new `Checkpoint.save` before they are restored, so attach the optimizer
(`make_train_step`, or start `fit`) before saving a restored checkpoint again.

Mixed precision: `model.compile` wraps KFAC in Keras's `LossScaleOptimizer`.
Keras saves the wrapped KFAC as a child object, so its state goes through
the functions here and is restored; but Keras's `LossScaleOptimizer` itself
skips loading its own variables (dynamic loss scale and its counter) when
the saved count differs from the current one, which it does before attach,
so those two restart from their initial values.
"""

import warnings

import numpy as np


class PendingState:
    """Saved optimizer values waiting for `attach` to create their variables.

    Args:
        values: every saved value, in saving order (NumPy arrays).
        assigned: how many leading values were already assigned at load.
    """

    def __init__(self, values, assigned):
        self.values = list(values)
        self.assigned = int(assigned)


def _shape(value):
    return tuple(int(d) for d in np.shape(value))


def _check_shapes(optimizer, variables, values, start):
    for offset, (variable, value) in enumerate(zip(variables, values)):
        if tuple(variable.shape) != _shape(value):
            raise ValueError(
                f"Cannot restore optimizer {optimizer.name!r}: saved variable "
                f"#{start + offset} has shape {_shape(value)}, but "
                f"{variable.path} has shape {tuple(variable.shape)}. The model "
                "or the K-FAC options that choose blocks (layer_blocks, "
                "exclude_layers, inverse_method) differ from the saved run.")


def _assign(variables, values):
    for variable, value in zip(variables, values):
        variable.assign(np.asarray(value).astype(variable.dtype))


def load_optimizer_variables(optimizer, store):
    """Loads a Keras variable store into a KFAC optimizer (see module doc).

    Args:
        optimizer: the `KFAC` optimizer.
        store: the dict-like store Keras passes to `load_own_variables`,
            holding `store[str(i)]` for each saved variable `i`.

    Raises:
        ValueError: if the saved state does not fit this optimizer.
    """
    count = len(list(store.keys()))
    values = [np.array(store[str(i)]) for i in range(count)]
    current = list(optimizer.variables)
    attached = optimizer.registration is not None
    optimizer._kfac_pending_state = None
    if count == len(current):
        _check_shapes(optimizer, current, values, 0)
        _assign(current, values)
        return
    if count > len(current) and not attached:
        _check_shapes(optimizer, current, values[:len(current)], 0)
        _assign(current, values[:len(current)])
        optimizer._kfac_pending_state = PendingState(values, len(current))
        return
    if count < len(current):
        # Saved before the optimizer was ever attached (no K-FAC state yet):
        # restore what was saved; the blocks start from their initial state.
        _check_shapes(optimizer, current[:count], values, 0)
        _assign(current[:count], values)
        warnings.warn(
            f"Optimizer {optimizer.name!r}: the saved state has {count} "
            f"variables and this optimizer {len(current)}; the saved "
            "optimizer had not trained yet (it was saved before its first "
            "K-FAC step), so the saved values were restored and the rest "
            "(K-FAC blocks, momentum) start from scratch.",
            stacklevel=3)
        return
    raise ValueError(
        f"Cannot restore optimizer {optimizer.name!r}: the saved state has "
        f"{count} variables but this optimizer, already attached to a model, "
        f"has {len(current)}. The model or the K-FAC options that choose "
        "blocks (layer_blocks, exclude_layers, inverse_method) differ from "
        "the saved run.")


def save_optimizer_variables(optimizer, store):
    """Saves a KFAC optimizer into a Keras variable store, by index.

    Like Keras's own `save_own_variables`, plus: if the optimizer was loaded
    but not attached yet, the K-FAC values still waiting for `attach` are
    saved after the existing variables, so loading and saving again before
    training loses nothing.

    Args:
        optimizer: the `KFAC` optimizer.
        store: the dict-like store Keras passes to `save_own_variables`.
    """
    values = [variable.numpy() for variable in optimizer.variables]
    pending = getattr(optimizer, "_kfac_pending_state", None)
    if pending is not None and optimizer.registration is None:
        values += pending.values[len(values):]
    for index, value in enumerate(values):
        store[str(index)] = value


def restore_pending(optimizer):
    """Assigns values kept by `load_optimizer_variables` once `attach` made
    the variables. A no-op when nothing is pending.

    Raises:
        ValueError: if the registration created a different number or shape
            of variables than were saved.
    """
    pending = getattr(optimizer, "_kfac_pending_state", None)
    if pending is None:
        return
    optimizer._kfac_pending_state = None
    current = list(optimizer.variables)
    if len(current) != len(pending.values):
        raise ValueError(
            f"Cannot restore optimizer {optimizer.name!r}: the saved state has "
            f"{len(pending.values)} variables, but attaching it to this model "
            f"created {len(current)}. The model or the K-FAC options that "
            "choose blocks (layer_blocks, exclude_layers, inverse_method) "
            "differ from the saved run.")
    start = pending.assigned
    _check_shapes(optimizer, current[start:], pending.values[start:], start)
    _assign(current[start:], pending.values[start:])
