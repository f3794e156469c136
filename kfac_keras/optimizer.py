"""The K-FAC optimizer: a `keras.optimizers.Optimizer` subclass."""

import math
import numbers
import random

import keras
import tensorflow as tf
from absl import logging

from kfac_keras import linalg
from kfac_keras import losses as losses_lib
from kfac_keras import registration as registration_lib

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
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        interval = ("(" if low_open else "[") + f"{lo}, {hi}" + (")" if high_open else "]")
        raise ValueError(f"`{name}` must be in {interval}; received {value!r}.")
    return value


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}; received {value!r}.")
    return value


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

    Args:
        learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`,
            the step size applied to the preconditioned gradient. Defaults to
            0.01.
        momentum: float in [0, 1), heavy-ball momentum. Defaults to 0.9.
        damping: float > 0, the Tikhonov damping `lambda` added to the Fisher.
            Larger values make steps shorter and more gradient-like. Defaults
            to 1e-3.
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
            ~4x slower than Cholesky: use `inv_update_every` >= 50 on CPU).
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
        name: string, the optimizer name. Defaults to `"kfac"`.
        **kwargs: the base optimizer's arguments (`weight_decay`, `clipnorm`,
            `clipvalue`, `global_clipnorm`, `use_ema`, `ema_momentum`,
            `ema_overwrite_frequency`, `loss_scale_factor`). Clipping applies
            to the raw gradient, before preconditioning.
            `gradient_accumulation_steps` is not supported.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.9,
        damping=1e-3,
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
        name="kfac",
        **kwargs,
    ):
        if kwargs.get("gradient_accumulation_steps"):
            raise ValueError(
                "`gradient_accumulation_steps` is not supported by KFAC: its "
                "factor statistics and step counters are per step; use a "
                "larger batch or `statistics_fraction` instead.")
        _check_number("learning_rate", learning_rate, low=0.0, low_open=True,
                      allow_schedule=True)
        _check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
        _check_number("damping", damping, low=0.0, low_open=True)
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
        if decomposition_jit_compile not in ("auto", True, False):
            raise ValueError(
                "`decomposition_jit_compile` must be 'auto', True or False; "
                f"received {decomposition_jit_compile!r}.")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.initial_damping = float(damping)
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
                f"{type(layer_blocks).__name__}.")
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
            layer_blocks=self.layer_blocks, exclude_layers=self.exclude_layers)
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
        self.num_estimates.assign_add(1.0)
        count = tf.convert_to_tensor(self.num_estimates)
        decay = tf.minimum(1.0 - 1.0 / count, self.factor_decay)
        for block, (captures, sampled_grads) in zip(self._registration.blocks, block_inputs):
            block.update_statistics(captures, sampled_grads, num_examples, decay)

    def inverses_due(self, statistics_updated):
        """Bool tensor: decompose the factors at this step."""
        periodic = tf.equal(self._step() % self.inv_update_every, 0)
        early = tf.logical_and(statistics_updated,
                               tf.convert_to_tensor(self.num_estimates) <= 3.0)
        return tf.logical_or(periodic, early)

    def _decompose(self):
        damping = self.total_damping()
        for block in self._registration.blocks:
            block.update_inverses(damping)
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
        """Runs `update_inverses` when `inverses_due`; returns whether it ran."""
        return tf.cond(self.inverses_due(statistics_updated),
                       self.update_inverses, lambda: tf.constant(False))

    def precondition(self, grads, trainable_variables):
        """Returns `(F + damping I)^{-1} (grad + l2_reg * theta)` per variable."""
        registration = self._registration
        damping = self.total_damping()
        by_var = {}
        for grad, variable in zip(grads, trainable_variables):
            if grad is None:
                continue
            grad = tf.convert_to_tensor(grad)
            if self.l2_reg:
                grad = grad + self.l2_reg * tf.cast(variable, grad.dtype)
            by_var[id(variable)] = grad
        result = dict(by_var)
        for variable in trainable_variables:
            if id(variable) in by_var and registration.block_of(variable) is None:
                raise ValueError(
                    f"Variable {variable.path} has no K-FAC block; it was "
                    "created after registration.")
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
                    result[id(variable)] = tf.cast(grad, variable.dtype)
        return [None if g is None else result[id(v)]
                for g, v in zip(grads, trainable_variables)]

    # ------------------------------------------------------------ Keras API
    def apply(self, grads, trainable_variables=None):
        """Preconditions `grads` with the K-FAC blocks, then applies them."""
        if self._registration is None:
            raise RuntimeError(_MISSING_CAPTURE)
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        grads = self.precondition(list(grads), trainable_variables)
        return super().apply(grads, trainable_variables)

    def update_step(self, gradient, variable, learning_rate):
        """Momentum update with the already preconditioned gradient."""
        learning_rate = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        velocity = self.velocities[self._get_variable_index(variable)]
        self.assign(velocity, self.momentum * velocity - learning_rate * gradient)
        self.assign_add(variable, velocity)

    def get_config(self):
        config = super().get_config()
        config.update({
            "momentum": self.momentum,
            "damping": self.initial_damping,
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
        })
        return config
