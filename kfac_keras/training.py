"""The K-FAC training step, shared by `model.fit` and custom loops.

One step, in three parts:

1. *Gradients and statistics* (XLA-compiled when `jit_compile=True`): one
   forward pass under a persistent `tf.GradientTape` with the registered
   layers capturing their inputs and pre-activations; the real loss and its
   gradient; and, every `cov_update_every` steps (a `tf.cond`, no host round
   trip), the gradient of the *sampled* objective w.r.t. the captured
   pre-activations (and w.r.t. the diagonal blocks' variables), from which
   the blocks update their factors. No second forward pass. Without XLA
   the `tf.cond` is around the whole part: a statistics step runs the
   forward pass, both backward passes and the update in one branch (CPU
   kernels such as oneDNN's pooling gradient need their forward op in the
   same graph), and the other steps neither sample targets nor keep a
   persistent tape. Under XLA the forward pass stays outside the `tf.cond`,
   so it is compiled once.
2. *Decompositions*, every `inv_update_every` steps (a `tf.cond`): outside
   XLA on CPU, inside XLA on GPU (`kfac_keras.linalg.decomposition_jit`).
   EKFAC decomposes inside part 1 on the steps that also re-estimate its
   scalings (the estimate needs this step's captures in the new eigenbasis);
   with `jit_compile=True` on CPU, those steps run part 1 without XLA.
3. *Update* (XLA-compiled when `jit_compile=True`): precondition, momentum,
   apply; metrics. With `KFAC(adaptive=...)` this part also runs the extra
   passes of the quadratic model on the same batch
   (`kfac_keras.quadratic_model.BatchQuadraticModel`): forward-mode Fisher
   products for `alpha`/`mu` every step, and every `T1` steps (a `tf.cond`)
   the loss after the update for the Levenberg-Marquardt `rho`. The K-FAC
   quantities of `KFAC.logged_values` are returned with the step's logs as
   tensors (no host round trip inside the step).

Non-finite guard (`kfac_keras.guards`, all `tf.cond`s inside the step): a
batch whose loss, gradients or statistics are NaN/Inf skips parts 2 and 3,
the statistics and the model's non-trainable variables are put back, and
`optimizer.skipped_steps` (logged as `kfac_skipped_steps`) grows by one; an
update that would write a non-finite value is undone the same way.

Mixed precision: with a `keras.optimizers.LossScaleOptimizer` around KFAC
(what `model.compile` makes under `"mixed_float16"`), part 1 scales the loss
by the dynamic scale, unscales the gradients before the guard and updates
the scale with Keras's rule; the statistics objective is never scaled, and
the K-FAC state stays float32.

Multi-replica `tf.distribute` strategies (`MirroredStrategy`,
`MultiWorkerMirroredStrategy`; `fit` inside `strategy.scope()`, or
`strategy.run(step, ...)` in a custom loop): each replica runs the forward
pass and its gradients on its slice of the global batch, then one
`merge_call` runs the rest of the step once in cross-replica context, with
gradients all-reduced every step and factor statistics every
`cov_update_every` steps; with `adaptive` options the quadratic model's
passes run per replica and are combined there (`kfac_keras.distributed`,
which also states the communication volume and what is not supported). The
result equals a single-device step on the same global batch.
"""

import keras
import tensorflow as tf

from kfac_keras import capture as capture_lib
from kfac_keras import distributed
from kfac_keras import guards
from kfac_keras import keras_internals
from kfac_keras import linalg
from kfac_keras import losses as losses_lib
from kfac_keras import quadratic_model
from kfac_keras import registration as registration_lib
from kfac_keras.blocks.base import StatisticsSource
from kfac_keras.optimizer import KFAC


def _check_output(y_pred, distribution):
    """The model output, checked against the loss's distribution: a
    structure of several tensors needs one loss per output."""
    if isinstance(distribution, losses_lib.JointDistribution):
        return y_pred
    leaves = tf.nest.flatten(y_pred)
    if len(leaves) != 1 or not hasattr(leaves[0], "shape"):
        raise ValueError(
            f"The model returned {len(leaves)} outputs ({type(y_pred).__name__}) but "
            "K-FAC was given one loss for one output; compile the model with one "
            "loss per output (a list or dict, with optional loss_weights).")
    return y_pred


