"""`KFACCallback`: the one line that makes `model.fit` train with K-FAC."""

import keras
import tensorflow as tf
from absl import logging

from kfac_keras import custom_step as custom_step_lib
from kfac_keras import distributed
from kfac_keras import keras_internals
from kfac_keras import step_length
from kfac_keras.optimizer import KFAC
from kfac_keras.validation import is_schedule
from kfac_keras.training import KFACTrainStep

#: Log keys that hold counts (printed as integers in the progress bar).
COUNT_LOGS = ("kfac_skipped_steps",)


class LoggedCount(float):
    """A count in `fit`'s logs: a float, as Keras's logs hold, that formats as
    an integer (Keras's progress bar formats every value with `.4f`/`.4e`)."""

    def __format__(self, spec):
        return str(int(self))

    def __truediv__(self, other):  # the progress bar divides by a count of 1
        return LoggedCount(float(self) / other)


def _kfac_of(optimizer):
    """The KFAC inside `optimizer` (itself, or a LossScaleOptimizer's inner one)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer


def build_from_batch(model, data):
    """Builds an unbuilt `model` from a batch's shapes, as Keras does at its
    first step, outside any `tf.function` being traced (so its variables and
    K-FAC's are created once, eagerly)."""
    x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    specs = tf.nest.map_structure(
        lambda t: None if t is None else keras.KerasTensor(tuple(t.shape), t.dtype.name), x)
    with tf.init_scope():
        model(specs)


def is_built(model):
    """True if K-FAC can register `model` now: it is built, or (a model
    without `call`, like keras-io's VAE) all its sub-layers are."""
    sublayers = keras_internals.child_layers(model)
    return model.built or bool(sublayers) and all(layer.built for layer in sublayers)


class KFACCallback(keras.callbacks.Callback):
    """Connects a compiled model's `fit` to its `kfac_keras.KFAC` optimizer.

    At the start of `fit` it registers the model's layers with the optimizer
    (printing the registration report once when `verbose`), and swaps the
    model's train step for `KFACTrainStep`, which captures layer inputs and
    pre-activation gradients in the forward pass. At the end of `fit` it
    restores the model's own train step, so `evaluate`, `predict` and a later
    `fit` without the callback behave as usual (the latter raises the
    optimizer's "add KFACCallback" error).

    A model that defines its own `train_step` keeps it: the callback runs it
    with K-FAC capture on, and the model's `optimizer.apply_gradients`
    applies the K-FAC update with the empirical Fisher of the model's loss
    (`kfac_keras.custom_step`; `adaptive="auto"` then means None). An
    unbuilt model (e.g. `keras.Sequential([Dense, Dense])` without an
    `Input`) is built from the first batch's shapes, as Keras does, and
    registered then.

    `jit_compile`: the model's setting is honoured for the forward/backward
    pass and the update; factor decompositions always run outside XLA on CPU
    (XLA's CPU `eigh` is ~100x slower) and inside it on GPU. To do that the
    callback compiles those parts itself and runs Keras's outer step function
    without XLA during `fit` (a custom `train_step` runs without XLA).

    Mixed precision: under the `"mixed_float16"` policy `model.compile`
    wraps KFAC in a `keras.optimizers.LossScaleOptimizer`; the callback
    trains the wrapped KFAC and keeps the dynamic loss scaling
    (`KFACTrainStep`). Under a `tf.distribute` strategy with more than one
    replica (compile and fit inside `strategy.scope()`), the step all-reduces
    gradients every step and factor statistics every `cov_update_every`
    steps (`kfac_keras.distributed`) and runs without XLA.

    Output: the registration report is printed when `verbose=1`, `fit`'s
    own `verbose` is not 0 and Keras's interactive logging is on
    (`keras.config.disable_interactive_logging()` sends it to the absl log
    only, like Keras's own output); `kfac_skipped_steps` is shown as an
    integer.

    Learning-rate decay (`decay="cosine"`, off by default): K-FAC's default
    step has a fixed length (`0.2 * learning_rate` RMS per matrix), so at a
    constant rate a run ends on its gradient-noise floor. With `decay`, the
    callback multiplies the learning rate by a cosine from 1 at the first
    step to `final_fraction` at the last one of this `fit` (`epochs *
    steps`, which only `fit` knows; `kfac_keras.step_length`). The rate stays
    a plain variable: it is written before every batch (so TensorBoard's
    `learning_rate` is the rate used), a change by another callback
    (`ReduceLROnPlateau`) or by the user scales the rest of the curve, and at
    the end of `fit` it holds the user's rate again. The decay is announced
    at the start of `fit` (printed and logged), never applied silently. The
    step count starts at `initial_epoch * steps`, so a resumed `fit` continues
    the curve; with `steps_per_execution > 1` the rate is set once per
    execution (Keras calls batch hooks once per execution).

    Args:
        verbose: 0 or 1; with 1 (default) print the registration report the
            first time the model is registered, and the decay's announcement.
        decay: None (default: constant learning rate) or `"cosine"`. Needs a
            `fit` of known length (`steps_per_epoch` for a dataset of
            unknown size) and a learning rate that is a number, not a
            schedule (a schedule already says how the rate changes).
        final_fraction: float in [0, 1], the rate at the last step as a
            fraction of the user's. Defaults to 0.1. Only with `decay`.
    """

    def __init__(self, verbose=1, decay=None, final_fraction=None):
        super().__init__()
        if verbose not in (0, 1):
            raise ValueError(f"`verbose` must be 0 or 1; received {verbose!r}.")
        if decay is None and final_fraction is not None:
            raise ValueError("`final_fraction` sets the end of a learning-rate decay; pass "
                             "`decay=\"cosine\"` with it, or leave it unset.")
        if final_fraction is None:
            final_fraction = step_length.DEFAULT_FINAL_FRACTION
        step_length.check_decay(decay, final_fraction)
        self.verbose = verbose
        self.decay = decay
        self.final_fraction = final_fraction
        self._decay = None
        self._epoch = 0
        self._requested_jit = None
        self._users_instance_step = None
        self._first_time = False

    def _print_report(self, report):
        """Prints the registration report unless `fit` or Keras logging is quiet
        (the optimizer logs it to absl in any case)."""
        if not (self.verbose and self._first_time):
            return
        if self.params and self.params.get("verbose", 1) == 0:
            return
        if keras.config.is_interactive_logging_enabled():
            print(report)

    def _kfac_step(self, model):
        step = KFACTrainStep(
            model, model.optimizer,
            jit_compile=(self._requested_jit and not model.run_eagerly
                         and distributed.multi_replica_strategy(model) is None))
        self._print_report(step.registration.report())
        return step

    def _custom_step(self, model, user_train_step):
        step = custom_step_lib.CustomTrainStep(model, model.optimizer, user_train_step)
        if self._requested_jit:
            logging.info("K-FAC: %s runs without XLA (its decompositions must "
                         "stay outside XLA on CPU).", step.name)
        self._print_report(step.report())
        return step.train_step

    def _build_then_step(self, make_step):
        """A train step for an unbuilt model: the first call (Keras traces it
        at the first batch) builds the model from the batch's shapes and
        registers it; every call runs the step `make_step()` returns."""
        steps = []

        def train_step(data):
            if not steps:
                build_from_batch(self.model, data)
                with tf.init_scope():
                    steps.append(make_step())
            return steps[0](data)

        return train_step

    def on_train_begin(self, logs=None):
        model = self.model
        optimizer = _kfac_of(getattr(model, "optimizer", None))
        if not isinstance(optimizer, KFAC):
            raise TypeError(
                "KFACCallback needs a model compiled with "
                "`optimizer=kfac_keras.KFAC(...)`; this model's optimizer is "
                f"{type(optimizer).__name__}.")
        decay = self._make_decay(optimizer) if self.decay is not None else None
        self._first_time = optimizer.registration is None
        self._requested_jit = bool(model.jit_compile)
        self._users_instance_step = model.__dict__.get("train_step")
        if custom_step_lib.has_custom_train_step(model):
            custom_step_lib.CustomTrainStep.check_supported(model, model.optimizer)
            user_train_step = model.train_step
            make_step = lambda: self._custom_step(model, user_train_step)  # noqa: E731
        else:
            make_step = lambda: self._kfac_step(model).keras_train_step  # noqa: E731
        if is_built(model):
            model.train_step = make_step()
        else:
            model.train_step = self._build_then_step(make_step)
        model.jit_compile = False
        model.make_train_function(force=True)
        self._decay = decay
        if decay is not None:
            self._announce(
                f"K-FAC: KFACCallback(decay={self.decay!r}) sets the learning rate before every "
                f"step: {decay.base:.4g} at the first step down to {self.final_fraction:g} x that "
                f"at step {decay.total_steps} ({self.params['epochs']} epochs x "
                f"{decay.steps_per_epoch} steps); it is {decay.base:.4g} again after fit.")

    def _make_decay(self, optimizer):
        """The run-length decay of this `fit`; raises before any state changes
        when the run's length or the learning rate does not allow one."""
        params = self.params or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        if not epochs or not steps:
            raise ValueError(
                f"KFACCallback(decay={self.decay!r}) needs the run's length, but this fit's "
                f"steps per epoch are unknown (params: epochs={epochs!r}, steps={steps!r}): "
                "pass `steps_per_epoch` to fit, or use decay=None with a learning-rate "
                "schedule of your own.")
        if is_schedule(optimizer.learning_rate) or is_schedule(
                getattr(optimizer, "_learning_rate", None)):
            raise ValueError(
                f"KFACCallback(decay={self.decay!r}) scales a learning rate that is a number, "
                "but this optimizer's is a schedule, which already says how the rate changes; "
                "pass one or the other.")
        return step_length.RunLengthDecay(
            keras_internals.learning_rate_variable(optimizer), epochs * steps, steps,
            self.final_fraction)

    def _announce(self, message):
        """Logs `message` and prints it unless `fit` or Keras logging is quiet."""
        logging.warning(message)
        if self.verbose and (not self.params or self.params.get("verbose", 1) != 0) \
                and keras.config.is_interactive_logging_enabled():
            print(message)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self._decay is not None:
            self._decay.before_step(self._epoch, batch)

    def _count_logs_as_integers(self, logs):
        if logs:
            for key in COUNT_LOGS:
                if key in logs:
                    logs[key] = LoggedCount(logs[key])

    def on_train_batch_end(self, batch, logs=None):
        self._count_logs_as_integers(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._count_logs_as_integers(logs)

    def on_train_end(self, logs=None):
        if self._decay is not None:
            self._decay.restore()
            self._decay = None
        model = self.model
        model.__dict__.pop("train_step", None)
        if self._users_instance_step is not None:
            model.train_step = self._users_instance_step
        if self._requested_jit is not None:
            model.jit_compile = self._requested_jit
        model.train_function = None


#: The names `model.compile(optimizer=...)` resolves to `KFAC` (with defaults).
OPTIMIZER_NAMES = ("kfac", "KFAC")


def register_optimizer_names():
    """Lets `model.compile(optimizer="kfac")` resolve to `KFAC()`, as Keras's
    own names ("adam") do: Keras looks a string optimizer up as a class name,
    in its global custom objects among other places; this adds `KFAC` there
    under `OPTIMIZER_NAMES` through the public `keras.saving.get_custom_objects`."""
    custom_objects = keras.saving.get_custom_objects()
    for name in OPTIMIZER_NAMES:
        custom_objects.setdefault(name, KFAC)
