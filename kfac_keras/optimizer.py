"""The K-FAC optimizer: a `keras.optimizers.Optimizer` subclass that keeps
Keras's API and orchestrates each step over `kfac_keras.options`,
`kfac_keras.curvature` (the curvature estimate), `kfac_keras.step_rules` and
`kfac_keras.adaptive_step` (the quadratic model and the damping rule).
"""

import dataclasses
import random

import keras
import tensorflow as tf
from absl import logging

from kfac_keras import checkpointing, keras_internals, orthogonal_step, step_rules
from kfac_keras import registration as registration_lib
from kfac_keras.adaptive_step import AdaptiveStep, StepDiagnostics
from kfac_keras.capture import MISSING_CAPTURE
from kfac_keras.curvature import CurvatureEstimator
from kfac_keras.options import KFACOptions
from kfac_keras.validation import is_schedule


def _delegate(name):
    """A `KFAC` method that calls the `CurvatureEstimator` method `name`."""
    def call(self, *args, **kwargs):
        return getattr(self.curvature, name)(*args, **kwargs)

    call.__name__ = name
    call.__doc__ = getattr(CurvatureEstimator, name).__doc__
    return call


def _option(name, doc):
    """A read-only attribute of `KFAC` that reads `KFAC.options`."""
    return property(lambda self: getattr(self.options, name), doc=doc)


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

    Defaults: `step_rule="orthogonal"` (each Kronecker matrix of the
    preconditioned gradient replaced by its scaled polar factor, learning
    rate 1e-2, momentum 0.9 after; chosen on the autoencoder, CNN, LM and MLP
    of tools/step_efficiency/RESULTS.md, where it took fewer steps and less
    time than the KL-clipped rule), with Levenberg-Marquardt adaptation of
    the damping every 10 steps (relative to each block's curvature, initial
    1.0, floor 1e-3, so the steps do not depend on the loss's scale).
    `KFAC(step_rule="kl_clip")` is the K-FAC step of earlier versions: a
    learning-rate step of 1.0 with momentum 0.9 and "KL clipping"
    (`norm_constraint`) at 1e-4, which sets the step length in most steps.
    `KFAC(step_rule="kl_clip", adaptive=None, norm_constraint=None,
    learning_rate=...)` is the plain fixed-damping update above.

    The rest of the paper's algorithm, and its successors, are options (see
    Args): `approximation="tridiagonal"` (section 4.3), `adaptive` (sections
    6.5 and 7; `kfac_keras.adaptive_step`), `norm_constraint` (Ba et al.
    2017) and `inverse_method="ekfac"` (George et al. 2018).

    The current damping, the update norm and, when enabled, `rho`, `alpha`,
    `mu`, the quadratic model's predicted change and `orthogonal_bound` are
    added to the logs of `fit` and of the custom-loop step; see `logged_values`.

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
            the step size applied to the orthogonalised direction (default
            `step_rule`) or to the preconditioned gradient after the norm
            constraint (`step_rule="kl_clip"`). Defaults to None, meaning
            1e-2 with `step_rule="orthogonal"` and 1.0 with `"kl_clip"` (must
            stay None with `AdaptiveOptions(quadratic_model_step=True)`, which
            chooses it; `optimizer.learning_rate` then reads the last `alpha`).
        momentum: float in [0, 1) or a `LearningRateSchedule`, the momentum
            `mu`. Defaults to None, meaning 0.9 (must stay None with
            `quadratic_model_step`, which chooses `mu`).
        nesterov: bool or None: Nesterov momentum (`v = mu v - lr Delta`, the
            update `mu v - lr Delta`) instead of heavy ball (the update `v`).
            Defaults to None, meaning True with `step_rule="orthogonal"` and
            False otherwise (refused with `quadratic_model_step`).
        damping: float > 0 or a `LearningRateSchedule`, the Tikhonov damping
            `lambda` added to the Fisher. Larger values make steps shorter
            and more gradient-like. With `AdaptiveOptions(adapt_damping=True)`
            (the default, `adaptive="auto"`) it is the initial value (a
            number). Defaults to None: 1.0 if relative, else 1e-2.
        damping_mode: `"absolute"` or `"relative"` (each block's damping is
            `lambda` times its mean eigenvalue: scale-free). Defaults to None:
            relative for `step_rule="orthogonal"` with `damping=None`, else
            absolute (README "Damping").
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
        estimation_mode: `"fisher"` (default): targets sampled from the model's
            predictive distribution (the true Fisher); `"curvature_propagation"`:
            random signs times the output Fisher's square root (its expectation,
            less noise; not with `DistributionLoss`); `"empirical"`: the labels.
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
            targets. Defaults to None: drawn at construction from Python's
            `random`, so `keras.utils.set_random_seed` makes runs repeat.
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
            damping_update_every=10)` (the floor is `damping` itself if that
            is smaller) when `damping` is a number, and None when it is a schedule or `weight_decay` /
            `ema_overwrite_frequency` is set (with a logged warning, since
            the damping then stays fixed; `l2_reg` keeps it adaptive), or the
            model has its own `train_step` (`kfac_keras.custom_step`). None
            keeps the damping fixed and needs no extra forward passes. Not
            combinable with `weight_decay` or `ema_overwrite_frequency` (they
            change the weights outside the quadratic model).
        norm_constraint: `"auto"` (default), None, or float c > 0: "KL
            clipping" (Ba, Grosse & Martens 2017, "Distributed Second-Order
            Optimization using Kronecker-Factored Approximations"). `Delta =
            (Fhat + lambda + eta)^{-1} grad` is scaled by `min(1, sqrt(c / (Delta^T (Fhat + lambda + eta)
            Delta)))`, so that `Delta^T Fhat Delta <= c` (with the damped
            `Fhat` the preconditioner inverts); the learning rate multiplies
            the clipped `Delta` (so it scales the step whether or not the
            bound binds; the logged `step_size` is their product), and
            momentum is added after. Not available with `quadratic_model_step`. `"auto"` means 1e-4
            with a learning-rate step and None with `quadratic_model_step`;
            None turns the constraint off (the plain `learning_rate` step).
            With `step_rule="orthogonal"` (the default) it bounds only the
            variables that are not orthogonalised.
        scale_update_every: int >= 1 or None, `T_scale` of EKFAC: the
            corrected diagonal is re-estimated every this many steps. Only
            with `inverse_method="ekfac"`. Defaults to None (=
            `cov_update_every`).
        distributed_inverses: bool. Under a `tf.distribute` strategy with
            more than one replica (`kfac_keras.distributed`, which details the
            communication), False (default) has every worker decompose every
            block at each `inv_update_every` step; True shares the blocks out
            over the replicas (greedy balance of the `n^3` cost) and
            all-reduces their whole state once per `T_inv` step. On CPU the
            replicated mode is as fast or faster (measured in the README),
            hence the default. With one replica the option changes nothing.
        step_rule: `"orthogonal"` (default) or `"kl_clip"`. `"kl_clip"`: the
            K-FAC step with `norm_constraint` as above (the default of
            earlier versions; needed for `quadratic_model_step`).
            `"orthogonal"`: each Kronecker matrix `P` of the
            preconditioned gradient (`[K; b]` per layer, per group, per GRU
            projection; `kfac_keras.orthogonal_step`) is replaced by
            `0.2 sqrt(max(rows, cols))` times `orthogonal_iterations`
            Newton-Schulz iterations towards its polar factor (the RMS of
            Keras's `Muon` update), without KL clip; `learning_rate` and
            `momentum` then apply as above: the step is linear in the learning
            rate (`learning_rate=None` means 1e-2 here). Embedding tables take
            the `"kl_clip"` step at 30x the learning rate, the other variables
            without a Kronecker block the `"kl_clip"` step (one clip scale).
            `step_size` logs the learning rate times the RMS entry of the
            orthogonalised direction. Not combinable with `quadratic_model_step`.
        orthogonal_iterations: int >= 1, dict or None (only with
            `step_rule="orthogonal"`): Newton-Schulz iterations of every
            matrix, or `{"iterations": k, "large_iterations": k_large,
            "large_min_dim": n}` (`k_large` where the smaller side is >= n).
            Defaults to None, meaning `{"iterations": 3, "large_iterations": 2,
            "large_min_dim": 500}` (`options.DEFAULT_ORTHOGONAL_ITERATIONS`).
        orthogonal_dtype: `"float32"`, `"bfloat16"` or None, the dtype of
            the matrix products in the Newton-Schulz iterations of
            `step_rule="orthogonal"` (only with it); the normalisation, the
            iterate and the coefficients stay float32
            (`kfac_keras.step_rules`). `"bfloat16"` is cheaper where the
            hardware has bfloat16 matrix units (GPUs, CPUs with AVX512_BF16
            through oneDNN; measured in tools/step_efficiency/RESULTS.md) and
            may be slower elsewhere; it rounds the products to bfloat16's 8
            significant bits. Defaults to None, meaning `"float32"`.
        orthogonal_step_bound: float > 0, None or `"auto"` (only with
            `step_rule="orthogonal"`): each matrix's step `lr D` is shortened
            to at most this times the Frobenius norm of its preconditioned
            gradient (the minimiser of the damped model), so it vanishes with
            the gradient (`kfac_keras.orthogonal_step`; logged as
            `orthogonal_bound`). None: no bound. Defaults to "auto": 1.0.
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
        damping=None,
        damping_mode=None,
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
        step_rule="orthogonal",
        orthogonal_iterations=None,
        orthogonal_dtype=None,
        orthogonal_step_bound="auto",
        nesterov=None,
        name="kfac",
        **kwargs,
    ):
        options = KFACOptions(
            learning_rate=learning_rate, momentum=momentum, damping=damping,
            damping_mode=damping_mode, l2_reg=l2_reg, factor_decay=factor_decay, cov_update_every=cov_update_every,
            inv_update_every=inv_update_every, statistics_fraction=statistics_fraction,
            estimation_mode=estimation_mode, inverse_method=inverse_method,
            layer_blocks=layer_blocks, exclude_layers=exclude_layers, seed=seed,
            decomposition_jit_compile=decomposition_jit_compile,
            approximation=approximation, adaptive=adaptive,
            norm_constraint=norm_constraint, scale_update_every=scale_update_every,
            distributed_inverses=distributed_inverses, step_rule=step_rule,
            orthogonal_iterations=orthogonal_iterations, orthogonal_dtype=orthogonal_dtype,
            orthogonal_step_bound=orthogonal_step_bound, nesterov=nesterov, name=name,
            base_arguments=kwargs)
        # With the quadratic-model step the learning-rate variable holds alpha.
        super().__init__(
            learning_rate=1.0 if options.learning_rate is None else options.learning_rate,
            name=options.name, **options.base_arguments)
        self.options = options
        self.initial_damping = options.initial_damping
        sampling_seed = (options.seed if options.seed is not None
                         else random.randrange(2**31 - 1))
        self.curvature = CurvatureEstimator(options, sampling_seed)
        self._orthogonal_step = (orthogonal_step.OrthogonalStep(
            options.orthogonal_iterations, options.orthogonal_dtype, options.orthogonal_step_bound)
            if options.step_rule == "orthogonal" else None)
        self._diagnostics = None
        self._registration = None
        #: What `adaptive` was before "auto" was resolved (see `custom_step`).
        self.requested_adaptive = adaptive
        #: The `kfac_keras.custom_step.CustomTrainStep` running right now, if any.
        self.active_custom_step = None

    def use_fixed_damping(self):
        """Turns the Levenberg-Marquardt damping rule off before training
        starts (a model's own `train_step` gives K-FAC no batch loss after
        the update, which the rule needs; see `kfac_keras.custom_step`)."""
        self.options = dataclasses.replace(self.options, adaptive=None)
        self.curvature.options = self.options

    momentum = _option("momentum", "float, schedule, or None with quadratic_model_step.")
    nesterov = _option("nesterov", "Whether the momentum is Nesterov's (resolved).")
    damping_schedule = _option("damping_schedule", "The damping schedule, or None.")
    approximation = _option("approximation", "`approximation`.")
    adaptive = _option("adaptive", "The resolved `AdaptiveOptions`, or None.")
    norm_constraint = _option("norm_constraint", "The resolved `norm_constraint`, or None.")
    scale_update_every = _option("scale_update_every", "`scale_update_every`, or None.")
    l2_reg = _option("l2_reg", "`l2_reg`.")
    factor_decay = _option("factor_decay", "`factor_decay`.")
    cov_update_every = _option("cov_update_every", "`T_cov`.")
    inv_update_every = _option("inv_update_every", "`T_inv`.")
    statistics_fraction = _option("statistics_fraction", "`statistics_fraction`.")
    estimation_mode = _option("estimation_mode", "`estimation_mode`.")
    inverse_method = _option("inverse_method", "`inverse_method`.")
    seed = _option("seed", "`seed`, or None.")
    decomposition_jit_compile = _option("decomposition_jit_compile", "`decomposition_jit_compile`.")
    distributed_inverses = _option("distributed_inverses", "`distributed_inverses`.")
    step_rule = _option("step_rule", "`step_rule`.")
    uses_quadratic_model_step = _option(
        "uses_quadratic_model_step", "True if `alpha` and `mu` come from the quadratic model.")
    adapts_damping = _option(
        "adapts_damping", "True if the damping follows the Levenberg-Marquardt rule.")

    layer_blocks = _option("layer_blocks", "`layer_blocks`, a dict.")
    exclude_layers = _option("exclude_layers", "`exclude_layers`, a list.")
    needs_batch = _option("needs_batch", "True if any `adaptive` option is set.")

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
        self.curvature.build(self, self.damping)
        # Steps skipped by the non-finite guard (kfac_keras/guards.py).
        self.skipped_steps = self.add_variable(
            (), initializer="zeros", dtype="int64", name="skipped_steps")
        if self.uses_quadratic_model_step:
            # mu of the last step (alpha is kept in the learning-rate variable).
            self.step_momentum = self.add_variable(
                (), initializer="zeros", dtype="float32", name="step_momentum")
        self._diagnostics = StepDiagnostics()
        self._adaptive_step = AdaptiveStep(self, self._diagnostics)

    @property
    def num_estimates(self):
        """The number of statistics estimates folded in so far (a variable)."""
        return self.curvature.num_estimates

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
            The `Registration`."""
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
        known = {id(v) for v in keras_internals.optimizer_trainable_variables(self)}
        missing = [v.path for v in model.trainable_variables if id(v) not in known]
        if missing:
            raise ValueError(
                f"The optimizer was built for other variables; {missing} are "
                "unknown to it. Build the model before compiling, or use a new "
                "KFAC instance.")
        for block in registration.blocks:
            block.build(self)
        self._registration = registration
        self.curvature.attach(registration)
        checkpointing.restore_pending(self)  # state loaded before attach
        logging.info("%s", registration.report())
        return registration

    # Thin delegates to the curvature estimator, for the training step
    # (`kfac_keras.training`), the guards and tests.
    sampling_seed = _delegate("sampling_seed")
    total_damping = _delegate("total_damping")
    curvature_pass_due = _delegate("curvature_pass_due")
    update_curvature = _delegate("update_curvature")
    update_inverses = _delegate("update_inverses")
    maybe_update_inverses = _delegate("maybe_update_inverses")
    precondition = _delegate("precondition")

    # --------------------------------------------------- step (paper 6-7)
    def begin_step(self):
        """Per-step work before the decompositions: writes a damping schedule's
        value for this step into the `damping` variable."""
        if self.damping_schedule is not None:
            self.damping.assign(tf.cast(
                self.damping_schedule(self.iterations), self.damping.dtype))
        return tf.constant(True)

    def damping_adaptation_due(self):
        """Bool tensor: the Levenberg-Marquardt rule runs after this step."""
        return self._adaptive_step.damping_adaptation_due()

    def current_momentum(self):
        """The momentum coefficient of this step (`mu` with the quadratic model)."""
        if self.uses_quadratic_model_step:
            return tf.convert_to_tensor(self.step_momentum)
        if is_schedule(self.momentum):
            return tf.cast(self.momentum(self.iterations), tf.float32)
        return self.momentum

    def logged_values(self):
        """The K-FAC quantities added to the step's logs, as tensors.

        Always `damping` (the current `lambda`) and `update_norm` (the norm of
        the last update `delta`); with a learning-rate step, `step_size`, the
        factor that multiplied the preconditioned gradient in the last step
        (the learning rate times the KL-clipping scale; with
        `step_rule="orthogonal"`, the learning rate times the RMS entry of the
        orthogonalised direction, and with `orthogonal_step_bound` set
        `orthogonal_bound`, the fraction of its matrices the bound shortened);
        with `adapt_damping`, `rho` (last reduction ratio; NaN when undefined)
        and `qmodel_change` (the last `M(delta) - M(0)` of the undamped
        model); with `quadratic_model_step`, also `alpha` and `mu` of the
        last step (`qmodel_change` is then updated every step)."""
        return self._diagnostics.logged_values(self)

    def _velocities_of(self, variables):
        return [tf.convert_to_tensor(keras_internals.optimizer_slot(self, self.velocities, v))
                for v in variables]

    def _learning_rate_now(self):
        return tf.cast(keras_internals.current_learning_rate(self), tf.float32)

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
                step's batch; required when `adaptive` is set. Defaults to None.
            loss: scalar tensor, the batch loss before the update (unscaled);
                required with `adapt_damping`. Defaults to None.
        """
        if self._registration is None:
            raise RuntimeError(MISSING_CAPTURE)
        self._adaptive_step.check_batch(batch, loss)
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
        preconditioned = keras_internals.clip_gradients(
            self, self.precondition(raw_grads, variables))
        if self._orthogonal_step is not None:
            preconditioned, rms = self._orthogonal_step.directions(
                self._registration.blocks, variables, full_grads, preconditioned,
                self.norm_constraint, self._learning_rate_now())
            self._diagnostics.step_size.assign(self._learning_rate_now() * rms)
            self._diagnostics.orthogonal_bound.assign(self._orthogonal_step.bound_fraction)
        elif self.norm_constraint is not None:
            coefficient = step_rules.kl_clipping_scale(
                full_grads, preconditioned, self.norm_constraint)
            preconditioned = [p * tf.cast(coefficient, p.dtype) for p in preconditioned]
            self._diagnostics.step_size.assign(self._learning_rate_now() * coefficient)
        elif not self.uses_quadratic_model_step:
            self._diagnostics.step_size.assign(self._learning_rate_now())
        prediction = self._adaptive_step.before_update(
            full_grads, preconditioned, self._velocities_of(variables), variables, batch)
        directions = preconditioned  # the update's `D` (before the loss scale below)
        if self.loss_scale_factor is not None:  # the base class divides by it
            preconditioned = [p * self.loss_scale_factor for p in preconditioned]
        super().apply(preconditioned, variables)
        updates = self._velocities_of(variables)
        if self.nesterov:  # the update taken is `mu v - lr D`, not the velocity `v`
            mu, lr = tf.cast(self.current_momentum(), tf.float32), self._learning_rate_now()
            updates = [mu * u - lr * tf.cast(d, u.dtype) for u, d in zip(updates, directions)]
        self._diagnostics.update_norm.assign(tf.sqrt(step_rules.dot(updates, updates)))
        self._adaptive_step.after_update(prediction, loss, updates, variables, batch)

    # ------------------------------------------------------------ Keras API
    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """Keras's per-variable update, also in cross-replica context (see
        `keras_internals.backend_update_step`)."""
        return keras_internals.backend_update_step(
            KFAC, self, grads, trainable_variables, learning_rate)

    def _apply_weight_decay(self, variables):
        """Keras's decoupled weight decay, also in cross-replica context."""
        return keras_internals.apply_weight_decay(KFAC, self, variables)

    def apply(self, grads, trainable_variables=None):
        """Preconditions `grads` with the K-FAC blocks, then applies them.

        Only valid inside a model's own `train_step` run by `KFACCallback`
        (`kfac_keras.custom_step`), which supplies the captured statistics.
        Anywhere else (Keras's default train step without the callback, a
        later `fit` without it, a custom loop) it raises a RuntimeError that
        says what to use instead, since the curvature would stay frozen.
        """
        if trainable_variables is None:
            trainable_variables = keras_internals.optimizer_trainable_variables(self)
        custom_step = self.active_custom_step
        if custom_step is None:
            raise RuntimeError(MISSING_CAPTURE)
        return custom_step.apply(list(grads), list(trainable_variables))

    def update_step(self, gradient, variable, learning_rate):
        """Momentum update with the already preconditioned gradient."""
        learning_rate = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        momentum = tf.cast(self.current_momentum(), variable.dtype)
        velocity = keras_internals.optimizer_slot(self, self.velocities, variable)
        self.assign(velocity, momentum * velocity - learning_rate * gradient)
        if self.nesterov:
            self.assign_add(variable, momentum * velocity - learning_rate * gradient)
        else:
            self.assign_add(variable, velocity)

    def load_own_variables(self, store):
        """Loads saved optimizer state, including K-FAC state that `attach`
        creates later (kept until then; see `kfac_keras.checkpointing`)."""
        checkpointing.load_optimizer_variables(self, store)

    def save_own_variables(self, store):
        """Saves the optimizer state, with loaded state awaiting `attach`."""
        checkpointing.save_optimizer_variables(self, store)

    def get_config(self):
        """Keras's config (name, learning rate, base arguments) and every K-FAC
        option, resolved (`KFACOptions.get_config`)."""
        config = super().get_config()
        if self.uses_quadratic_model_step:
            config["learning_rate"] = None  # chosen by the quadratic model
        config.update(self.options.get_config())
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
