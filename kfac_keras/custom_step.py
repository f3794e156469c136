"""K-FAC inside a model's own `train_step` (`KFACCallback` runs it).

A Keras model that overrides `train_step` (keras-io's VAE: reconstruction
plus KL, its own metrics) computes its loss and gradients itself and calls
`self.optimizer.apply_gradients(...)`. `KFACCallback` keeps that step and
runs it with K-FAC capture on:

1. every registered layer passes the tensor its block differentiates against
   (the pre-activation `s` of a Dense or Conv layer, the output of an
   Embedding or normalization layer) through an identity whose gradient
   records what flows back into it. When the user's own tape differentiates
   the user's loss `L`, each such record receives `dL/ds`;
2. `apply_gradients` (`KFAC.apply`) then folds these gradients into the
   factors, decomposes when due and applies the preconditioned update, with
   the same non-finite guards as the K-FAC step.

This is the *empirical* Fisher of the user's objective (the user's targets,
not targets sampled from the model: K-FAC cannot know what the user's loss is
the negative log-likelihood of), logged and shown in the registration
report. Scale: the loss is taken to be a mean over the batch (Keras's
convention), `L = (1/B) sum_n l_n`, so `B * dL/ds_n = dl_n/ds_n` is example
`n`'s own gradient and `G = (1/B) sum_n (dl_n/ds_n)(dl_n/ds_n)^T`, the dense
empirical Fisher's factor. Diagonal blocks use the gradients passed to
`apply_gradients` the same way: `B * grad` is the gradient of the summed loss,
whose square over `B` is their estimate, as for the sampled objective of the
K-FAC step.

Limits, raised before any state changes: the adaptive options need the batch
loss after the step, which only the user's step could compute (the default
`adaptive="auto"` turns into None here, logged; explicit options raise);
multi-replica strategies and mixed precision (a `LossScaleOptimizer`) are not
supported with a custom `train_step`; `apply_gradients` must be called once
per step, after one gradient computation through the model.
"""

import keras
import tensorflow as tf
from absl import logging

from kfac_keras import capture
from kfac_keras import distributed
from kfac_keras import guards
from kfac_keras.blocks.base import StatisticsSource

#: The note in the registration report and the logs of a custom train step.
EMPIRICAL_NOTE = (
    "The model has its own `train_step`: K-FAC runs it and estimates the "
    "EMPIRICAL Fisher of its loss (gradients of the user's loss w.r.t. the "
    "captured pre-activations, the loss taken as a batch mean), not the true "
    "Fisher with sampled targets.")


def has_custom_train_step(model):
    """True if `model` (its class or the instance) overrides Keras's `train_step`."""
    if model.__dict__.get("train_step") is not None:
        return True
    for cls in type(model).__mro__:
        if "train_step" in cls.__dict__:
            return not cls.__module__.startswith("keras.")
    return False


def _record_incoming_gradient(tensor, sink):
    """`tensor` through an identity whose gradient appends what it receives
    to the list `sink` (at trace time in a `tf.function`, eagerly otherwise)."""

    @tf.custom_gradient
    def identity(value):
        def backward(upstream):
            sink.append(upstream)
            return upstream

        return tf.identity(value), backward

    return identity(tensor)


class GradientRecorder(capture.Recorder):
    """A capture recorder that also collects, per record, the gradients that
    flow back into the recorded tensor (one list per call of a layer)."""

    def __init__(self):
        super().__init__()
        self.incoming = {}

    def watch(self, layer, tensor):
        sink = []
        self.incoming.setdefault(id(layer), []).append(sink)
        return _record_incoming_gradient(tensor, sink)

    def gradients_for(self, layer):
        """Per call of `layer`: the list of gradients its record received."""
        return self.incoming.get(id(layer), [])


