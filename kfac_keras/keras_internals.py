"""Every private Keras internal the package touches, behind a named function.

Tested with Keras 3.15 and TensorFlow 2.21 (the versions CI runs). Keras
does not promise these names: a Keras upgrade that moves or renames one
should need changes in this file only. Each function says what it reads
and why the public API does not do.

Two private hooks are overridden rather than called, because Keras calls
them on the optimizer: `KFAC._backend_update_step` and
`KFAC._apply_weight_decay` (base versions in
`keras/src/backend/tensorflow/optimizer.py`) only forward to
`backend_update_step` and `apply_weight_decay` below.
"""

import keras
import tensorflow as tf


# ------------------------------------------------------------- optimizers
def optimizer_trainable_variables(optimizer):
    """The variables `optimizer` was built for (`Optimizer._trainable_variables`;
    public `Optimizer.variables` lists the optimizer's own state instead)."""
    return optimizer._trainable_variables


def optimizer_slot(optimizer, slots, variable):
    """`slots[i]` for the slot list of `add_optimizer_variables` and the
    model variable `variable` (through `Optimizer._get_variable_index`)."""
    return slots[optimizer._get_variable_index(variable)]


def current_learning_rate(optimizer):
    """The learning rate of this step, a schedule evaluated at the iteration
    (`Optimizer._get_current_learning_rate`)."""
    return optimizer._get_current_learning_rate()


def learning_rate_variable(optimizer):
    """The variable behind `optimizer.learning_rate`, or the
    `LearningRateSchedule` when it is one (`Optimizer._learning_rate`; the
    public getter evaluates a schedule, the public setter would replace it
    instead of assigning)."""
    return optimizer._learning_rate


def clip_gradients(optimizer, grads):
    """Keras's `clipnorm`/`clipvalue`/`global_clipnorm` on `grads`
    (`Optimizer._clip_gradients`)."""
    return optimizer._clip_gradients(grads)


def backend_update_step(optimizer_class, optimizer, grads, variables, learning_rate):
    """`Optimizer._backend_update_step` for `optimizer_class`, which overrides it.

    Under a multi-replica strategy K-FAC applies the update in cross-replica
    context (`kfac_keras.distributed`), with gradients already summed over
    replicas, where Keras's version would look for a replica context to
    `merge_call` from; there the update goes straight to
    `Optimizer._distributed_tf_update_step`. Elsewhere Keras's own version
    (the class above `optimizer_class` in the MRO) runs.
    """
    if not tf.distribute.in_cross_replica_context():
        return super(optimizer_class, optimizer)._backend_update_step(
            grads, variables, learning_rate)
    pairs = [(g, v.value if isinstance(v, keras.Variable) else v)
             for g, v in zip(grads, variables)]
    return optimizer._distributed_tf_update_step(
        optimizer._distribution_strategy, pairs, learning_rate)


def apply_weight_decay(optimizer_class, optimizer, variables):
    """`Optimizer._apply_weight_decay` for `optimizer_class`, which overrides
    it: Keras's decoupled weight decay, also in cross-replica context (see
    `backend_update_step`), honouring `exclude_from_weight_decay`
    (`Optimizer._use_weight_decay`)."""
    if optimizer.weight_decay is None or not tf.distribute.in_cross_replica_context():
        return super(optimizer_class, optimizer)._apply_weight_decay(variables)
    for variable in variables:
        if optimizer._use_weight_decay(variable):
            learning_rate = tf.cast(optimizer.learning_rate, variable.dtype)
            weight_decay = tf.cast(optimizer.weight_decay, variable.dtype)
            variable.assign_sub(variable * weight_decay * learning_rate)


# ------------------------------------------------------------------ layers
def child_layers(layer, include_self=False, recursive=True):
    """Sub-layers of `layer` in Keras's tracking order
    (`Layer._flatten_layers`; public `Model.layers` is not recursive and
    does not exist on plain layers)."""
    return list(layer._flatten_layers(include_self=include_self, recursive=recursive))


def own_trainable_variables(layer):
    """The trainable variables created by `layer` itself, not by its
    sub-layers (`Layer._trainable_variables`)."""
    return list(layer._trainable_variables)


def name_scope_stack():
    """Keras's global name-scope stack, a list (private global state in
    `keras.src.backend.common.global_state`)."""
    from keras.src.backend.common import global_state

    return global_state.get_global_attribute(
        "name_scope_stack", default=[], set_to_default=True)


# ------------------------------------------------------------ losses, fit
def compute_loss(model, x, y, y_pred, sample_weight):
    """The compiled loss plus the model's added losses, in training mode
    (`Model._compute_loss`, what Keras's own train step calls; public
    `compute_loss` may be overridden by the user for other purposes)."""
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                               training=True)


def scale_loss_for_distribution(value):
    """Divides a loss by the number of replicas in sync, as Keras does with
    the losses it computes (`keras.src.losses.loss`)."""
    from keras.src.losses import loss as keras_loss_module

    return keras_loss_module.scale_loss_for_distribution(value)


def unscale_loss_for_distribution(value):
    """Inverse of `scale_loss_for_distribution`."""
    from keras.src.losses import loss as keras_loss_module

    return keras_loss_module.unscale_loss_for_distribution(value)


def loss_tracker(model):
    """The `Mean` metric behind the `loss` entry of `fit`'s logs
    (`Model._loss_tracker`)."""
    return model._loss_tracker


def multi_output_loss(losses, model):
    """Keras's own loss over several outputs (`CompileLoss`, what `compile`
    builds from a list or dict of losses)."""
    from keras.src.trainers.compile_utils import CompileLoss

    return CompileLoss(losses, None, output_names=getattr(model, "output_names", None))


def loss_function_options(loss):
    """The keyword arguments a `keras.losses.LossFunctionWrapper` passes to
    its function (`from_logits`, `axis`, ...; `_fn_kwargs`)."""
    return dict(loss._fn_kwargs)

