"""The curvature estimator: K-FAC's Fisher approximation and its schedule.

`KFAC` (the Keras optimizer) owns the update; this object owns the
curvature it preconditions with: when statistics, EKFAC scalings and
decompositions are due (`T_cov`, `T_scale`, `T_inv`), the estimate counter
and the moving-average weight it gives each new estimate, folding estimates
into the blocks' factors (directly, or recorded and averaged over replicas
first, `kfac_keras.distributed`), the decompositions with the device-aware
XLA choice, and preconditioning. The blocks (`kfac_keras.blocks`) hold the
factors; the training step (`kfac_keras.training`) computes what they are
estimated from.

Imports: blocks, guards, distributed, linalg; never the optimizer.
"""

import tensorflow as tf

from kfac_keras import distributed
from kfac_keras import guards
from kfac_keras import linalg
from kfac_keras.blocks.base import EstimateRecorder, ema_assign

_INT32_MODULUS = 2**31 - 1


class CurvatureEstimator:
    """The block-wise Fisher approximation of one `KFAC` optimizer.

    Created by `KFAC.__init__`; `build` creates its variable with the
    optimizer's (so checkpoints keep their order), `attach` gives it the
    registered blocks.

    Args:
        options: the optimizer's `kfac_keras.options.KFACOptions`.
        sampling_seed: int in [0, 2^31 - 1), the seed of the Fisher targets
            (the option's `seed`, or one drawn by the optimizer).
    """

    def __init__(self, options, sampling_seed):
        self.options = options
        self.sampling_seed_value = int(sampling_seed)
        self.registration = None
        self.num_estimates = None
        self._iterations = None
        self._damping = None
        self._decompose_fn = None

    def build(self, optimizer, damping):
        """Creates the estimate counter (`num_estimates`) as an optimizer variable.

        Args:
            optimizer: the `KFAC` optimizer being built (its `add_variable`
                and `iterations` are used).
            damping: the optimizer's damping variable, `lambda`.
        """
        self._iterations = optimizer.iterations
        self._damping = damping
        self.num_estimates = optimizer.add_variable(
            (), initializer="zeros", dtype="float32", name="num_estimates")

    def attach(self, registration):
        """Uses the blocks of `registration` from now on."""
        self.registration = registration

    # --------------------------------------------------------------- schedule
    def step(self):
        """The optimizer's step counter, an int64 tensor."""
        return tf.cast(tf.convert_to_tensor(self._iterations), tf.int64)

    def _every(self, period):
        return tf.equal(self.step() % period, 0)

    def statistics_due(self):
        """Bool tensor: this step updates the factor statistics."""
        return self._every(self.options.cov_update_every)

    def scalings_due(self):
        """Bool tensor: EKFAC re-estimates its corrected diagonal this step."""
        return self._every(self.options.scalings_every)

    def curvature_pass_due(self):
        """Bool tensor: this step needs the sampled-loss backward pass (factor
        statistics, or EKFAC's corrected diagonal)."""
        if self.options.inverse_method != "ekfac":
            return self.statistics_due()
        return tf.logical_or(self.statistics_due(), self.scalings_due())

    def inverses_due(self, statistics_updated):
        """Bool tensor: decompose the factors at this step (every `T_inv`
        steps, and after each of the first 3 statistics updates)."""
        periodic = self._every(self.options.inv_update_every)
        early = tf.logical_and(
            tf.logical_and(statistics_updated, self.statistics_due()),
            tf.convert_to_tensor(self.num_estimates) <= 3.0)
        return tf.logical_or(periodic, early)

    def sampling_seed(self):
        """Shape-(2,) int32 seed for this step's Fisher targets."""
        step = tf.cast(self.step() % _INT32_MODULUS, tf.int32)
        return tf.stack([tf.constant(self.sampling_seed_value % _INT32_MODULUS, tf.int32),
                         step])

    def total_damping(self):
        """`lambda + eta`, the damping every block uses."""
        return tf.convert_to_tensor(self._damping) + self.options.l2_reg

    # ------------------------------------------------------------- estimates
    def _next_estimate_decay(self):
        """Counts one more estimate; returns its moving-average weight of the
        old value, `min(1 - 1/k, factor_decay)`."""
        self.num_estimates.assign_add(1.0)
        count = tf.convert_to_tensor(self.num_estimates)
        return tf.minimum(1.0 - 1.0 / count, self.options.factor_decay)

    def update_statistics(self, block_inputs, num_examples):
        """Folds one estimate into every block's factors.

        Args:
            block_inputs: list aligned with `registration.blocks` of
                `(captures, sampled_grads)` pairs (see
                `FisherBlock.update_statistics`); identity blocks get
                `(None, None)`.
            num_examples: float32 scalar, size of the statistics subset.
        """
        decay = self._next_estimate_decay()
        for block, (captures, sampled_grads) in zip(self.registration.blocks, block_inputs):
            block.update_statistics(captures, sampled_grads, num_examples, decay)

    def record_estimates(self, block_inputs, num_examples):
        """Every block's new estimates, without folding them into the factors.

        Args: as for `update_statistics`.

        Returns:
            A list of `(state variable, estimate, count)` triples, for
            `fold_estimates` after averaging the estimates over replicas with
            the counts as weights: `count` is the weighted number of examples
            the estimate is a mean over (an input factor's `m_w` with row
            weights), else `num_examples`.
        """
        recorder = EstimateRecorder()
        for block, (captures, sampled_grads) in zip(self.registration.blocks, block_inputs):
            block.update_statistics(captures, sampled_grads, num_examples, recorder)
        return [(variable, estimate, num_examples if count is None else count)
                for (variable, estimate), count in zip(recorder.pairs, recorder.counts)]

    def fold_estimates(self, estimates):
        """Folds estimates recorded by `kfac_keras.blocks.base.EstimateRecorder`
        (already averaged over replicas) into the factors, as
        `update_statistics` does with the estimates it computes.

        Args:
            estimates: list of `(variable, estimate)` pairs, or `(variable,
                estimate, count)` triples (an estimate over a zero count
                leaves its variable unchanged, see `ema_assign`).
        """
        decay = self._next_estimate_decay()
        for variable, estimate, *count in estimates:
            ema_assign(variable, estimate, decay, count[0] if count else None)

    def update_curvature(self, block_inputs, num_examples):
        """Runs the statistics and EKFAC updates that are due this step.

        Called in a step where `curvature_pass_due()` holds, with the same
        arguments as `update_statistics` (which it calls when
        `statistics_due()`); with `inverse_method="ekfac"` it also calls
        each EKFAC block's `update_scalings` when `scalings_due()`. When the
        factors are also decomposed this step, the decomposition runs here,
        before the scalings estimate, so the estimate is made in the new
        eigenbasis (and used by this step's update); `maybe_update_inverses`
        then skips the step.
        """
        if self.options.inverse_method != "ekfac":
            self.update_statistics(block_inputs, num_examples)
            return tf.constant(True)

        def statistics():
            self.update_statistics(block_inputs, num_examples)
            return tf.constant(True)

        def scalings():
            tf.cond(self.inverses_due(self.statistics_due()), self.update_inverses,
                    lambda: tf.constant(False))
            for block, (captures, _) in zip(self.registration.blocks, block_inputs):
                if block.uses_eigenbasis_scalings:
                    block.update_scalings(captures, num_examples, self.options.factor_decay)
            return tf.constant(True)

        tf.cond(self.statistics_due(), statistics, lambda: tf.constant(False))
        tf.cond(self.scalings_due(), scalings, lambda: tf.constant(False))
        return tf.constant(True)

    # --------------------------------------------------------- decompositions
    def _decompose(self):
        damping = self.total_damping()
        blocks = self.registration.blocks
        strategy = tf.distribute.get_strategy()
        if (self.options.distributed_inverses and tf.distribute.in_cross_replica_context()
                and strategy.num_replicas_in_sync > 1):
            distributed.decompose_distributed(strategy, blocks, self._damping, damping)
        else:
            # A failed block keeps its previous decomposition and raises the damping.
            guards.guarded_update_inverses(blocks, self._damping, damping)
        return tf.constant(True)

    def update_inverses(self):
        """Decomposes every block's factors now (in XLA only where
        `linalg.decomposition_jit` says so: never on CPU, where XLA's `eigh`
        is ~100x slower)."""
        if self._decompose_fn is None:
            if linalg.decomposition_jit(self.options.decomposition_jit_compile):
                self._decompose_fn = tf.function(self._decompose, jit_compile=True)
            else:
                self._decompose_fn = self._decompose
        return self._decompose_fn()

    def maybe_update_inverses(self, statistics_updated):
        """Runs `update_inverses` when `inverses_due`; returns whether it ran.

        With `inverse_method="ekfac"`, a step whose scalings were updated has
        already decomposed (see `update_curvature`).
        """
        due = self.inverses_due(statistics_updated)
        if self.options.inverse_method == "ekfac":
            done = tf.logical_and(statistics_updated, self.scalings_due())
            due = tf.logical_and(due, tf.logical_not(done))
        return tf.cond(due, self.update_inverses, lambda: tf.constant(False))

    # -------------------------------------------------------- preconditioning
    def precondition(self, grads, trainable_variables):
        """Returns `(F + damping I)^{-1} (grad + l2_reg * theta)` per variable.

        Args:
            grads: list of gradients (tensors, IndexedSlices or None), aligned
                with `trainable_variables`.
            trainable_variables: the variables, each owned by a block.

        Returns:
            A list aligned with `grads`: None where the gradient is None.

        Raises:
            ValueError: a variable with a gradient has no block (it was
                created after registration).
        """
        registration = self.registration
        l2_reg = self.options.l2_reg
        damping = self.total_damping()
        by_var = {}
        for grad, variable in zip(grads, trainable_variables):
            if grad is None:
                continue
            block = registration.block_of(variable)
            if block is None:
                raise ValueError(
                    f"Variable {variable.path} has no K-FAC block; it was "
                    "created after registration.")
            if not (isinstance(grad, tf.IndexedSlices) and not l2_reg
                    and block.accepts_indexed_slices):
                grad = tf.convert_to_tensor(grad)  # sparse rows only for blocks that take them
            if l2_reg:
                grad = grad + l2_reg * tf.cast(variable, grad.dtype)
            by_var[id(variable)] = grad
        result = dict(by_var)
        for block in registration.blocks:
            block_grads = [by_var.get(id(v)) for v in block.variables]
            if any(g is None for g in block_grads):
                if all(g is None for g in block_grads):
                    continue
                block_grads = [tf.zeros_like(v) if g is None else g
                               for g, v in zip(block_grads, block.variables)]
            new_grads = block.multiply_damped_inverse(block_grads, damping)
            for variable, grad in zip(block.variables, new_grads):
                if id(variable) in by_var:
                    result[id(variable)] = tf.cast(tf.convert_to_tensor(grad), variable.dtype)
        return [None if g is None else result[id(v)]
                for g, v in zip(grads, trainable_variables)]

