"""The K-FAC optimizer: a `keras.optimizers.Optimizer` subclass."""

import math
import numbers
import random

import keras
import tensorflow as tf
from absl import logging

from kfac_keras import checkpointing
from kfac_keras import damping as damping_lib
from kfac_keras import distributed
from kfac_keras import guards
from kfac_keras import linalg
from kfac_keras import losses as losses_lib
from kfac_keras import quadratic_model
from kfac_keras import registration as registration_lib
from kfac_keras.blocks.base import EstimateRecorder, ema_assign

_MISSING_CAPTURE = (
    "KFAC needs the layer inputs and pre-activation gradients of each training "
    "step, which Keras's default train step does not provide. Add the K-FAC "
    "callback to fit:\n\n"
    "    model.fit(x, y, ..., callbacks=[kfac_keras.KFACCallback()])\n\n"
    "or, in a custom training loop, build the step with "
    "`step = kfac_keras.make_train_step(model, optimizer, loss)` and call "
    "`step(x, y)` instead of `optimizer.apply_gradients(...)`."
)


def _check_number(name, value, low=None, high=None, low_open=False,
                  high_open=False, allow_schedule=False, integer=False):
    """Validates a numeric option; raises ValueError/TypeError naming it."""
    if allow_schedule and (isinstance(value, keras.optimizers.schedules.LearningRateSchedule)
                           or callable(value)):
        return value
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            integer and not isinstance(value, numbers.Integral)):
        raise TypeError(
            f"`{name}` must be {kind}"
            + (" or a keras.optimizers.schedules.LearningRateSchedule" if allow_schedule else "")
            + f"; received {value!r} of type {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite; received {value!r}.")
    if integer and abs(value) > 2**31 - 1:
        raise ValueError(f"`{name}` must be at most {2**31 - 1} in magnitude; received {value!r}.")
    if not integer:
        guards.check_float32_number(name, value)
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        interval = ("(" if low_open else "[") + f"{lo}, {hi}" + (")" if high_open else "]")
        raise ValueError(f"`{name}` must be in {interval}; received {value!r}.")
    return value


#: Fisher approximations across layers (`KFAC(approximation=...)`).
APPROXIMATIONS = ("block_diagonal", "tridiagonal")

#: What `KFAC(norm_constraint="auto")` means with a learning-rate step.
DEFAULT_NORM_CONSTRAINT = 1e-4
#: What `KFAC(adaptive="auto")` means when `damping` is a number:
#: Levenberg-Marquardt damping adaptation with a floor (below it, the damping
#: that the Cholesky inverses use, refreshed every `inv_update_every` steps,
#: lags too far behind the rule on the benchmarks), run every 10 steps (as
#: good as every 5 on the benchmarks, at half the cost of its extra passes);
#: see docs/benchmarks.md.
DEFAULT_ADAPTIVE = dict(adapt_damping=True, min_damping=1e-3, damping_update_every=10)


def _schedule_value(schedule, step):
    """A schedule's value at `step`, as a Python float."""
    return float(keras.ops.convert_to_numpy(schedule(step)))


def _serialize_schedule(value):
    if guards.is_keras_schedule(value):
        return keras.optimizers.schedules.serialize(value)
    return value


class _Diagnostics:
    """Per-step values for the logs (`KFAC.logged_values`). Plain TensorFlow
    variables, deliberately not optimizer variables: they are not part of
    checkpoints, and may hold NaN (`rho` when undefined) without tripping
    the non-finite guards, which watch the optimizer's variables."""

    def __init__(self):
        self.update_norm = tf.Variable(0.0, trainable=False, name="kfac_update_norm")
        self.rho = tf.Variable(float("nan"), trainable=False, name="kfac_rho")
        self.qmodel_change = tf.Variable(0.0, trainable=False, name="kfac_qmodel_change")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}; received {value!r}.")
    return value


def _divide_gradient(grad, divisor):
    """`grad / divisor`, keeping a `tf.IndexedSlices` sparse."""
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values / divisor, grad.indices, grad.dense_shape)
    return grad / divisor