class CustomTrainStep:
    """Runs a model's own `train_step` with K-FAC capture on.

    `train_step` replaces the model's step during `fit`; the user's
    `optimizer.apply_gradients` call inside it reaches `apply` (through
    `KFAC.apply`), which updates the curvature from the captured gradients
    and applies the K-FAC update.

    Args:
        model: the Keras model; its registered layers must be built.
        optimizer: the `kfac_keras.KFAC` the model was compiled with.
        user_train_step: the model's own bound `train_step`.

    Raises:
        NotImplementedError: under a multi-replica strategy or with a
            `LossScaleOptimizer` (mixed precision).
        ValueError: with explicit `adaptive` options, which need the batch
            loss after the step.
    """

    def __init__(self, model, optimizer, user_train_step):
        self.check_supported(model, optimizer)
        name = f"{type(model).__name__}.train_step"
        if optimizer.adaptive is not None:  # "auto" (check_supported refused the rest)
            logging.info(
                "K-FAC: %s is the model's own step, so adaptive='auto' resolves "
                "to None (fixed damping %s; the Levenberg-Marquardt rule needs "
                "the batch loss after the step).", name, optimizer.initial_damping)
            optimizer.use_fixed_damping()
        self.model = model
        self.optimizer = optimizer
        self.user_train_step = user_train_step
        self.name = name
        self.registration = optimizer.attach(model)
        self._step = None  # per-step state, set in `train_step`
        logging.info("K-FAC: %s", EMPIRICAL_NOTE)

    @staticmethod
    def check_supported(model, optimizer):
        """Raises, naming the model's `train_step`, for what a custom step
        cannot run with (see the class docstring); changes nothing."""
        from kfac_keras.optimizer import KFAC

        name = f"{type(model).__name__}.train_step"
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise NotImplementedError(
                f"The model has its own `train_step` ({name}); K-FAC runs it "
                "with capture on, but not with a LossScaleOptimizer (mixed "
                "precision), whose loss scale would reach the captured "
                "gradients. Train in float32, or use Keras's default "
                "train_step (compile with a loss) with KFACCallback.")
        if not isinstance(optimizer, KFAC):
            raise TypeError(f"{name} needs a kfac_keras.KFAC optimizer; received "
                            f"{type(optimizer).__name__}.")
        if distributed.multi_replica_strategy(model) is not None:
            raise NotImplementedError(
                f"The model has its own `train_step` ({name}); K-FAC cannot run "
                "a custom train_step under a multi-replica tf.distribute "
                "strategy. Use Keras's default train_step (compile with a "
                "loss) with KFACCallback, or train on one replica.")
        if optimizer.estimation_mode == "curvature_propagation":
            raise ValueError(
                f"The model has its own `train_step` ({name}): K-FAC then estimates "
                "the empirical Fisher of the user's loss from its gradients, so "
                "estimation_mode='curvature_propagation' (which needs a known loss's "
                "output Fisher) cannot apply. Leave estimation_mode at its default, "
                "or use Keras's default train_step with a compiled loss.")
        if optimizer.adaptive is not None:
            if optimizer.requested_adaptive != "auto":
                raise ValueError(
                    f"The model has its own `train_step` ({name}): KFAC(adaptive="
                    f"{optimizer.adaptive!r}) needs the batch loss after the step "
                    "and exact Fisher products of a known loss, which a custom "
                    "train_step does not give K-FAC. Pass adaptive=None (the "
                    "learning rate, momentum and norm_constraint still apply), "
                    "or use Keras's default train_step with a compiled loss.")

    def report(self):
        """The registration report with the custom-step note."""
        return self.registration.report() + "\n  note: " + EMPIRICAL_NOTE

    def train_step(self, data):
        """The model's `train_step`, run with K-FAC capture on; returns its
        logs plus `kfac_skipped_steps` and `KFAC.logged_values()`."""
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        first_input = next(i for i in tf.nest.flatten(x) if i is not None)
        recorder = GradientRecorder()
        state = _StepState(
            recorder, tf.shape(first_input)[0],
            guards.read_values(self.model.non_trainable_variables))
        self._step = state
        self.optimizer.active_custom_step = self
        try:
            with self.registration.capture(recorder):
                logs = self.user_train_step(data)
        finally:
            self.optimizer.active_custom_step = None
            self._step = None
        if not state.applied:
            raise RuntimeError(
                f"{self.name} did not call `self.optimizer.apply_gradients(...)`"
                " while K-FAC was capturing; K-FAC needs it called once per "
                "step with the gradients of the step's loss.")
        logs = dict(logs or {})
        logs["kfac_skipped_steps"] = tf.convert_to_tensor(self.optimizer.skipped_steps)
        for key, value in self.optimizer.logged_values().items():
            logs[key if key not in logs else "kfac_" + key] = value
        return logs

    # ------------------------------------------------------------ the update
    def _captures(self, block, state):
        """`(inputs, per-example gradients, row weights)` of a capture block's
        calls: `B * dL/ds` (see the module docstring) on the statistics
        subset; the row weights are the rows' Keras masks (or None)."""
        captures = []
        for layer in block.capture_layers():
            records = state.recorder.for_layer(layer)
            incoming = state.recorder.gradients_for(layer)
            reached = [sink for sink in incoming if sink]
            masks = state.recorder.masks_for(layer)  # Keras masks: masked rows weigh 0
            for (inputs, source), sink, mask in zip(records, incoming, masks):
                if len(sink) > 1:
                    raise RuntimeError(
                        f"{self.name} differentiated through layer {layer.name!r} "
                        f"{len(sink)} times before apply_gradients; K-FAC "
                        "needs one gradient computation of the step's loss.")
                if not sink and reached:
                    continue  # a call whose output does not reach the loss
                grad = sink[0] if sink else tf.zeros_like(source)
                scale = tf.cast(state.batch_size, grad.dtype)
                weight = capture.row_weights(None, mask)
                captures.append((inputs[:state.subset], scale * grad[:state.subset],
                                 None if weight is None else weight[:state.subset]))
        return captures

    def _block_inputs(self, grads, variables, state):
        by_variable = {id(v): g for g, v in zip(grads, variables) if g is not None}
        block_inputs = []
        for block in self.registration.blocks:
            source = block.statistics_source
            if source is StatisticsSource.CAPTURES:
                block_inputs.append((self._captures(block, state), None))
            elif source is StatisticsSource.SAMPLED_GRADIENTS:
                scale = tf.cast(state.batch_size, tf.float32)
                sums = [scale * tf.cast(tf.convert_to_tensor(by_variable[id(v)]), tf.float32)
                        if id(v) in by_variable else tf.zeros(v.shape, tf.float32)
                        for v in block.variables]
                block_inputs.append((None, sums))
            else:
                block_inputs.append((None, None))
        return block_inputs

    def apply(self, grads, variables):
        """`KFAC.apply` inside the custom step: statistics from the captured
        gradients, decompositions when due, then the guarded update."""
        state = self._step
        if state is None:
            raise RuntimeError("CustomTrainStep.apply runs only inside its train_step.")
        if state.applied:
            raise RuntimeError(
                f"{self.name} called apply_gradients twice in one step; K-FAC "
                "supports one update per step.")
        state.applied = True
        optimizer = self.optimizer
        optimizer.begin_step()
        batch = tf.cast(state.batch_size, tf.float32)
        state.subset = tf.clip_by_value(
            tf.cast(tf.math.ceil(optimizer.statistics_fraction * batch), tf.int32),
            1, state.batch_size)

        decompose_first = optimizer.curvature.decomposes_before_scalings()

        def update_statistics():
            optimizer.update_curvature(self._block_inputs(grads, variables, state),
                                       tf.cast(state.subset, tf.float32), decompose_first)
            return tf.constant(True)

        present = [g for g in grads if g is not None]
        batch_ok = guards.all_finite(present)
        updated, ok = guards.guarded_statistics_update(
            optimizer, optimizer.curvature_pass_due(), batch_ok, update_statistics)
        guards.restore_if_skipped(ok, self.model.non_trainable_variables,
                                  state.frozen_values)
        guards.run_if(ok, lambda: optimizer.maybe_update_inverses(updated, decompose_first))
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        guards.guarded_apply(
            optimizer, self.model.trainable_variables, ok,
            lambda: optimizer.apply_step([g for g, _ in pairs], [v for _, v in pairs]))
        return optimizer.iterations


class _StepState:
    """What one run of the custom step collects: the recorder, the batch size,
    the non-trainable values to put back after a skipped step, and whether
    `apply_gradients` ran."""

    def __init__(self, recorder, batch_size, frozen_values):
        self.recorder = recorder
        self.batch_size = batch_size
        self.frozen_values = frozen_values
        self.subset = batch_size
        self.applied = False
