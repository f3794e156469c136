"""A learning-rate decay over `fit`'s run length, applied by `KFACCallback`.

K-FAC's default step (`step_rule="orthogonal"`) has a fixed length: its RMS
entry is `0.2 * learning_rate` per matrix whatever the gradient's noise, so
at a constant learning rate a run ends on a noise floor instead of
converging (tools/step_efficiency/RESULTS.md, section S5-schedule). A decay
needs the run's length, which only `fit` knows (`params["epochs"]` and
`params["steps"]`); `KFACCallback(decay="cosine")` uses it.

The decay keeps `optimizer.learning_rate` a plain variable that the user
and other callbacks may set: before every batch the callback writes
`base * factor(step)` into it, where `base` is the user's learning rate. If
the variable holds something other than what the callback wrote last (a
`ReduceLROnPlateau`, or `optimizer.learning_rate = x` in a callback), that
change is taken as a change of `base` by the same ratio, so a reduction by
0.5 halves the rest of the decayed curve. At the end of `fit` the variable
holds `base` again, so a later `fit` starts its decay from the user's value.
"""

import math

import numpy as np
from absl import logging

#: `KFACCallback(decay=...)` values: None (constant learning rate) or a kind.
DECAY_KINDS = ("cosine",)
#: What `KFACCallback(final_fraction=...)` defaults to: the learning rate at
#: the last step is 0.1 of the user's (as measured, RESULTS.md S5-schedule).
DEFAULT_FINAL_FRACTION = 0.1


def cosine_factor(step, total_steps, final_fraction=DEFAULT_FINAL_FRACTION):
    """The cosine decay's multiplier of the learning rate at `step`.

    `final_fraction + (1 - final_fraction) * (1 + cos(pi * step / total_steps)) / 2`,
    with `step` clipped to `[0, total_steps]`: 1 at step 0, `final_fraction`
    from the last step on (Keras's `CosineDecay` with `alpha=final_fraction`).

    Args:
        step: int, the 0-based index of the step about to be taken.
        total_steps: int > 0, the steps of the run.
        final_fraction: float in [0, 1], the multiplier at `total_steps`.
            Defaults to `DEFAULT_FINAL_FRACTION` (0.1).

    Returns:
        A Python float.
    """
    progress = min(max(step, 0), total_steps) / total_steps
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_decay(decay, final_fraction):
    """Raises ValueError unless `decay`/`final_fraction` are supported values.

    Args:
        decay: None or one of `DECAY_KINDS`.
        final_fraction: float in [0, 1].
    """
    if decay is not None and decay not in DECAY_KINDS:
        raise ValueError(f"`decay` must be None or one of {DECAY_KINDS}; received {decay!r}.")
    if isinstance(final_fraction, bool) or not isinstance(final_fraction, (int, float)) \
            or not 0.0 <= final_fraction <= 1.0:
        raise ValueError("`final_fraction` must be a number in [0, 1] (the learning rate's "
                         f"multiplier at the last step); received {final_fraction!r}.")


class RunLengthDecay:
    """Writes `base * cosine_factor(step)` into a learning-rate variable before every step.

    Args:
        variable: the optimizer's learning-rate variable (a Keras variable
            with `assign` and `numpy`), not a schedule.
        total_steps: int > 0, `epochs * steps per epoch` of the `fit`.
        steps_per_epoch: int > 0, `fit`'s steps per epoch.
        final_fraction: float in [0, 1], the multiplier at the last step.
            Defaults to `DEFAULT_FINAL_FRACTION`.
    """

    def __init__(self, variable, total_steps, steps_per_epoch,
                 final_fraction=DEFAULT_FINAL_FRACTION):
        self.variable = variable
        self.total_steps = int(total_steps)
        self.steps_per_epoch = int(steps_per_epoch)
        self.final_fraction = float(final_fraction)
        self.base = float(variable.numpy())
        self._written = None  # the float32 value written last, to notice others' writes
        self._factor = 1.0

    def before_step(self, epoch, batch):
        """Sets the variable for step `epoch * steps_per_epoch + batch`.

        Args:
            epoch: int, 0-based epoch index (as `fit` counts, from
                `initial_epoch`).
            batch: int, 0-based batch index within the epoch.

        Returns:
            The learning rate written (a Python float).
        """
        current = float(self.variable.numpy())
        if self._written is not None and current != self._written:
            # Someone else (ReduceLROnPlateau, the user) set the rate: keep
            # their ratio for the rest of the run.
            self.base = current / self._written * self.base if self._written else current
            logging.info("K-FAC: learning rate set to %.4g outside the decay; its base is now "
                         "%.4g.", current, self.base)
        self._factor = cosine_factor(epoch * self.steps_per_epoch + batch, self.total_steps,
                                     self.final_fraction)
        value = self.base * self._factor
        self.variable.assign(value)
        self._written = float(np.float32(value))
        return value

    def restore(self):
        """Writes `base` back (end of `fit`), folding in a change made after the last step."""
        current = float(self.variable.numpy())
        if self._written is not None and current != self._written:
            self.base = current / self._written * self.base if self._written else current
        self.variable.assign(self.base)
        self._written = None
        return self.base