@keras.saving.register_keras_serializable(package="kfac_keras")
class KFAC(keras.optimizers.Optimizer):
    """K-FAC: natural-gradient steps with a Kronecker-factored Fisher.

    Martens & Grosse 2015, "Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature". Each step preconditions the gradient with the
    damped inverse of a block-diagonal approximation of the Fisher, one block
    per layer (`A (x) G` for Dense layers, a diagonal for other variables),
    then applies momentum:

        velocity = momentum * velocity - learning_rate * (F + damping I)^{-1} grad
        variable = variable + velocity

    The optimizer needs to see each step's layer inputs and pre-activation
    gradients, so training must go through `kfac_keras.KFACCallback` (for
    `model.fit`) or `kfac_keras.make_train_step` (custom loops); the first
    step raises an error that says so if neither is used.

    Cost per step (n = layer width, B = batch size): preconditioning
    `O(n_in n_out (n_in + n_out))` every step, factor statistics `O(B n^2)`
    every `cov_update_every` steps, decompositions `O(n^3)` every
    `inv_update_every` steps (outside XLA on CPU, inside XLA on GPU).

    Defaults (chosen on the benchmarks of docs/benchmarks.md): a
    learning-rate step of 1.0 with momentum 0.9, "KL clipping"
    (`norm_constraint`) at 1e-4, which sets the step length in most steps,
    and Levenberg-Marquardt adaptation of the damping every 10 steps
    (initial 1e-2, floor 1e-3). `KFAC(adaptive=None, norm_constraint=None, learning_rate=...)` is
    the plain fixed-damping update above.

    The rest of the paper's algorithm is available through a few grouped
    options:

    * `approximation="tridiagonal"`: block-tridiagonal inverse over chains of
      Dense layers (section 4.3; `kfac_keras.blocks.tridiagonal`).
    * `adaptive=kfac_keras.AdaptiveOptions(...)`: step size and momentum
      from the quadratic model with exact Fisher products (section 7) and/or
      Levenberg-Marquardt damping (section 6.5); see
      `kfac_keras.quadratic_model` and `kfac_keras.damping`.
    * `norm_constraint=c`: "KL clipping" of the step (Ba et al. 2017).
    * `inverse_method="ekfac"`: the eigenvalue-corrected diagonal of George
      et al. 2018 (`kfac_keras.blocks.kronecker`).
    * `learning_rate`, `momentum` and `damping` accept Keras
      `LearningRateSchedule`s (evaluated at `optimizer.iterations`) where
      they are not adaptive.

    The current damping, the update norm and, when enabled, `rho`, `alpha`,
    `mu` and the quadratic model's predicted change are added to the logs of
    `fit` (progress bar, History, TensorBoard) and of the custom-loop step;
    see `logged_values`.

    Reliability (`kfac_keras.guards`, `kfac_keras.checkpointing`): a batch
    whose loss, gradients or statistics are NaN/Inf is skipped without
    changing any variable (`skipped_steps` counts such steps and is logged
    as `kfac_skipped_steps`); a decomposition that fails keeps the previous
    one and multiplies the damping by 10. `model.save` / `load_model`,
    `load_weights`, `BackupAndRestore` and `tf.train.Checkpoint` restore the
    whole K-FAC state, even though the blocks' variables are only created
    when the optimizer is attached to the model at the start of training.

    Args:
        learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`,
            the step size applied to the preconditioned gradient (before the
            norm constraint, which usually sets the step length). Defaults to
            None, meaning 1.0 (must stay None with
            `AdaptiveOptions(quadratic_model_step=True)`, which chooses the
            step size itself; `optimizer.learning_rate` then reads the last
            `alpha`).
        momentum: float in [0, 1) or a `LearningRateSchedule`, heavy-ball
            momentum. Defaults to None, meaning 0.9 (must stay None with
            `quadratic_model_step`, which chooses `mu`).
        damping: float > 0 or a `LearningRateSchedule`, the Tikhonov damping
            `lambda` added to the Fisher. Larger values make steps shorter
            and more gradient-like. With `AdaptiveOptions(adapt_damping=True)`
            (the default, `adaptive="auto"`) it is the initial value (a
            number). Defaults to 1e-2.
        l2_reg: float >= 0, coefficient `eta` of an L2 penalty
            `(eta / 2) ||theta||^2` that K-FAC adds to the objective: `eta *
            theta` is added to the gradient and `eta` to the damping (the
            total damping is `lambda + eta`, KFAC_NOTES section 3). Do not also
            add it as a Keras regularizer. Defaults to 0.
        factor_decay: float in [0, 1), the largest weight of the old value in
            the factors' moving average; estimate `k` uses
            `min(1 - 1/k, factor_decay)`, so the first estimate counts fully.
            Defaults to 0.95.
        cov_update_every: int >= 1, `T_cov`: factor statistics are computed
            every this many steps. Defaults to 10.
        inv_update_every: int >= 1, `T_inv`: factors are decomposed every this
            many steps (and after each of the first 3 statistics updates).
            Defaults to 20.
        statistics_fraction: float in (0, 1], the fraction of each batch
            (its first examples) used for factor statistics. Defaults to 1.0.
        estimation_mode: `"fisher"` (default) samples targets from the model's
            predictive distribution (the true Fisher); `"empirical"` uses the
            training labels (the empirical Fisher, a worse approximation).
        inverse_method: `"cholesky"` (default) or `"inverse"`: factored
            Tikhonov damping with the pi adjustment, inverses stored
            explicitly; `"eigh"`: exact damping of each Kronecker product in
            the eigenbasis (twice the preconditioning cost, and `eigh` is
            ~4x slower than Cholesky: use `inv_update_every` >= 50 on CPU);
            `"ekfac"` (George et al. 2018): the `"eigh"` eigenbasis with the
            diagonal re-estimated from per-example gradients every
            `scale_update_every` steps (layers whose block cannot provide
            per-example gradients fall back as for other unsupported
            options; see the registration report).
        layer_blocks: optional dict mapping a layer name or layer class name
            to a block kind: `"auto"`, `"kronecker"`, `"diagonal"` or
            `"identity"` (plain gradient). Defaults to None (all `"auto"`).
        exclude_layers: optional list of layer names or class names trained
            with the plain gradient. Defaults to None.
        seed: optional int, seed for sampling Fisher targets. Sampling is
            stateless, keyed by `(seed, step)`, so a resumed run draws the same
            targets. Defaults to None (a seed drawn at construction; it is
            not part of the config, so pass a seed for reproducible runs).
        decomposition_jit_compile: `"auto"` (default: XLA on GPU, not on CPU),
            True or False: whether factor decompositions run in XLA.
        approximation: `"block_diagonal"` (default) or `"tridiagonal"`
            (paper section 4.3): chains of Dense layers (each layer's input
            is the previous layer's output) get one block-tridiagonal block;
            other layers keep their blocks, and the registration report
            names the chains found. Needs `inverse_method` `"cholesky"` or
            `"inverse"` (factored Tikhonov damping, applied to the diagonal
            factors before forming the off-diagonal terms).
        adaptive: `"auto"` (default), None, a `kfac_keras.AdaptiveOptions`
            or a dict of its arguments: quadratic-model step size and momentum
            and/or Levenberg-Marquardt damping. `"auto"` means
            `AdaptiveOptions(adapt_damping=True, min_damping=1e-3,
            damping_update_every=10)` (the floor
            is `damping` itself if that is smaller) when `damping` is a
            number, and None when it is a schedule or `weight_decay` /
            `ema_overwrite_frequency` is set. None keeps the damping
            fixed and needs no extra forward passes. Adaptive options are not
            combinable with `weight_decay` or `ema_overwrite_frequency` (they
            change the weights outside the quadratic model).
        norm_constraint: `"auto"` (default), None, or float c > 0: "KL clipping" (Ba,
            Grosse & Martens 2017, "Distributed Second-Order Optimization
            using Kronecker-Factored Approximations"). The
            preconditioned gradient `Delta = (Fhat + lambda + eta)^{-1} grad`
            is scaled by `min(1, sqrt(c / (lr^2 Delta^T (Fhat + lambda + eta)
            Delta)))`, so that `lr^2 Delta^T Fhat Delta <= c` (with the damped
            `Fhat` the preconditioner inverts); momentum is added after.
            Not available with `quadratic_model_step`. `"auto"` means 1e-4
            with a learning-rate step and None with `quadratic_model_step`;
            None turns the constraint off (the plain `learning_rate` step).
        scale_update_every: int >= 1 or None, `T_scale` of EKFAC: the
            corrected diagonal is re-estimated every this many steps. Only
            with `inverse_method="ekfac"`. Defaults to None (=
            `cov_update_every`).
        distributed_inverses: bool. Under a `tf.distribute` strategy with
            more than one replica (`kfac_keras.distributed`), False (default)
            has every worker decompose every block at each `inv_update_every`
            step (no communication); True shares the blocks out over the
            replicas (greedy balance of the `n^3` cost), each decomposes only
            its share, and one all-reduce of the blocks' whole state (factors
            and decompositions, zero-padded: `sum_blocks state floats` x 4
            bytes, e.g. `2 (d_in^2 + d_out^2)` floats per Dense block with
            Cholesky) per `T_inv` step gives everyone the results. On CPU
            the replicated mode is as fast or faster (measured in the README),
            hence the default. With one replica the option changes nothing.
        name: string, the optimizer name. Defaults to `"kfac"`.
        **kwargs: the base optimizer's arguments (`weight_decay`, `clipnorm`,
            `clipvalue`, `global_clipnorm`, `use_ema`, `ema_momentum`,
            `ema_overwrite_frequency`, `loss_scale_factor`). Clipping applies
            to the preconditioned gradient (before the norm constraint,
            the quadratic model and momentum).
            `gradient_accumulation_steps` is not supported.
    """

    def __init__(
        self,
        learning_rate=None,
        momentum=None,
        damping=1e-2,
        l2_reg=0.0,
        factor_decay=0.95,
        cov_update_every=10,
        inv_update_every=20,
        statistics_fraction=1.0,
        estimation_mode="fisher",
        inverse_method="cholesky",
        layer_blocks=None,
        exclude_layers=None,
        seed=None,
        decomposition_jit_compile="auto",
        approximation="block_diagonal",
        adaptive="auto",
        norm_constraint="auto",
        scale_update_every=None,
        distributed_inverses=False,
        name="kfac",
        **kwargs,
    ):
        if kwargs.get("gradient_accumulation_steps"):
            raise ValueError(
                "`gradient_accumulation_steps` is not supported by KFAC: its "
                "factor statistics and step counters are per step; use a "
                "larger batch or `statistics_fraction` instead (received "
                f"gradient_accumulation_steps={kwargs['gradient_accumulation_steps']!r}).")
        adaptive, norm_constraint = self._resolve_auto_options(
            adaptive, norm_constraint, damping, kwargs)
        learning_rate, momentum = self._check_step_rule(
            learning_rate, momentum, damping, adaptive, norm_constraint, kwargs)
        _check_choice("approximation", approximation, APPROXIMATIONS)
        _check_choice("inverse_method", inverse_method, linalg.INVERSE_METHODS)
        if approximation == "tridiagonal" and inverse_method not in ("cholesky", "inverse"):
            raise ValueError(
                "approximation='tridiagonal' uses factored Tikhonov damping: "
                "`inverse_method` must be 'cholesky' or 'inverse'; received "
                f"{inverse_method!r}.")
        if scale_update_every is not None:
            _check_number("scale_update_every", scale_update_every, low=1, integer=True)
            if inverse_method != "ekfac":
                raise ValueError(
                    "`scale_update_every` is EKFAC's T_scale and needs "
                    f"inverse_method='ekfac'; received inverse_method={inverse_method!r}.")
        _check_number("l2_reg", l2_reg, low=0.0)
        _check_number("factor_decay", factor_decay, low=0.0, high=1.0, high_open=True)
        _check_number("cov_update_every", cov_update_every, low=1, integer=True)
        _check_number("inv_update_every", inv_update_every, low=1, integer=True)
        _check_number("statistics_fraction", statistics_fraction, low=0.0,
                      high=1.0, low_open=True)
        _check_choice("estimation_mode", estimation_mode, losses_lib.ESTIMATION_MODES)
        _check_choice("inverse_method", inverse_method, linalg.INVERSE_METHODS)
        layer_blocks = self._check_layer_blocks(layer_blocks)
        exclude_layers = self._check_exclude_layers(exclude_layers)
        if seed is not None:
            _check_number("seed", seed, low=0, integer=True)
        if not isinstance(distributed_inverses, bool):
            raise TypeError(
                "`distributed_inverses` must be a bool; received "
                f"{distributed_inverses!r} of type {type(distributed_inverses).__name__}.")
        if decomposition_jit_compile not in ("auto", True, False):
            raise ValueError(
                "`decomposition_jit_compile` must be 'auto', True or False; "
                f"received {decomposition_jit_compile!r}.")
        guards.check_name(name)
        guards.check_base_optimizer_arguments(kwargs)
        if not (guards.is_keras_schedule(learning_rate) or callable(learning_rate)):
            learning_rate = float(learning_rate)  # Keras accepts only a Python float.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = momentum  # float, schedule, or None with quadratic_model_step
        self.damping_schedule = damping if guards.is_keras_schedule(damping) else None
        self.initial_damping = (
            _schedule_value(damping, 0) if self.damping_schedule is not None else float(damping))
        self.approximation = approximation
        self.adaptive = adaptive
        self.norm_constraint = None if norm_constraint is None else float(norm_constraint)
        self.scale_update_every = (
            None if scale_update_every is None else int(scale_update_every))
        self._damping_factor = (
            damping_lib.adjustment_factor(int(adaptive.damping_update_every))
            if adaptive is not None and adaptive.adapt_damping else None)
        self._diagnostics = None
        self.l2_reg = float(l2_reg)
        self.factor_decay = float(factor_decay)
        self.cov_update_every = int(cov_update_every)
        self.inv_update_every = int(inv_update_every)
        self.statistics_fraction = float(statistics_fraction)
        self.estimation_mode = estimation_mode
        self.inverse_method = inverse_method
        self.layer_blocks = layer_blocks
        self.exclude_layers = exclude_layers
        self.seed = int(seed) if seed is not None else None
        self._sampling_seed = (
            self.seed if seed is not None else random.SystemRandom().randrange(2**31 - 1))
        self.decomposition_jit_compile = decomposition_jit_compile
        self.distributed_inverses = distributed_inverses
        self._registration = None
        self._decompose_fn = None

    @staticmethod
    def _check_layer_blocks(layer_blocks):
        if layer_blocks is None:
            return {}
        if not isinstance(layer_blocks, dict):
            raise TypeError(
                "`layer_blocks` must be a dict from layer name or class name to "
                f"one of {registration_lib.BLOCK_KINDS}; received "
                f"{layer_blocks!r} of type {type(layer_blocks).__name__}.")
        for key, kind in layer_blocks.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"`layer_blocks` keys must be strings; received {key!r}.")
            if kind not in registration_lib.BLOCK_KINDS:
                raise ValueError(
                    f"`layer_blocks[{key!r}]` must be one of "
                    f"{registration_lib.BLOCK_KINDS}; received {kind!r}.")
        return dict(layer_blocks)

    @staticmethod
    def _check_exclude_layers(exclude_layers):
        if exclude_layers is None:
            return []
        if isinstance(exclude_layers, str) or not isinstance(exclude_layers, (list, tuple)):
            raise TypeError(
                "`exclude_layers` must be a list of layer names or class names; "
                f"received {exclude_layers!r}.")
        for name in exclude_layers:
            if not isinstance(name, str):
                raise TypeError(
                    f"`exclude_layers` entries must be strings; received {name!r}.")
        return list(exclude_layers)

    # ------------------------------------------------------------------ state
    def build(self, variables):
        """Creates the momentum slots and the K-FAC counters."""
        if self.built:
            return
        super().build(variables)
        self.velocities = self.add_optimizer_variables(variables, "velocity")
        self.damping = self.add_variable(
            (), initializer=keras.initializers.Constant(self.initial_damping),
            dtype="float32", name="damping")
        self.num_estimates = self.add_variable(
            (), initializer="zeros", dtype="float32", name="num_estimates")
        # Steps skipped by the non-finite guard (kfac_keras/guards.py).
        self.skipped_steps = self.add_variable(
            (), initializer="zeros", dtype="int64", name="skipped_steps")
        if self.uses_quadratic_model_step:
            # mu of the last step (alpha is kept in the learning-rate variable).
            self.step_momentum = self.add_variable(
                (), initializer="zeros", dtype="float32", name="step_momentum")
        self._diagnostics = _Diagnostics()

    @property
    def registration(self):
        """The `Registration` in use, or None before `attach`."""
        return self._registration

    def attach(self, model):
        """Registers `model`'s layers and creates the K-FAC state.

        Called by `KFACCallback` and `make_train_step`; calling it again with
        the same model is a no-op.

        Args:
            model: the built Keras model this optimizer trains.

        Returns:
            The `Registration`.
        """
        if self._registration is not None:
            if self._registration.model is model:
                return self._registration
            raise ValueError(
                "This KFAC optimizer is already attached to model "
                f"{self._registration.model.name!r}; use one optimizer per model.")
        if not self.built:
            self.build(model.trainable_variables)
        registration = registration_lib.register(
            model, inverse_method=self.inverse_method,
            layer_blocks=self.layer_blocks, exclude_layers=self.exclude_layers,
            approximation=self.approximation)
        known = {id(v) for v in self._trainable_variables}
        missing = [v.path for v in model.trainable_variables if id(v) not in known]
        if missing:
            raise ValueError(
                f"The optimizer was built for other variables; {missing} are "
                "unknown to it. Build the model before compiling, or use a new "
                "KFAC instance.")
        for block in registration.blocks:
            block.build(self)
        self._registration = registration
        checkpointing.restore_pending(self)  # state loaded before attach
        logging.info("%s", registration.report())
        return registration

    # ------------------------------------------------------------ schedule
    def _step(self):
        return tf.cast(tf.convert_to_tensor(self.iterations), tf.int64)

    def statistics_due(self):
        """Bool tensor: this step updates the factor statistics."""
        return tf.equal(self._step() % self.cov_update_every, 0)

    def sampling_seed(self):
        """Shape-(2,) int32 seed for this step's Fisher targets."""
        step = tf.cast(self._step() % (2**31 - 1), tf.int32)
        return tf.stack([tf.constant(self._sampling_seed % (2**31 - 1), tf.int32), step])

    def total_damping(self):
        """`lambda + eta`, the damping every block uses."""
        return tf.convert_to_tensor(self.damping) + self.l2_reg

    # ------------------------------------------------------------ curvature
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
        for block, (captures, sampled_grads) in zip(self._registration.blocks, block_inputs):
            block.update_statistics(captures, sampled_grads, num_examples, decay)

    def _next_estimate_decay(self):
        """Counts one more estimate; returns its moving-average weight of the
        old value, `min(1 - 1/k, factor_decay)`."""
        self.num_estimates.assign_add(1.0)
        count = tf.convert_to_tensor(self.num_estimates)
        return tf.minimum(1.0 - 1.0 / count, self.factor_decay)

    def record_estimates(self, block_inputs, num_examples):
        """Every block's new estimates, without folding them into the factors.

        Args: as for `update_statistics`.

        Returns:
            A list of `(state variable, estimate)` pairs, for `fold_estimates`
            (after averaging the estimates over replicas).
        """
        recorder = EstimateRecorder()
        for block, (captures, sampled_grads) in zip(self._registration.blocks, block_inputs):
            block.update_statistics(captures, sampled_grads, num_examples, recorder)
        return recorder.pairs

    def fold_estimates(self, estimates):
        """Folds estimates recorded by `kfac_keras.blocks.base.EstimateRecorder`
        (already averaged over replicas) into the factors, as
        `update_statistics` does with the estimates it computes.

        Args:
            estimates: list of `(variable, estimate)` pairs.
        """
        decay = self._next_estimate_decay()
        for variable, estimate in estimates:
            ema_assign(variable, estimate, decay)

    def scalings_due(self):
        """Bool tensor: EKFAC re-estimates its corrected diagonal this step."""
        every = self.scale_update_every or self.cov_update_every
        return tf.equal(self._step() % every, 0)

    def curvature_pass_due(self):
        """Bool tensor: this step needs the sampled-loss backward pass (factor
        statistics, or EKFAC's corrected diagonal)."""
        if self.inverse_method != "ekfac":
            return self.statistics_due()
        return tf.logical_or(self.statistics_due(), self.scalings_due())

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
        if self.inverse_method != "ekfac":
            self.update_statistics(block_inputs, num_examples)
            return tf.constant(True)

        def statistics():
            self.update_statistics(block_inputs, num_examples)
            return tf.constant(True)

        def scalings():
            tf.cond(self.inverses_due(self.statistics_due()), self.update_inverses,
                    lambda: tf.constant(False))
            for block, (captures, _) in zip(self._registration.blocks, block_inputs):
                if block.uses_eigenbasis_scalings:
                    block.update_scalings(captures, num_examples, self.factor_decay)
            return tf.constant(True)

        tf.cond(self.statistics_due(), statistics, lambda: tf.constant(False))
        tf.cond(self.scalings_due(), scalings, lambda: tf.constant(False))
        return tf.constant(True)

    def inverses_due(self, statistics_updated):
        """Bool tensor: decompose the factors at this step."""
        periodic = tf.equal(self._step() % self.inv_update_every, 0)
        early = tf.logical_and(
            tf.logical_and(statistics_updated, self.statistics_due()),
            tf.convert_to_tensor(self.num_estimates) <= 3.0)
        return tf.logical_or(periodic, early)

    def _decompose(self):
        damping = self.total_damping()
        strategy = tf.distribute.get_strategy()
        if (self.distributed_inverses and tf.distribute.in_cross_replica_context()
                and strategy.num_replicas_in_sync > 1):
            distributed.decompose_distributed(strategy, self, damping)
        else:
            guards.guarded_update_inverses(self, damping)  # failed block: keep, raise damping
        return tf.constant(True)

    def update_inverses(self):
        """Decomposes every block's factors now (device-aware XLA choice)."""
        if self._decompose_fn is None:
            use_jit = linalg.decomposition_jit(self.decomposition_jit_compile)
            if use_jit:
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
        if self.inverse_method == "ekfac":
            done = tf.logical_and(statistics_updated, self.scalings_due())
            due = tf.logical_and(due, tf.logical_not(done))
        return tf.cond(due, self.update_inverses, lambda: tf.constant(False))

    def precondition(self, grads, trainable_variables):
        """Returns `(F + damping I)^{-1} (grad + l2_reg * theta)` per variable."""
        registration = self._registration
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
            if not (isinstance(grad, tf.IndexedSlices) and not self.l2_reg
                    and block.accepts_indexed_slices):
                grad = tf.convert_to_tensor(grad)  # sparse rows only for blocks that take them
            if self.l2_reg:
                grad = grad + self.l2_reg * tf.cast(variable, grad.dtype)
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

    # ------------------------------------------------- step rule (paper 6-7)
    @staticmethod
    def _resolve_auto_options(adaptive, norm_constraint, damping, kwargs):
        """Replaces the `"auto"` defaults of `adaptive` and `norm_constraint`
        by what they mean for these options; returns `(adaptive, norm_constraint)`
        with `adaptive` an `AdaptiveOptions` or None."""
        if isinstance(adaptive, str):
            if adaptive != "auto":
                raise TypeError(
                    "`adaptive` must be 'auto', None, a kfac_keras.AdaptiveOptions "
                    f"or a dict of its arguments; received {adaptive!r}.")
            if guards.is_keras_schedule(damping) or any(
                    kwargs.get(n) for n in ("weight_decay", "ema_overwrite_frequency")):
                # The damping follows the user's schedule, or the weights change
                # outside the quadratic model that judges the damping.
                adaptive = None
            else:
                adaptive = dict(DEFAULT_ADAPTIVE)
                if (isinstance(damping, numbers.Real) and not isinstance(damping, bool)
                        and 0 < damping < adaptive["min_damping"]):
                    adaptive["min_damping"] = float(damping)
        adaptive = quadratic_model.AdaptiveOptions.from_value(adaptive)
        if isinstance(norm_constraint, str):
            if norm_constraint != "auto":
                raise TypeError(
                    "`norm_constraint` must be 'auto', None or a number > 0; "
                    f"received {norm_constraint!r}.")
            model_step = adaptive is not None and adaptive.quadratic_model_step
            norm_constraint = None if model_step else DEFAULT_NORM_CONSTRAINT
        return adaptive, norm_constraint

    @staticmethod
    def _check_step_rule(learning_rate, momentum, damping, adaptive,
                         norm_constraint, kwargs):
        """Validates the step-size options together; returns `(lr, momentum)`."""
        model_step = adaptive is not None and adaptive.quadratic_model_step
        if model_step:
            given = [n for n, v in (("learning_rate", learning_rate),
                                    ("momentum", momentum)) if v is not None]
            if given:
                raise ValueError(
                    "AdaptiveOptions(quadratic_model_step=True) chooses the step "
                    "size and momentum from the quadratic model; do not pass "
                    f"{' or '.join(f'`{n}`' for n in given)} (received "
                    + ", ".join(f"{n}={v!r}" for n, v in (("learning_rate", learning_rate),
                                                          ("momentum", momentum))
                                if v is not None) + ").")
            if norm_constraint is not None:
                raise ValueError(
                    "`norm_constraint` has no effect with "
                    "AdaptiveOptions(quadratic_model_step=True): the step length "
                    f"comes from the quadratic model; received norm_constraint="
                    f"{norm_constraint!r}.")
            learning_rate = 1.0  # placeholder variable; holds alpha after each step
        else:
            learning_rate = 1.0 if learning_rate is None else learning_rate
            momentum = 0.9 if momentum is None else momentum
            _check_number("learning_rate", learning_rate, low=0.0, low_open=True,
                          allow_schedule=True)
            if not guards.is_keras_schedule(momentum):
                _check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
                momentum = float(momentum)
        if guards.is_keras_schedule(damping):
            if adaptive is not None and adaptive.adapt_damping:
                raise ValueError(
                    "AdaptiveOptions(adapt_damping=True) adapts the damping; "
                    "`damping` must be its initial value (a number), not a "
                    f"schedule; received {damping!r}.")
        else:
            _check_number("damping", damping, low=0.0, low_open=True)
            if adaptive is not None and adaptive.adapt_damping and not (
                    adaptive.min_damping <= damping <= adaptive.max_damping):
                raise ValueError(
                    f"`damping` ({damping!r}) must lie in [min_damping, max_damping]"
                    f" = [{adaptive.min_damping!r}, {adaptive.max_damping!r}] "
                    "of AdaptiveOptions.")
        if norm_constraint is not None:
            _check_number("norm_constraint", norm_constraint, low=0.0, low_open=True)
        if adaptive is not None:
            conflicting = [n for n in ("weight_decay", "ema_overwrite_frequency")
                           if kwargs.get(n)]
            if conflicting:
                raise ValueError(
                    f"`adaptive` cannot be combined with {conflicting}: they change "
                    "the weights outside the quadratic model that chooses the step "
                    "and judges it; use `l2_reg` instead of `weight_decay`.")
        return learning_rate, momentum

    @property
    def uses_quadratic_model_step(self):
        """True if `alpha` and `mu` come from the quadratic model (section 7)."""
        return self.adaptive is not None and self.adaptive.quadratic_model_step

    @property
    def adapts_damping(self):
        """True if the damping follows the Levenberg-Marquardt rule (section 6.5)."""
        return self.adaptive is not None and self.adaptive.adapt_damping

    @property
    def needs_batch(self):
        """True if the update needs the batch again (exact Fisher products or
        the loss after the step), i.e. any `adaptive` option."""
        return self.adaptive is not None

    def begin_step(self):
        """Per-step work before the decompositions: writes a damping schedule's
        value for this step into the `damping` variable."""
        if self.damping_schedule is not None:
            self.damping.assign(tf.cast(
                self.damping_schedule(self.iterations), self.damping.dtype))
        return tf.constant(True)

    def damping_adaptation_due(self):
        """Bool tensor: the Levenberg-Marquardt rule runs after this step."""
        return tf.equal(self._step() % self.adaptive.damping_update_every, 0)

    def current_momentum(self):
        """The momentum coefficient of this step (`mu` with the quadratic model)."""
        if self.uses_quadratic_model_step:
            return tf.convert_to_tensor(self.step_momentum)
        if guards.is_keras_schedule(self.momentum):
            return tf.cast(self.momentum(self.iterations), tf.float32)
        return self.momentum

    def logged_values(self):
        """The K-FAC quantities added to the step's logs, as tensors.

        Always `damping` (the current `lambda`) and `update_norm` (the norm of
        the last update `delta`); with `adapt_damping`, `rho` (last reduction
        ratio; NaN when undefined) and `qmodel_change` (the last predicted
        change `M(delta) - M(0)` of the undamped model); with
        `quadratic_model_step`, also `alpha` and `mu` of the last step
        (`qmodel_change` is then updated every step).
        """
        values = {"damping": tf.convert_to_tensor(self.damping),
                  "update_norm": tf.convert_to_tensor(self._diagnostics.update_norm)}
        if self.adapts_damping:
            values["rho"] = tf.convert_to_tensor(self._diagnostics.rho)
        if self.adaptive is not None:
            values["qmodel_change"] = tf.convert_to_tensor(self._diagnostics.qmodel_change)
        if self.uses_quadratic_model_step:
            values["alpha"] = tf.cast(self.learning_rate, tf.float32)
            values["mu"] = tf.convert_to_tensor(self.step_momentum)
        return values

    def _norm_constraint_scale(self, full_grads, preconditioned):
        """`min(1, sqrt(c / (lr^2 Delta^T grad)))`; `Delta^T grad = Delta^T (Fhat +
        lambda + eta) Delta` for the preconditioned gradient `Delta`."""
        learning_rate = tf.cast(self._get_current_learning_rate(), tf.float32)
        quadratic = quadratic_model.dot(preconditioned, full_grads)
        size = tf.square(learning_rate) * quadratic
        positive = size > 0.0
        return tf.where(
            positive,
            tf.minimum(1.0, tf.sqrt(self.norm_constraint / tf.where(positive, size, 1.0))),
            1.0)

    def _choose_step_coefficients(self, full_grads, preconditioned, previous,
                                  variables, batch):
        """Section 7: sets `alpha` (learning-rate variable) and `mu`; returns the
        undamped model's predicted change for this step."""
        direction = [-p for p in preconditioned]
        fisher = batch.fisher_gram([direction, previous], variables)
        dot = quadratic_model.dot
        cross = dot(direction, previous)
        norms = tf.stack([tf.stack([dot(direction, direction), cross]),
                          tf.stack([cross, dot(previous, previous)])])
        linear = tf.stack([dot(full_grads, direction), dot(full_grads, previous)])
        curvature = fisher + self.total_damping() * norms
        alpha, mu, _ = quadratic_model.solve_step_coefficients(
            curvature, linear, first_step=norms[1, 1] <= 0.0)
        self._learning_rate.assign(tf.cast(alpha, self._learning_rate.dtype))
        self.step_momentum.assign(mu)
        change = quadratic_model.quadratic_change(
            tf.stack([alpha, mu]), fisher, norms, linear, self.l2_reg)
        self._diagnostics.qmodel_change.assign(change)
        return change

    def _predicted_change_of_fixed_step(self, full_grads, preconditioned, previous,
                                        variables, batch):
        """`M(delta) - M(0)` (undamped) for the learning-rate + momentum step."""
        learning_rate = tf.cast(self._get_current_learning_rate(), tf.float32)
        momentum = tf.cast(self.current_momentum(), tf.float32)
        step = [momentum * tf.cast(v, tf.float32) - learning_rate * tf.cast(p, tf.float32)
                for v, p in zip(previous, preconditioned)]
        fisher = batch.fisher_gram([step], variables)[0, 0]
        dot = quadratic_model.dot
        change = 0.5 * (fisher + self.l2_reg * dot(step, step)) + dot(full_grads, step)
        self._diagnostics.qmodel_change.assign(change)
        return change

    def _adapt_damping(self, loss_before, predicted_change, updates, variables, batch):
        """Section 6.5: `rho` on the same batch, then the Levenberg-Marquardt rule."""
        loss_after = batch.loss()
        actual = loss_after - tf.cast(loss_before, tf.float32)
        if self.l2_reg:
            # (eta/2)(||theta + delta||^2 - ||theta||^2), from the new weights.
            dot = quadratic_model.dot
            actual += self.l2_reg * (dot(variables, updates) - 0.5 * dot(updates, updates))
        rho = damping_lib.reduction_ratio(actual, predicted_change)
        self.damping.assign(damping_lib.levenberg_marquardt_update(
            self.damping, rho, self._damping_factor,
            self.adaptive.min_damping, self.adaptive.max_damping))
        self._diagnostics.rho.assign(rho)
        return tf.constant(True)

    def apply_step(self, grads, trainable_variables, batch=None, loss=None):
        """The K-FAC update of one training step (used by `KFACTrainStep`).

        Preconditions, clips (the base optimizer's `clipnorm`/`clipvalue`/
        `global_clipnorm`, applied to the preconditioned gradient), applies the
        norm constraint or the quadratic-model coefficients, then the Keras
        update (`update_step`); with `adapt_damping`, every
        `damping_update_every` steps it evaluates the loss after the update on
        the same batch and adapts the damping.

        Args:
            grads: gradients of the (scaled) loss, aligned with
                `trainable_variables`; None entries are skipped.
            trainable_variables: the variables to update.
            batch: a `kfac_keras.quadratic_model.BatchQuadraticModel` for this
                step's batch; required when `adaptive` is set.
            loss: scalar tensor, the batch loss before the update (unscaled);
                required with `adapt_damping`.
        """
        if self._registration is None:
            raise RuntimeError(_MISSING_CAPTURE)
        if self.needs_batch and (batch is None or (self.adapts_damping and loss is None)):
            raise RuntimeError(
                f"KFAC(adaptive={self.adaptive!r}) (the default, adaptive='auto', "
                "adapts the damping) needs the training batch for exact Fisher "
                "products and the loss after the step; train with "
                "kfac_keras.KFACCallback (fit) or kfac_keras.make_train_step "
                "(custom loops) instead of calling apply/apply_gradients, or "
                "pass adaptive=None.")
        pairs = [(g, v) for g, v in zip(grads, trainable_variables) if g is not None]
        if not pairs:
            return
        # IndexedSlices (Embedding) reach `precondition` as they are: blocks
        # that precondition row by row then touch only the rows present.
        raw_grads = [g for g, _ in pairs]
        variables = [v for _, v in pairs]
        if self.loss_scale_factor is not None:
            raw_grads = [_divide_gradient(g, self.loss_scale_factor) for g in raw_grads]
        grads = [tf.convert_to_tensor(g) for g in raw_grads]  # dense, for the step rules
        full_grads = ([g + self.l2_reg * tf.cast(v, g.dtype) for g, v in zip(grads, variables)]
                      if self.l2_reg else grads)
        preconditioned = self._clip_gradients(self.precondition(raw_grads, variables))
        if self.norm_constraint is not None:
            coefficient = self._norm_constraint_scale(full_grads, preconditioned)
            preconditioned = [p * tf.cast(coefficient, p.dtype) for p in preconditioned]
        previous = [tf.convert_to_tensor(self.velocities[self._get_variable_index(v)])
                    for v in variables]
        predicted = None
        if self.adapts_damping:
            adapt_now = self.damping_adaptation_due()
        if self.uses_quadratic_model_step:
            predicted = self._choose_step_coefficients(
                full_grads, preconditioned, previous, variables, batch)
        elif self.adapts_damping:
            predicted = tf.cond(
                adapt_now,
                lambda: self._predicted_change_of_fixed_step(
                    full_grads, preconditioned, previous, variables, batch),
                lambda: tf.constant(0.0))
        if self.loss_scale_factor is not None:  # the base class divides by it
            preconditioned = [p * self.loss_scale_factor for p in preconditioned]
        super().apply(preconditioned, variables)
        updates = [tf.convert_to_tensor(self.velocities[self._get_variable_index(v)])
                   for v in variables]
        self._diagnostics.update_norm.assign(tf.sqrt(quadratic_model.dot(updates, updates)))
        if self.adapts_damping:
            tf.cond(adapt_now,
                    lambda: self._adapt_damping(loss, predicted, updates, variables, batch),
                    lambda: tf.constant(False))

    # ------------------------------------------------------------ Keras API
    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """Keras's per-variable update; under a multi-replica strategy K-FAC
        applies it in cross-replica context (`kfac_keras.distributed`), with
        gradients already summed over replicas, where Keras's version would
        look for a replica context to `merge_call` from."""
        if not tf.distribute.in_cross_replica_context():
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        pairs = [(g, v.value if isinstance(v, keras.Variable) else v)
                 for g, v in zip(grads, trainable_variables)]
        return self._distributed_tf_update_step(
            self._distribution_strategy, pairs, learning_rate)

    def _apply_weight_decay(self, variables):
        """Keras's decoupled weight decay, also in cross-replica context (see
        `_backend_update_step`)."""
        if self.weight_decay is None or not tf.distribute.in_cross_replica_context():
            return super()._apply_weight_decay(variables)
        for variable in variables:
            if self._use_weight_decay(variable):
                learning_rate = tf.cast(self.learning_rate, variable.dtype)
                weight_decay = tf.cast(self.weight_decay, variable.dtype)
                variable.assign_sub(variable * weight_decay * learning_rate)

    def apply(self, grads, trainable_variables=None):
        """Preconditions `grads` with the K-FAC blocks, then applies them.

        Raises a RuntimeError if the optimizer is not attached (see
        `KFACCallback` / `make_train_step`), or if `adaptive` options are set
        (they need the batch; use the K-FAC training step).
        """
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        return self.apply_step(list(grads), list(trainable_variables))

    def update_step(self, gradient, variable, learning_rate):
        """Momentum update with the already preconditioned gradient."""
        learning_rate = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        momentum = tf.cast(self.current_momentum(), variable.dtype)
        velocity = self.velocities[self._get_variable_index(variable)]
        self.assign(velocity, momentum * velocity - learning_rate * gradient)
        self.assign_add(variable, velocity)

    def load_own_variables(self, store):
        """Loads saved optimizer state, including K-FAC state that `attach`
        creates later (kept until then; see `kfac_keras.checkpointing`)."""
        checkpointing.load_optimizer_variables(self, store)

    def save_own_variables(self, store):
        """Saves the optimizer state, including loaded K-FAC state still
        waiting for `attach` (see `kfac_keras.checkpointing`)."""
        checkpointing.save_optimizer_variables(self, store)

    def get_config(self):
        config = super().get_config()
        if self.uses_quadratic_model_step:
            config["learning_rate"] = None  # chosen by the quadratic model
        config.update({
            "momentum": _serialize_schedule(self.momentum),
            "damping": (_serialize_schedule(self.damping_schedule)
                        if self.damping_schedule is not None else self.initial_damping),
            "approximation": self.approximation,
            "adaptive": None if self.adaptive is None else self.adaptive.get_config(),
            "norm_constraint": self.norm_constraint,
            "scale_update_every": self.scale_update_every,
            "l2_reg": self.l2_reg,
            "factor_decay": self.factor_decay,
            "cov_update_every": self.cov_update_every,
            "inv_update_every": self.inv_update_every,
            "statistics_fraction": self.statistics_fraction,
            "estimation_mode": self.estimation_mode,
            "inverse_method": self.inverse_method,
            "layer_blocks": dict(self.layer_blocks),
            "exclude_layers": list(self.exclude_layers),
            "seed": self.seed,
            "decomposition_jit_compile": self.decomposition_jit_compile,
            "distributed_inverses": self.distributed_inverses,
        })
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Inverse of `get_config`; also restores `damping`/`momentum` schedules."""
        config = dict(config)
        for key in ("damping", "momentum"):
            if isinstance(config.get(key), dict):
                config[key] = keras.optimizers.schedules.deserialize(
                    config[key], custom_objects=custom_objects)
        return super().from_config(config, custom_objects=custom_objects)
