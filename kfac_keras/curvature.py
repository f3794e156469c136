"""The curvature estimator: K-FAC's Fisher approximation and its schedule.

`KFAC` (the Keras optimizer) owns the update; this object owns the
curvature it preconditions with: when statistics, EKFAC scalings and
decompositions are due (`T_cov`, `T_scale`, `T_inv`), the estimate counter
and the moving-average weight it gives each new estimate, folding the
blocks' recorded estimates (averaged over replicas first under a strategy,
`kfac_keras.distributed`) into their factors and EKFAC's corrected
diagonals, the decompositions with the device-aware XLA choice, and
preconditioning. The blocks (`kfac_keras.blocks`) hold the
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
        """Uses the blocks of `registration` from now on (in the options'
        `damping_mode`)."""
        self.registration = registration
        for block in registration.blocks:
            block.set_damping_mode(self.options.damping_mode)

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

    def record_estimates(self, block_inputs, num_examples):
        """Every block's new factor estimates, without folding them in.

        Args:
            block_inputs: list aligned with `registration.blocks` of
                `(captures, sampled_grads)` pairs (see
                `FisherBlock.update_statistics`); identity blocks get
                `(None, None)`.
            num_examples: float32 scalar, size of the statistics subset.

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
        """Folds estimates of `record_estimates` (over the whole batch, so
        averaged over replicas under a strategy) into the factors: one more
        estimate, with moving-average weight `min(1 - 1/k, factor_decay)`.

        Args:
            estimates: list of `(variable, estimate)` pairs, or `(variable,
                estimate, count)` triples (an estimate over a zero count
                leaves its variable unchanged, see `ema_assign`).
        """
        decay = self._next_estimate_decay()
        for variable, estimate, *count in estimates:
            ema_assign(variable, estimate, decay, count[0] if count else None)

    def record_scalings(self, block_inputs, num_examples):
        """EKFAC: every block's new estimate of its corrected diagonal, in the
        current eigenbasis, without folding it in.

        Args: as for `record_estimates`.

        Returns:
            A list of `(Kronecker block, estimate)` pairs, for `fold_scalings`.
        """
        recorder = EstimateRecorder()
        for block, (captures, _) in zip(self.registration.blocks, block_inputs):
            if block.uses_eigenbasis_scalings:
                block.update_scalings(captures, num_examples, recorder)
        return recorder.scalings

    def fold_scalings(self, estimates):
        """Folds estimates of `record_scalings` (over the whole batch) into
        the blocks' corrected diagonals (`KroneckerBlock.fold_scalings`)."""
        for block, estimate, *_ in estimates:  # a replica mean also carries its count
            block.fold_scalings(estimate, self.options.factor_decay)

    def decomposes_before_scalings(self):
        """Bool tensor, evaluated before this step's statistics update: EKFAC
        re-estimates its scalings this step and the factors are decomposed
        this step too (`inverses_due` after the update), so the decomposition
        runs first and the estimate is made in the new eigenbasis. False (a
        Python bool) for the other inverse methods."""
        if self.options.inverse_method != "ekfac":
            return False
        early = tf.logical_and(self.statistics_due(),
                               tf.convert_to_tensor(self.num_estimates) + 1.0 <= 3.0)
        return tf.logical_and(self.scalings_due(), tf.logical_or(
            self._every(self.options.inv_update_every), early))

    def update_curvature(self, block_inputs, num_examples, decompose_first=False):
        """Runs the statistics and EKFAC updates that are due this step, from
        one device's (or one graph's) captures.

        Called in a step where `curvature_pass_due()` holds; see
        `update_curvature_from`.

        Args:
            block_inputs: as for `record_estimates`.
            num_examples: float32 scalar, size of the statistics subset.
            decompose_first: as for `update_curvature_from`. Defaults to False.
        """
        return self.update_curvature_from(
            lambda: self.record_estimates(block_inputs, num_examples),
            lambda: self.record_scalings(block_inputs, num_examples), decompose_first)

    def update_curvature_from(self, factor_estimates, scaling_estimates,
                              decompose_first=False):
        """Folds in the statistics due this step and, with
        `inverse_method="ekfac"`, the scalings when `scalings_due()`.

        When this step also decomposes the factors (`decompose_first`), the
        decomposition runs here, after the statistics and before the scalings
        estimate, so the estimate is made in the new eigenbasis (and used by
        this step's update); `maybe_update_inverses` then skips the step.

        Args:
            factor_estimates: callable returning the `(variable, estimate)`
                pairs of `record_estimates` over the whole batch (under a
                multi-replica strategy, the replicas' example-weighted mean).
            scaling_estimates: callable returning the `(block, estimate)`
                pairs of `record_scalings` over the whole batch; called after
                the decomposition, in the basis it leaves.
            decompose_first: `decomposes_before_scalings()` read before the
                statistics update: a bool tensor, or a Python bool where the
                caller knows its value (the XLA-compiled part of a
                `jit_compile` step on CPU runs only where it is False).
                Defaults to False.

        Returns:
            A True scalar tensor (for `tf.cond`).
        """
        def statistics():
            self.fold_estimates(factor_estimates())
            return tf.constant(True)

        if self.options.inverse_method != "ekfac":
            return statistics()

        def scalings():
            if decompose_first is True:
                self.update_inverses()
            elif decompose_first is not False:
                tf.cond(decompose_first, self.update_inverses, lambda: tf.constant(False))
            self.fold_scalings(scaling_estimates())
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

    def maybe_update_inverses(self, statistics_updated, decomposed_first=False):
        """Runs `update_inverses` when `inverses_due`; returns whether it ran.

        Args:
            statistics_updated: bool tensor, this step's statistics update
                ran and was kept (the guard's `updated`).
            decomposed_first: the `decompose_first` given to
                `update_curvature_from` this step: when it held and the update
                was kept, the factors are already decomposed. Defaults to False.
        """
        due = self.inverses_due(statistics_updated)
        if decomposed_first is not False:
            done = tf.logical_and(statistics_updated, decomposed_first)
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

