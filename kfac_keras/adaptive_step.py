"""The adaptive parts of a K-FAC step and the values each step logs.

`KFAC.apply_step` preconditions the gradient and applies the update; this
module runs what `KFAC(adaptive=...)` adds around that update (Martens &
Grosse 2015, sections 6.5 and 7): the quadratic model's step size and
momentum before it, the predicted change of a learning-rate step, and the
Levenberg-Marquardt damping rule after it, on the same batch. The maths are
the pure functions of `kfac_keras.step_rules`; the Fisher products and the
loss re-evaluation come from the batch (`kfac_keras.quadratic_model`, or
`kfac_keras.distributed.ReplicaBatches` under a multi-replica strategy).
This module assigns their results to the optimizer's variables and to the
per-step diagnostics.

Imports: keras_internals, step_rules; never the optimizer.
"""

import collections

import tensorflow as tf

from kfac_keras import keras_internals
from kfac_keras import step_rules


class StepDiagnostics:
    """Per-step values for the logs (`KFAC.logged_values`). Plain TensorFlow
    variables, deliberately not optimizer variables: they are not part of
    checkpoints, and may hold NaN (`rho` when undefined) without tripping
    the non-finite guards, which watch the optimizer's variables."""

    def __init__(self):
        self.update_norm = tf.Variable(0.0, trainable=False, name="kfac_update_norm")
        self.rho = tf.Variable(float("nan"), trainable=False, name="kfac_rho")
        self.qmodel_change = tf.Variable(0.0, trainable=False, name="kfac_qmodel_change")
        self.step_size = tf.Variable(0.0, trainable=False, name="kfac_step_size")
        #: The fraction of the orthogonalised matrices whose step the Newton
        #: bound shortened (`kfac_keras.orthogonal_step`), last step.
        self.orthogonal_bound = tf.Variable(0.0, trainable=False, name="kfac_orthogonal_bound")

    def logged_values(self, optimizer):
        """The dict `KFAC.logged_values` returns (which lists its entries).

        Args:
            optimizer: the `KFAC` optimizer these diagnostics belong to.
        """
        values = {"damping": tf.convert_to_tensor(optimizer.damping),
                  "update_norm": tf.convert_to_tensor(self.update_norm)}
        if not optimizer.uses_quadratic_model_step:
            values["step_size"] = tf.convert_to_tensor(self.step_size)
        if getattr(optimizer.options, "orthogonal_step_bound", None) is not None:
            values["orthogonal_bound"] = tf.convert_to_tensor(self.orthogonal_bound)
        if optimizer.adapts_damping:
            values["rho"] = tf.convert_to_tensor(self.rho)
        if optimizer.adaptive is not None:
            values["qmodel_change"] = tf.convert_to_tensor(self.qmodel_change)
        if optimizer.uses_quadratic_model_step:
            values["alpha"] = tf.cast(optimizer.learning_rate, tf.float32)
            values["mu"] = tf.convert_to_tensor(optimizer.step_momentum)
        return values


#: What `AdaptiveStep.before_update` leaves for `after_update`: `due`, the
#: damping rule runs this step (a bool tensor, read before the update advances
#: the step counter; None without the rule), and `change`, the undamped
#: model's predicted change of the step (a float tensor, 0 on steps the rule
#: skips; None without `adaptive` options).
Prediction = collections.namedtuple("Prediction", ["due", "change"])