def _explicit_loss(model, loss):
    """The callable `(y, y_pred, sample_weight) -> loss` for a loss passed to
    `make_train_step`: Keras's own multi-output loss for a list or dict of
    several losses, else the single loss object."""
    if isinstance(loss, (list, tuple, dict)) and len(loss) > 1:
        return keras_internals.multi_output_loss(loss, model)
    return losses_lib.loss_object(loss)


def _unscale_gradients(grads, scale):
    """Divides loss-scaled gradients by the dynamic loss scale."""
    result = []
    for grad in grads:
        if grad is None:
            result.append(None)
        elif isinstance(grad, tf.IndexedSlices):
            result.append(tf.IndexedSlices(
                grad.values / tf.cast(scale, grad.values.dtype), grad.indices,
                grad.dense_shape))
        else:
            result.append(grad / tf.cast(scale, grad.dtype))
    return result


def _update_loss_scale(loss_scale_optimizer, batch_ok):
    """`keras.optimizers.LossScaleOptimizer`'s dynamic rule: halve the scale
    after a non-finite batch; double it after `dynamic_growth_steps`
    consecutive finite ones."""
    counter = loss_scale_optimizer.step_counter
    scale = loss_scale_optimizer.dynamic_scale
    grow = tf.logical_and(
        batch_ok, tf.equal(tf.convert_to_tensor(counter),
                           loss_scale_optimizer.dynamic_growth_steps - 1))
    factor = tf.where(batch_ok, tf.where(grow, 2.0, 1.0), 0.5)
    scale.assign(tf.convert_to_tensor(scale) * factor)
    counter.assign(tf.where(tf.logical_and(batch_ok, tf.logical_not(grow)),
                            tf.convert_to_tensor(counter) + 1,
                            tf.zeros_like(tf.convert_to_tensor(counter))))


def _cond_with_none(pred, true_fn, false_fn):
    """`tf.cond` over branches that return the same nested structure with
    None entries (variables without a gradient), which `tf.cond` cannot
    return: the Nones are dropped inside the branches and put back after."""
    traced = []

    def without_none(fn):
        def branch():
            result = fn()
            flat = tf.nest.flatten(result)
            traced.append((result, [value is None for value in flat]))
            return [value for value in flat if value is not None]
        return branch

    values = iter(tf.cond(pred, without_none(true_fn), without_none(false_fn)))
    structure, nones = traced[0]  # eagerly, only the branch taken runs
    if any(other != nones for _, other in traced[1:]):
        raise ValueError("The branches of the step return gradients for different variables.")
    return tf.nest.pack_sequence_as(
        structure, [None if none else next(values) for none in nones])


class _ForwardPass:
    """What the forward pass leaves for the rest of the step: the output, the
    (unscaled) loss, its gradients, the persistent tape and captures for the
    sampled backward pass, the statistics objective and its subset size, and
    per capture block the row weights of its captures (sample weights times
    Keras masks, or None)."""

    def __init__(self, y_pred, loss, grads, tape, records, objective, subset,
                 row_weights):
        self.y_pred = y_pred
        self.loss = loss
        self.grads = grads
        self.tape = tape
        self.records = records
        self.objective = objective
        self.subset = subset
        self.row_weights = row_weights


class KFACTrainStep:
    """A callable K-FAC training step for a model and its KFAC optimizer.

    Use `make_train_step` to build one for a custom loop; `KFACCallback`
    builds one for `model.fit`.

    Args:
        model: a built Keras model (one output, or a list or dict of
            outputs with one loss each).
        optimizer: the `kfac_keras.KFAC` instance, or a
            `keras.optimizers.LossScaleOptimizer` wrapping one (what
            `model.compile` makes of it under the `"mixed_float16"` policy;
            the step then scales the loss, unscales the gradients before the
            non-finite guard and updates the dynamic scale like Keras does).
            Defaults to `model.optimizer`. Under a `tf.distribute` strategy
            with more than one replica, options that cannot run there raise
            NotImplementedError before any K-FAC state is created
            (`kfac_keras.distributed.check_supported`).
        loss: the loss, as accepted by `kfac_keras.losses.distribution_for_model`
            (string, Keras loss object or function, `DistributionLoss`,
            `declare_loss`; for several outputs a list or dict of them, with
            weight 1 each). Defaults to the loss given to `model.compile`,
            evaluated through Keras (so `loss_weights` and regularization
            losses apply); with several outputs the Fisher is the sum of the
            outputs' Fishers, each scaled by its loss weight.
        jit_compile: XLA-compile parts 1 and 3 of the step. Defaults to False.
    """

    def __init__(self, model, optimizer=None, loss=None, jit_compile=False):
        optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
        # mixed_float16: `model.compile` wraps the optimizer in a
        # LossScaleOptimizer; K-FAC keeps its dynamic loss scaling (scale the
        # loss, unscale the gradients, halve the scale on a non-finite batch,
        # double it after `dynamic_growth_steps` finite ones) and trains with
        # the wrapped KFAC.
        self.loss_scale_optimizer = None
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            self.loss_scale_optimizer = optimizer
            optimizer = optimizer.inner_optimizer
        if not isinstance(optimizer, KFAC):
            raise TypeError(
                "The K-FAC training step needs a kfac_keras.KFAC optimizer; "
                f"received {type(optimizer).__name__}. Compile the model with "
                "`optimizer=kfac_keras.KFAC(...)` or pass `optimizer=`.")
        if loss is None:
            compiled = getattr(model, "loss", None)
            if compiled is None:
                raise ValueError(
                    "No loss: compile the model with a loss or pass `loss=` to "
                    "make_train_step.")
            self._loss_fn = None
            compile_loss = getattr(model, "_compile_loss", None)
            loss_weights = getattr(compile_loss, "_user_loss_weights", None)
            self.distribution = losses_lib.distribution_for_model(model, compiled, loss_weights)
        else:
            self.distribution = losses_lib.distribution_for_model(model, loss)
            self._loss_fn = _explicit_loss(model, loss)
        if (optimizer.estimation_mode == "curvature_propagation"
                and not self.distribution.has_fisher_sqrt):
            raise self.distribution.missing_fisher_sqrt_error()
        if not isinstance(jit_compile, bool):
            raise TypeError(f"`jit_compile` must be a bool; received {jit_compile!r}.")
        strategy = distributed.multi_replica_strategy(model)
        if strategy is not None:
            distributed.check_supported(strategy, model, self.distribution, jit_compile)
        self.model = model
        self.optimizer = optimizer
        self._strategy = strategy
        with distributed.variable_scope(strategy):
            if self.loss_scale_optimizer is not None and not self.loss_scale_optimizer.built:
                with keras.name_scope(self.loss_scale_optimizer.name,
                                      caller=self.loss_scale_optimizer):
                    self.loss_scale_optimizer.build(model.trainable_variables)
                self.loss_scale_optimizer.built = True
            self.registration = optimizer.attach(model)
        self.jit_compile = jit_compile
        # EKFAC's decompositions inside part 1 must stay out of XLA on CPU.
        self._decomposes_outside_xla = (
            jit_compile and optimizer.inverse_method == "ekfac"
            and not linalg.decomposition_jit(optimizer.decomposition_jit_compile))
        if jit_compile:
            self._compiled_gradients_and_statistics = tf.function(
                self._gradients_and_statistics_impl, jit_compile=True,
                reduce_retracing=True)
            self._apply = tf.function(self._apply_impl, jit_compile=True,
                                      reduce_retracing=True)
        else:
            self._apply = self._apply_impl

    # ---------------------------------------------------------------- parts
    def _loss(self, x, y, y_pred, sample_weight):
        if self._loss_fn is None:
            return keras_internals.compute_loss(self.model, x, y, y_pred, sample_weight)
        value = self._loss_fn(y, y_pred, sample_weight=sample_weight)
        if self.model.losses:
            value = value + keras_internals.scale_loss_for_distribution(
                tf.add_n([tf.cast(l, value.dtype) for l in self.model.losses]))
        return value

    def _statistics_objective(self, y, y_pred, sample_weight, first_example):
        """`sum_n sqrt(c_n) NLL_n` over the statistics subset (summed over the
        outputs, each with its loss weight), and the subset's size.
        `first_example`: index of `y_pred[0]` in the global batch."""
        optimizer = self.optimizer
        batch = tf.shape(tf.nest.flatten(y_pred)[0])[0]
        subset = tf.cast(tf.math.ceil(
            optimizer.statistics_fraction * tf.cast(batch, tf.float32)), tf.int32)
        subset = tf.clip_by_value(subset, 1, batch)
        mode = optimizer.estimation_mode
        seed = None if mode == "empirical" else optimizer.sampling_seed()
        objective = self.distribution.statistics_objective(
            y_pred, y, sample_weight, subset, seed, first_example, mode)
        return objective, subset

    def _forward(self, x, y, sample_weight, first_example=0, statistics=True):
        """Forward pass with captures, loss and gradients (of this replica's
        slice of the batch under a strategy); see `_ForwardPass`. With
        `statistics=False` the statistics objective is not built (no targets
        are sampled) and the tape is not kept for a second backward pass."""
        model, optimizer, registration = self.model, self.optimizer, self.registration
        objective = subset = None
        with tf.GradientTape(persistent=statistics) as tape:
            with registration.capture() as recorder:
                y_pred = _check_output(model(x, training=True), self.distribution)
            loss = self._loss(x, y, y_pred, sample_weight)
            if self.loss_scale_optimizer is not None:
                scaled_loss = self.loss_scale_optimizer.scale_loss(loss)
            else:
                scaled_loss = optimizer.scale_loss(loss)
            if statistics:
                objective, subset = self._statistics_objective(
                    y, y_pred, sample_weight, first_example)
        grads = tape.gradient(scaled_loss, model.trainable_variables)
        if self.loss_scale_optimizer is not None:
            grads = _unscale_gradients(grads, self.loss_scale_optimizer.dynamic_scale)
        records = {id(b): registration_lib.block_captures(b, recorder)
                   for b in registration.capture_blocks}
        masks = {id(b): capture_lib.block_capture_masks(b, recorder)
                 for b in registration.capture_blocks}
        for block in registration.capture_blocks:
            block.verify_captures(recorder)
        row_sample_weight = losses_lib.row_sample_weight(self.distribution, sample_weight)
        row_weights = {key: [capture_lib.row_weights(row_sample_weight, mask)
                             for mask in block_masks]
                       for key, block_masks in masks.items()}
        return _ForwardPass(y_pred, loss, grads, tape, records, objective, subset, row_weights)

    def _block_inputs(self, forward):
        """The sampled objective's backward pass: `(captures, sampled_grads)`
        per block, as `CurvatureEstimator.update_curvature` takes them."""
        registration = self.registration
        sources = []
        for block in registration.blocks:
            if block.statistics_source is StatisticsSource.CAPTURES:
                sources.extend(pre for _, pre in forward.records[id(block)])
            elif block.statistics_source is StatisticsSource.SAMPLED_GRADIENTS:
                sources.extend(block.variables)
        sampled = forward.tape.gradient(forward.objective, sources,
                                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
        subset = forward.subset
        position = 0
        block_inputs = []
        for block in registration.blocks:
            if block.statistics_source is StatisticsSource.CAPTURES:
                uses = forward.records[id(block)]
                weights = forward.row_weights[id(block)]
                captures = [(inputs[:subset], g[:subset], None if r is None else r[:subset])
                            for (inputs, _), g, r in zip(
                                uses, sampled[position:position + len(uses)], weights)]
                position += len(uses)
                block_inputs.append((captures, None))
            elif block.statistics_source is StatisticsSource.SAMPLED_GRADIENTS:
                count = len(block.variables)
                block_inputs.append((None, sampled[position:position + count]))
                position += count
            else:
                block_inputs.append((None, None))
        return block_inputs

    def _gradients_and_statistics(self, x, y, sample_weight, decompose_first):
        """Part 1, XLA-compiled with `jit_compile`, except for a step where
        EKFAC decomposes (`decompose_first`) on a device whose decompositions
        stay out of XLA: that step runs part 1 without XLA."""
        if not self.jit_compile:
            return self._gradients_and_statistics_impl(x, y, sample_weight, decompose_first)
        if not self._decomposes_outside_xla:
            return self._compiled_gradients_and_statistics(x, y, sample_weight, decompose_first)
        return tf.cond(
            decompose_first,
            lambda: self._gradients_and_statistics_impl(x, y, sample_weight, True),
            lambda: self._compiled_gradients_and_statistics(x, y, sample_weight, False))

    def _gradients_and_statistics_impl(self, x, y, sample_weight, decompose_first):
        frozen = self.model.non_trainable_variables  # put back if the step is skipped
        frozen_values = guards.read_values(frozen)
        due = self.optimizer.curvature_pass_due()
        if self.jit_compile:
            y_pred, loss, grads, updated, ok = self._forward_and_statistics(
                x, y, sample_weight, decompose_first, due, statistics=True)
        else:
            # Without XLA, a statistics step runs its own forward pass in its
            # branch: oneDNN's pooling gradients need the forward op in the
            # same graph, and a backward pass in a branch of its own falls
            # back to kernels up to 20x slower. Other steps sample no targets.
            y_pred, loss, grads, updated, ok = _cond_with_none(
                due,
                lambda: self._forward_and_statistics(
                    x, y, sample_weight, decompose_first, due, statistics=True),
                lambda: self._forward_and_statistics(
                    x, y, sample_weight, decompose_first, due, statistics=False))
        guards.restore_if_skipped(ok, frozen, frozen_values)
        return y_pred, loss, grads, updated, ok

    def _forward_and_statistics(self, x, y, sample_weight, decompose_first, due, statistics):
        """The forward pass, the guard, and (when `statistics` and `due`) the
        statistics update; returns `(y_pred, loss, grads, updated, ok)`."""
        optimizer = self.optimizer
        forward = self._forward(x, y, sample_weight, statistics=statistics)
        # In the statistics branch (without XLA) the sampled backward pass
        # runs beside the forward pass, outside the guard's own branch.
        block_inputs = self._block_inputs(forward) if statistics and not self.jit_compile else None

        def update_statistics():
            inputs = block_inputs if block_inputs is not None else self._block_inputs(forward)
            optimizer.update_curvature(inputs, tf.cast(forward.subset, tf.float32),
                                       decompose_first)
            return tf.constant(True)

        # Non-finite guard: a bad batch or bad statistics skip the step.
        batch_ok = guards.batch_is_finite(forward.loss, forward.grads)
        if self.loss_scale_optimizer is not None:
            _update_loss_scale(self.loss_scale_optimizer, batch_ok)
        if statistics:
            updated, ok = guards.guarded_statistics_update(
                optimizer, due, batch_ok, update_statistics)
        else:
            updated, ok = tf.constant(False), batch_ok
        return forward.y_pred, forward.loss, forward.grads, updated, ok

    def _apply_impl(self, grads, ok, x, y, sample_weight, loss):
        batch = quadratic_model.BatchQuadraticModel(
            self.model, self.distribution, x, y, sample_weight, self._loss)
        self._guarded_update(grads, ok, batch, loss)

    def _guarded_update(self, grads, ok, batch, loss):
        variables = self.model.trainable_variables
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        guards.guarded_apply(  # skipped unless ok; undone if the result is non-finite
            self.optimizer, variables, ok,
            lambda: self.optimizer.apply_step([g for g, _ in pairs], [v for _, v in pairs],
                                              batch=batch, loss=loss))

    # ------------------------------------------------- multi-replica step
    def _run_replica(self, x, y, sample_weight):
        """One step in a replica context of a multi-replica strategy (see
        `kfac_keras.distributed`): local forward pass, then one `merge_call`."""
        frozen_values = guards.read_values(self.model.non_trainable_variables)
        first_input = next(i for i in tf.nest.flatten(x) if i is not None)
        forward = self._forward(x, y, sample_weight, distributed.first_global_example(
            tf.shape(first_input)[0]))
        present = [g for g in forward.grads if g is not None]
        packed = distributed.pack([forward.loss] + present)
        batch = (quadratic_model.BatchQuadraticModel(
            self.model, self.distribution, x, y, sample_weight, self._loss)
            if self.optimizer.needs_batch else None)
        tf.distribute.get_replica_context().merge_call(
            self._cross_replica_update, args=(forward, packed, frozen_values, batch))
        return forward.y_pred, forward.loss

    def _replica_estimates(self, record, forward, block_inputs):
        """This replica's new estimates, `record(block_inputs, num_examples)`
        (the curvature's `record_estimates` or `record_scalings`), packed and
        each multiplied by its count (the replica's number of statistics
        examples, or for an input factor with row weights its weighted count
        `m_w`), followed by the counts; the estimates' keys are left in
        `_estimated_keys`."""
        num_examples = tf.cast(forward.subset, tf.float32)
        entries = [(key, estimate, rest[0] if rest else num_examples)
                   for key, estimate, *rest in record(block_inputs, num_examples)]
        self._estimated_keys = [key for key, _, _ in entries]
        self._estimate_shapes = [estimate.shape for _, estimate, _ in entries]
        return distributed.pack([estimate * count for _, estimate, count in entries]
                                + [count for _, _, count in entries])

    def _mean_estimates(self, strategy, record, forwards, block_inputs):
        """The `(key, estimate, count)` triples of `record` over the global
        batch: the replicas' estimates averaged with their counts as weights,
        in one all-reduce."""
        per_replica = strategy.extended.call_for_each_replica(
            self._replica_estimates, args=(record, forwards, block_inputs))
        total = distributed.sum_over_replicas(strategy, per_replica)
        count = len(self._estimated_keys)
        if not count:
            return []
        sums = distributed.unpack(total[:-count], self._estimate_shapes)
        counts = tf.unstack(total[-count:])
        means = [tf.math.divide_no_nan(estimate, weight) for estimate, weight in zip(sums, counts)]
        return list(zip(self._estimated_keys, means, counts))

    def _cross_replica_update(self, strategy, forwards, packed, frozen_values, batches):
        """The rest of the step, once, in cross-replica context. `batches`:
        the replicas' `BatchQuadraticModel`s with `adaptive` options, else
        None."""
        optimizer = self.optimizer
        optimizer.begin_step()
        template = strategy.experimental_local_results(forwards)[0].grads
        shapes = [()] + [v.shape for g, v in zip(template, self.model.trainable_variables)
                         if g is not None]
        reduced = iter(distributed.unpack(distributed.sum_over_replicas(strategy, packed), shapes))
        loss = next(reduced)  # Keras divides each replica's loss by their number
        grads = [None if g is None else tf.cast(next(reduced), g.dtype) for g in template]

        curvature = optimizer.curvature
        decompose_first = curvature.decomposes_before_scalings()

        def update_statistics():
            # Each replica's sampled backward pass, once; its estimates are
            # averaged over the replicas before they are folded in.
            block_inputs = strategy.extended.call_for_each_replica(
                self._block_inputs, args=(forwards,))
            curvature.update_curvature_from(
                lambda: self._mean_estimates(
                    strategy, curvature.record_estimates, forwards, block_inputs),
                lambda: self._mean_estimates(
                    strategy, curvature.record_scalings, forwards, block_inputs),
                decompose_first)
            return tf.constant(True)

        batch_ok = guards.batch_is_finite(loss, grads)
        if self.loss_scale_optimizer is not None:  # replicas unscaled their gradients
            _update_loss_scale(self.loss_scale_optimizer, batch_ok)
        updated, ok = guards.guarded_statistics_update(
            optimizer, optimizer.curvature_pass_due(), batch_ok, update_statistics)
        frozen = self.model.non_trainable_variables
        guards.run_if(tf.logical_not(ok), lambda: distributed.assign_per_replica(
            strategy, frozen, frozen_values))
        guards.run_if(ok, lambda: optimizer.maybe_update_inverses(updated, decompose_first))
        batch = None if batches is None else distributed.ReplicaBatches(strategy, batches)
        self._guarded_update(grads, ok, batch=batch, loss=loss)

    # ----------------------------------------------------------- entry points
    def run(self, x, y, sample_weight=None):
        """Runs one step; returns `(y_pred, loss)`. Inside `strategy.run` of
        a multi-replica strategy, `loss` is this replica's share (Keras
        divides it by the number of replicas; their sum is the global loss)."""
        if distributed.in_multi_replica_context():
            if self._strategy is None:
                raise RuntimeError(
                    "This K-FAC step was built without a multi-replica strategy "
                    "but is running inside one; build the model and the step "
                    "inside `strategy.scope()`.")
            return self._run_replica(x, y, sample_weight)
        self.optimizer.begin_step()
        decompose_first = self.optimizer.curvature.decomposes_before_scalings()
        y_pred, loss, grads, updated, ok = self._gradients_and_statistics(
            x, y, sample_weight, decompose_first)
        guards.run_if(ok, lambda: self.optimizer.maybe_update_inverses(
            updated, decompose_first))
        self._apply(grads, ok, x, y, sample_weight, loss)
        return y_pred, loss

    def __call__(self, x, y, sample_weight=None):
        """One K-FAC step on a batch, for custom loops.

        Args:
            x: model inputs.
            y: targets, in the format the loss expects.
            sample_weight: optional weights, shape `(batch,)`, or `(batch, T)`
                per position of a sequence output; they (and Keras masks)
                weigh the loss and every factor (docs/weighted_factors.md).

        Returns:
            A dict with the batch's `"loss"` (before the update),
            `"kfac_skipped_steps"`, the number of steps the non-finite guard
            has skipped so far (`kfac_keras.guards`), and the tensors of
            `KFAC.logged_values` (`"damping"`, `"update_norm"`, and with
            `adaptive` options `"rho"`, `"alpha"`, `"mu"`, `"qmodel_change"`).
        """
        _, loss = self.run(x, y, sample_weight)
        logs = {"loss": loss,
                "kfac_skipped_steps": tf.convert_to_tensor(self.optimizer.skipped_steps)}
        logs.update(self.optimizer.logged_values())
        return logs

    def keras_train_step(self, data):
        """Drop-in replacement for `model.train_step`, used by `fit`."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred, loss = self.run(x, y, sample_weight)
        model = self.model
        first_input = next(i for i in tf.nest.flatten(x) if i is not None)
        # A non-finite loss means the guard skipped the batch: leave it out of
        # the logged mean loss (so TerminateOnNaN does not end a healthy run).
        loss_is_finite = tf.math.is_finite(loss)
        keras_internals.loss_tracker(model).update_state(
            tf.where(loss_is_finite, keras_internals.unscale_loss_for_distribution(loss), 0.0),
            sample_weight=tf.where(loss_is_finite, tf.shape(first_input)[0], 0))
        logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if "loss" in logs:
            # Every batch so far skipped: the mean loss is undefined, not 0.
            seen = tf.convert_to_tensor(keras_internals.loss_tracker(model).count) > 0
            undefined = tf.constant(float("nan"), logs["loss"].dtype)
            logs["loss"] = tf.where(seen, logs["loss"], undefined)
        logs["kfac_skipped_steps"] = tf.convert_to_tensor(self.optimizer.skipped_steps)
        for key, value in self.optimizer.logged_values().items():
            logs[key if key not in logs else "kfac_" + key] = value
        return logs


def make_train_step(model, optimizer=None, loss=None, jit_compile=False):
    """Builds a K-FAC training step for a custom training loop.

    Example::

        optimizer = kfac_keras.KFAC(learning_rate=0.05, damping=1e-3)
        step = tf.function(kfac_keras.make_train_step(
            model, optimizer, loss="sparse_categorical_crossentropy"))
        for x, y in dataset:
            logs = step(x, y)

    The returned step does the forward pass itself (so K-FAC can capture the
    layers' inputs and pre-activation gradients); do not call
    `optimizer.apply_gradients` yourself.

    Args:
        model: a built Keras model (one output, or several with one loss each).
        optimizer: a `kfac_keras.KFAC`. Defaults to `model.optimizer`.
        loss: the loss or losses (see `KFACTrainStep`). Defaults to the
            compiled loss.
        jit_compile: XLA-compile the step's gradient and update parts.
            Defaults to False.

    Returns:
        A `KFACTrainStep`; call it as `step(x, y, sample_weight=None)`.
    """
    return KFACTrainStep(model, optimizer=optimizer, loss=loss, jit_compile=jit_compile)