class AdaptiveStep:
    """The quadratic-model step and the Levenberg-Marquardt damping of one
    `KFAC` optimizer (`KFAC(adaptive=...)`).

    Args:
        optimizer: the built `KFAC` optimizer; its options, damping,
            learning-rate and momentum variables are read and assigned.
        diagnostics: the optimizer's `StepDiagnostics`, where `rho` and the
            predicted change are written.
    """

    def __init__(self, optimizer, diagnostics):
        self._optimizer = optimizer
        self._diagnostics = diagnostics

    @property
    def damping_factor(self):
        """`omega1 = (19/20)^T1` of the damping rule, or None without it."""
        optimizer = self._optimizer
        if not optimizer.adapts_damping:
            return None
        return step_rules.adjustment_factor(optimizer.adaptive.damping_update_every)

    def damping_adaptation_due(self):
        """Bool tensor: the Levenberg-Marquardt rule runs after this step."""
        optimizer = self._optimizer
        return tf.equal(optimizer.curvature.step() % optimizer.adaptive.damping_update_every, 0)

    def check_batch(self, batch, loss):
        """Raises a RuntimeError when the adaptive options lack the batch (or,
        to adapt the damping, the loss before the update)."""
        optimizer = self._optimizer
        if optimizer.needs_batch and (batch is None or (optimizer.adapts_damping
                                                        and loss is None)):
            raise RuntimeError(
                f"KFAC(adaptive={optimizer.adaptive!r}) (the default, adaptive='auto', "
                "adapts the damping) needs the training batch for exact Fisher "
                "products and the loss after the step; train with "
                "kfac_keras.KFACCallback (fit) or kfac_keras.make_train_step "
                "(custom loops) instead of calling apply/apply_gradients.")

    def before_update(self, full_grads, preconditioned, previous, variables, batch):
        """Sets `alpha` and `mu` with the quadratic-model step; returns the
        `Prediction` the damping rule needs after the update.

        Args:
            full_grads: gradients of the objective (with the L2 term), dense.
            preconditioned: the preconditioned (and clipped) gradients.
            previous: the previous update, the momentum slots.
            variables: the variables, aligned with the lists above.
            batch: this step's `BatchQuadraticModel` (or `ReplicaBatches`).
        """
        optimizer = self._optimizer
        due = self.damping_adaptation_due() if optimizer.adapts_damping else None
        if optimizer.uses_quadratic_model_step:
            return Prediction(due, self._choose_step_coefficients(
                full_grads, preconditioned, previous, variables, batch))
        if optimizer.adapts_damping:
            return Prediction(due, tf.cond(
                due,
                lambda: self._predicted_change_of_fixed_step(
                    full_grads, preconditioned, previous, variables, batch),
                lambda: tf.constant(0.0)))
        return Prediction(None, None)

    def after_update(self, prediction, loss_before, updates, variables, batch):
        """When `prediction.due`, adapts the damping to how well the model
        predicted the loss after the update (`updates`, on `batch`)."""
        if prediction.due is None:
            return
        tf.cond(prediction.due,
                lambda: self.adapt_damping(loss_before, prediction.change, updates,
                                           variables, batch),
                lambda: tf.constant(False))

    def _choose_step_coefficients(self, full_grads, preconditioned, previous,
                                  variables, batch):
        """Section 7: sets `alpha` (learning-rate variable) and `mu`; returns the
        undamped model's predicted change for this step."""
        optimizer = self._optimizer
        direction = [-p for p in preconditioned]
        fisher = batch.fisher_gram([direction, previous], variables)
        alpha, mu, change = step_rules.quadratic_model_step(
            direction, previous, full_grads, fisher, optimizer.total_damping(),
            optimizer.l2_reg)
        learning_rate = keras_internals.learning_rate_variable(optimizer)
        learning_rate.assign(tf.cast(alpha, learning_rate.dtype))
        optimizer.step_momentum.assign(mu)
        self._diagnostics.qmodel_change.assign(change)
        return change

    def _predicted_change_of_fixed_step(self, full_grads, preconditioned, previous,
                                        variables, batch):
        """`M(delta) - M(0)` (undamped) for the learning-rate + momentum step."""
        optimizer = self._optimizer
        learning_rate = tf.cast(keras_internals.current_learning_rate(optimizer), tf.float32)
        step = step_rules.fixed_step(preconditioned, previous, learning_rate,
                                     optimizer.current_momentum(), optimizer.nesterov)
        step_fisher = batch.fisher_gram([step], variables)[0, 0]
        change = step_rules.predicted_change(step, step_fisher, full_grads, optimizer.l2_reg)
        self._diagnostics.qmodel_change.assign(change)
        return change

    def adapt_damping(self, loss_before, predicted_change, updates, variables, batch):
        """Section 6.5: `rho` on the same batch, then the Levenberg-Marquardt
        rule; returns a True tensor (for `tf.cond`)."""
        optimizer = self._optimizer
        actual = step_rules.actual_change(loss_before, batch.loss(), variables, updates,
                                          optimizer.l2_reg)
        rho = step_rules.reduction_ratio(actual, predicted_change)
        adaptive = optimizer.adaptive
        optimizer.damping.assign(step_rules.levenberg_marquardt_update(
            optimizer.damping, rho, self.damping_factor, adaptive.min_damping,
            adaptive.max_damping))
        self._diagnostics.rho.assign(rho)
        return tf.constant(True)
