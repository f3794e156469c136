"""The optimizer's options: frozen, self-validating dataclasses.

`KFAC(...)` keeps Keras's flat signature and stores one `KFACOptions`: every
argument is checked there (with `kfac_keras.validation`), before any state
exists, and every `"auto"` / None default is resolved to what it means for
the other options, so the optimizer and `get_config` see only resolved
values. `AdaptiveOptions` groups the adaptive parts of the paper's algorithm
(`KFAC(adaptive=...)`). Code downstream (registration, linalg, blocks) may
assume validated options.
"""

import dataclasses

import keras
from absl import logging

from kfac_keras import linalg
from kfac_keras import losses as losses_lib
from kfac_keras import registration as registration_lib
from kfac_keras import step_rules
from kfac_keras.validation import (check_bool, check_choice, check_number, check_scope_name,
                                   is_number, is_schedule)

#: Fisher approximations across layers (`KFAC(approximation=...)`).
APPROXIMATIONS = ("block_diagonal", "tridiagonal")
#: Keyword arguments of `keras.optimizers.Optimizer` that KFAC passes through.
BASE_OPTIMIZER_ARGUMENTS = (
    "weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
    "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
    "gradient_accumulation_steps",
)
#: What `KFAC(learning_rate=None)` and `KFAC(momentum=None)` mean with a
#: learning-rate step.
DEFAULT_LEARNING_RATE = 1.0
DEFAULT_MOMENTUM = 0.9
#: What `KFAC(norm_constraint="auto")` means with a learning-rate step.
DEFAULT_NORM_CONSTRAINT = 1e-4
#: How the preconditioned gradient becomes the step (`KFAC(step_rule=...)`):
#: the KL-clipped K-FAC step, or its orthogonalised direction per Kronecker
#: matrix (`kfac_keras.orthogonal_step`). The orthogonal rule is the default:
#: it took fewer steps and less time to target than the KL-clipped rule on
#: the autoencoder, CNN, LM and MLP of tools/step_efficiency/RESULTS.md.
STEP_RULES = ("kl_clip", "orthogonal")
DEFAULT_STEP_RULE = "orthogonal"
#: What `KFAC(orthogonal_iterations=None)` means with `step_rule="orthogonal"`
#: (`orthogonal_step.OrthogonalStep`): 3 Newton-Schulz iterations took the
#: same steps to target as 5 within 2-14 steps on the autoencoder, CNN and LM
#: at ~16% less cost on the autoencoder; 2 on the matrices whose smaller side
#: is at least 500 (the autoencoder's four largest, 96% of its Newton-Schulz
#: work) kept its steps within 10% on two seeds at 0.78-0.85x the step time,
#: and no CNN or LM matrix is that large (tools/step_efficiency/RESULTS.md,
#: S7-polar).
DEFAULT_ORTHOGONAL_ITERATIONS = {"iterations": 3, "large_iterations": 2, "large_min_dim": 500}
#: What `KFAC(nesterov=None)` means with `step_rule="orthogonal"` (False with
#: `"kl_clip"`, whose defaults predate it): Nesterov momentum took fewer steps
#: to every target on the autoencoder (two seeds) and the CNN at the same
#: cost (tools/step_efficiency/RESULTS.md, S8-nesterov).
DEFAULT_ORTHOGONAL_NESTEROV = True
#: Dtypes of the matrix products in the orthogonal rule's Newton-Schulz
#: iterations (`KFAC(orthogonal_dtype=...)`), and what None means with it.
ORTHOGONAL_DTYPES = step_rules.NEWTON_SCHULZ_DTYPES
DEFAULT_ORTHOGONAL_DTYPE = "float32"
#: What `KFAC(orthogonal_step_bound="auto")` means with `step_rule="orthogonal"`:
#: each orthogonalised matrix's step is at most 1.0 times its damped
#: quadratic model's minimiser (the K-FAC step at learning rate 1;
#: `kfac_keras.orthogonal_step`, "the Newton bound"), so the fixed-RMS step
#: stops growing the weights once the gradient has vanished
#: (tools/keras_programs/FINDINGS.md, S6-bilstm).
DEFAULT_ORTHOGONAL_STEP_BOUND = 1.0
#: What `KFAC(learning_rate=None)` means with `step_rule="orthogonal"`: the
#: best of {3e-3, 1e-2} on the four tasks of tools/step_efficiency/RESULTS.md
#: (the step's RMS entry is `0.2 lr` per matrix, like Keras's Muon).
DEFAULT_ORTHOGONAL_LEARNING_RATE = 1e-2
#: How the damping enters each block (`KFAC(damping_mode=...)`): `"absolute"`,
#: the same `lambda` for every block; `"relative"`, block `l` is damped with
#: `lambda` times its curvature's mean eigenvalue (`FisherBlock.curvature_scale`),
#: so `lambda` is dimensionless and the steps do not change with the loss's scale.
DAMPING_MODES = ("absolute", "relative")
#: What `damping=None` means: 1.0 relative to each block's curvature (the
#: orthogonal rule's default, tools/step_efficiency/RESULTS.md S5-reldamp),
#: 1e-2 in loss units for an absolute damping.
DEFAULT_RELATIVE_DAMPING = 1.0
DEFAULT_ABSOLUTE_DAMPING = 1e-2

#: What `KFAC(adaptive="auto")` means when `damping` is a number:
#: Levenberg-Marquardt damping adaptation with a floor (below it, the damping
#: that the Cholesky inverses use, refreshed every `inv_update_every` steps,
#: lags too far behind the rule on the benchmarks), run every 10 steps (as
#: good as every 5 on the benchmarks, at half the cost of its extra passes);
#: see docs/benchmarks.md.
DEFAULT_ADAPTIVE = dict(adapt_damping=True, min_damping=1e-3, damping_update_every=10)
#: Base-optimizer arguments that change the weights outside the quadratic
#: model, so they exclude `adaptive` options.
_OUTSIDE_THE_MODEL = ("weight_decay", "ema_overwrite_frequency")


@dataclasses.dataclass(frozen=True)
class AdaptiveOptions:
    """The adaptive parts of the paper's algorithm, for `KFAC(adaptive=...)`.

    Both features use the exact mini-batch Fisher through forward-mode
    products (`kfac_keras.quadratic_model`), so they need the K-FAC training
    step (`KFACCallback` or `make_train_step`).

    Args:
        quadratic_model_step: bool; choose the step size `alpha` and the
            momentum `mu` every step by minimising the quadratic model
            (paper section 7; alpha only on the first step). `KFAC`'s
            `learning_rate` and `momentum` must then be left unset, and
            `norm_constraint` is not available (the model already sets the
            step length). Defaults to False.
        adapt_damping: bool; adapt the damping `lambda` with the
            Levenberg-Marquardt rule (paper section 6.5,
            `kfac_keras.step_rules`) every `damping_update_every` steps,
            starting from `KFAC`'s `damping` (which must then be a number,
            not a schedule). Defaults to False.
        damping_update_every: int >= 1, `T1`: the rule runs every this many
            steps, with factor `(19/20)^T1`. Defaults to 5.
        min_damping: float > 0, lower bound of the adapted damping.
            Defaults to 1e-8.
        max_damping: float >= min_damping, upper bound. Defaults to 1e6.

    Raises:
        TypeError / ValueError: naming the bad argument; also if neither
            feature is enabled (the options would do nothing).
    """

    quadratic_model_step: bool = False
    adapt_damping: bool = False
    damping_update_every: int = 5
    min_damping: float = 1e-8
    max_damping: float = 1e6

    def __post_init__(self):
        check_bool("quadratic_model_step", self.quadratic_model_step)
        check_bool("adapt_damping", self.adapt_damping)
        check_number("damping_update_every", self.damping_update_every, low=1, integer=True)
        check_number("min_damping", self.min_damping, low=0.0, low_open=True)
        check_number("max_damping", self.max_damping, low=0.0, low_open=True)
        if self.max_damping < self.min_damping:
            raise ValueError(
                f"`max_damping` ({self.max_damping!r}) must be >= `min_damping` "
                f"({self.min_damping!r}).")
        if not (self.quadratic_model_step or self.adapt_damping):
            raise ValueError(
                "AdaptiveOptions enables nothing: set `quadratic_model_step=True` "
                "and/or `adapt_damping=True`, or pass `adaptive=None`.")

    @classmethod
    def from_value(cls, value):
        """Accepts None, an `AdaptiveOptions` or a dict of its arguments."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise TypeError(
                    f"`adaptive` has unknown keys {unknown}; allowed: {sorted(known)}.")
            return cls(**value)
        raise TypeError(
            "`adaptive` must be None, a kfac_keras.AdaptiveOptions or a dict of "
            f"its arguments; received {value!r} of type {type(value).__name__}.")

    def get_config(self):
        """The options as a plain dict (for `KFAC.get_config`)."""
        return dataclasses.asdict(self)


def _resolve_adaptive(adaptive, damping, base_arguments):
    """`adaptive` as an `AdaptiveOptions` or None, with `"auto"` resolved."""
    if isinstance(adaptive, str):
        if adaptive != "auto":
            raise TypeError(
                "`adaptive` must be 'auto', None, a kfac_keras.AdaptiveOptions "
                f"or a dict of its arguments; received {adaptive!r}.")
        changed = [n for n in _OUTSIDE_THE_MODEL if base_arguments.get(n)]
        if changed:
            # The weights change outside the quadratic model that judges the
            # damping: say so, since the user did not ask for fixed damping.
            logging.warning(
                "KFAC: %s %s the weights outside the quadratic model "
                "that judges the damping, so adaptive='auto' turns the "
                "adaptive damping off: the damping stays at %r. Use "
                "`l2_reg` instead of `weight_decay` to keep it.",
                " and ".join(f"`{n}`" for n in changed),
                "changes" if len(changed) == 1 else "change", damping)
            return None
        if is_schedule(damping):
            return None  # the damping follows the user's schedule
        adaptive = dict(DEFAULT_ADAPTIVE)
        if 0 < damping < adaptive["min_damping"]:
            adaptive["min_damping"] = float(damping)
    return AdaptiveOptions.from_value(adaptive)


def _resolve_norm_constraint(norm_constraint, model_step):
    if isinstance(norm_constraint, str):
        if norm_constraint != "auto":
            raise TypeError(
                "`norm_constraint` must be 'auto', None or a number > 0; "
                f"received {norm_constraint!r}.")
        return None if model_step else DEFAULT_NORM_CONSTRAINT
    if norm_constraint is None:
        return None
    if model_step:
        raise ValueError(
            "`norm_constraint` has no effect with "
            "AdaptiveOptions(quadratic_model_step=True): the step length "
            f"comes from the quadratic model; received norm_constraint={norm_constraint!r}.")
    return float(check_number("norm_constraint", norm_constraint, low=0.0, low_open=True))


def check_base_optimizer_arguments(kwargs):
    """Checks the keyword arguments KFAC passes to the Keras base optimizer.

    Keras accepts, for example, a negative `clipnorm` or a string
    `weight_decay` at construction and fails (or misbehaves) at the first
    step; K-FAC rejects them here.

    Args:
        kwargs: the `**kwargs` given to `KFAC`.

    Raises:
        TypeError / ValueError: naming the first bad argument.
    """
    unknown = sorted(set(kwargs) - set(BASE_OPTIMIZER_ARGUMENTS))
    if unknown:
        given = ", ".join(f"{name}={kwargs[name]!r}" for name in unknown)
        raise TypeError(
            f"KFAC got unexpected keyword argument(s) {given}; the base "
            f"optimizer arguments it accepts are {list(BASE_OPTIMIZER_ARGUMENTS)}.")
    if kwargs.get("gradient_accumulation_steps"):
        raise ValueError(
            "`gradient_accumulation_steps` is not supported by KFAC: its "
            "factor statistics and step counters are per step; use a "
            "larger batch or `statistics_fraction` instead (received "
            f"gradient_accumulation_steps={kwargs['gradient_accumulation_steps']!r}).")
    for name in ("clipnorm", "clipvalue", "global_clipnorm", "loss_scale_factor"):
        check_number(name, kwargs.get(name), low=0.0, low_open=True, allow_none=True)
    check_number("weight_decay", kwargs.get("weight_decay"), low=0.0, allow_none=True)
    if "ema_momentum" in kwargs:
        check_number("ema_momentum", kwargs["ema_momentum"], low=0.0, high=1.0)
    check_number("ema_overwrite_frequency", kwargs.get("ema_overwrite_frequency"), low=1,
                 integer=True, allow_none=True)
    check_number("gradient_accumulation_steps", kwargs.get("gradient_accumulation_steps"),
                 low=0, integer=True, allow_none=True)
    if "use_ema" in kwargs:
        check_bool("use_ema", kwargs["use_ema"])
    clips = [n for n in ("clipnorm", "clipvalue", "global_clipnorm") if kwargs.get(n) is not None]
    if len(clips) > 1:
        raise ValueError(
            f"Only one of `clipnorm`, `clipvalue` and `global_clipnorm` may be "
            f"set; received {', '.join(f'{n}={kwargs[n]!r}' for n in clips)}.")


def _serialize_schedule(value):
    return keras.optimizers.schedules.serialize(value) if is_schedule(value) else value


def _orthogonal_rule_option(name, value, step_rule):
    """True if option `name` of `step_rule="orthogonal"` is to be resolved;
    False without that rule, where a value given would be ignored: refused."""
    if step_rule == "orthogonal":
        return True
    if value is not None:
        raise ValueError(f"`{name}` only applies to step_rule='orthogonal'; received "
                         f"{name}={value!r} with step_rule={step_rule!r}.")
    return False


@dataclasses.dataclass(frozen=True)
class KFACOptions:
    """Every `KFAC` option, checked and with its defaults resolved.

    Built by `KFAC.__init__` from its arguments (documented there, with the
    same names and defaults); `KFAC(**options.get_config(), **base)` builds
    the same optimizer. After construction no field holds `"auto"` or a
    None that stands for a default, except `decomposition_jit_compile="auto"`,
    which is a per-device choice made when the decompositions are built
    (`kfac_keras.linalg.decomposition_jit`), and `learning_rate`/`momentum`,
    which are None exactly when the quadratic model chooses them.

    Args:
        base_arguments: dict of the base optimizer's keyword arguments (see
            `BASE_OPTIMIZER_ARGUMENTS`); checked here, passed on to Keras.
            Defaults to an empty dict.
        The others: as in `KFAC.__init__`.

    Raises:
        TypeError / ValueError: naming the bad argument, its value and what
            is allowed.
    """

    learning_rate: object = None
    momentum: object = None
    damping: object = None
    damping_mode: object = None
    l2_reg: float = 0.0
    factor_decay: float = 0.95
    cov_update_every: int = 10
    inv_update_every: int = 20
    statistics_fraction: float = 1.0
    estimation_mode: str = "fisher"
    inverse_method: str = "cholesky"
    layer_blocks: object = None
    exclude_layers: object = None
    seed: object = None
    decomposition_jit_compile: object = "auto"
    approximation: str = "block_diagonal"
    adaptive: object = "auto"
    norm_constraint: object = "auto"
    scale_update_every: object = None
    distributed_inverses: bool = False
    step_rule: str = DEFAULT_STEP_RULE
    orthogonal_iterations: object = None
    orthogonal_dtype: object = None
    orthogonal_step_bound: object = "auto"
    nesterov: object = None
    name: str = "kfac"
    base_arguments: object = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        resolved = self._resolve()
        for field, value in resolved.items():
            object.__setattr__(self, field, value)

    def _resolve(self):
        """Checks every field; returns the resolved values by field name."""
        base_arguments = dict(self.base_arguments)
        check_base_optimizer_arguments(base_arguments)
        step_rule = check_choice("step_rule", self.step_rule, STEP_RULES)
        damping_mode, damping = self._resolve_damping(step_rule)
        adaptive = _resolve_adaptive(self.adaptive, damping, base_arguments)
        model_step = adaptive is not None and adaptive.quadratic_model_step
        if adaptive is not None:
            conflicting = [n for n in _OUTSIDE_THE_MODEL if base_arguments.get(n)]
            if conflicting:
                raise ValueError(
                    f"`adaptive` cannot be combined with {conflicting}: they change "
                    "the weights outside the quadratic model that chooses the step "
                    "and judges it; use `l2_reg` instead of `weight_decay`.")
            if adaptive.adapt_damping:
                if is_schedule(damping):
                    raise ValueError(
                        "AdaptiveOptions(adapt_damping=True) adapts the damping; "
                        "`damping` must be its initial value (a number), not a "
                        f"schedule; received {damping!r}.")
                if not adaptive.min_damping <= damping <= adaptive.max_damping:
                    raise ValueError(
                        f"`damping` ({damping!r}) must lie in [min_damping, max_damping]"
                        f" = [{adaptive.min_damping!r}, {adaptive.max_damping!r}] "
                        "of AdaptiveOptions.")
        orthogonal_iterations = self._resolve_orthogonal_iterations(step_rule, model_step)
        orthogonal_dtype = self._resolve_orthogonal_dtype(step_rule)
        orthogonal_step_bound = self._resolve_orthogonal_step_bound(step_rule)
        learning_rate, momentum = self._resolve_step_size(model_step, step_rule)
        nesterov = self._resolve_nesterov(model_step, step_rule)
        # After the step rule's own checks: the orthogonal rule refuses the
        # quadratic model first, with the message that names the rule.
        if damping_mode == "relative" and model_step:
            raise ValueError(
                "damping_mode='relative' is not available with the quadratic-model step "
                "(AdaptiveOptions(quadratic_model_step=True)): its model's `lambda ||d||^2` "
                "term uses one absolute damping for all blocks. Use damping_mode='absolute' "
                "with it, or a learning-rate step rule with relative damping.")
        norm_constraint = _resolve_norm_constraint(self.norm_constraint, model_step)
        approximation = check_choice("approximation", self.approximation, APPROXIMATIONS)
        inverse_method = check_choice("inverse_method", self.inverse_method,
                                      linalg.INVERSE_METHODS)
        if approximation == "tridiagonal" and inverse_method not in ("cholesky", "inverse"):
            raise ValueError(
                "approximation='tridiagonal' uses factored Tikhonov damping: "
                "`inverse_method` must be 'cholesky' or 'inverse'; received "
                f"{inverse_method!r}.")
        scale_update_every = check_number("scale_update_every", self.scale_update_every,
                                          low=1, integer=True, allow_none=True)
        if scale_update_every is not None and inverse_method != "ekfac":
            raise ValueError(
                "`scale_update_every` is EKFAC's T_scale and needs "
                f"inverse_method='ekfac'; received inverse_method={inverse_method!r}.")
        seed = check_number("seed", self.seed, low=0, integer=True, allow_none=True)
        return dict(
            learning_rate=learning_rate, momentum=momentum, damping=damping,
            damping_mode=damping_mode, l2_reg=float(check_number("l2_reg", self.l2_reg, low=0.0)),
            factor_decay=float(check_number("factor_decay", self.factor_decay, low=0.0,
                                            high=1.0, high_open=True)),
            cov_update_every=int(check_number("cov_update_every", self.cov_update_every,
                                              low=1, integer=True)),
            inv_update_every=int(check_number("inv_update_every", self.inv_update_every,
                                              low=1, integer=True)),
            statistics_fraction=float(check_number(
                "statistics_fraction", self.statistics_fraction, low=0.0, high=1.0,
                low_open=True)),
            estimation_mode=check_choice("estimation_mode", self.estimation_mode,
                                         losses_lib.ESTIMATION_MODES),
            inverse_method=inverse_method,
            layer_blocks=registration_lib.check_layer_blocks(self.layer_blocks),
            exclude_layers=registration_lib.check_exclude_layers(self.exclude_layers),
            seed=None if seed is None else int(seed),
            decomposition_jit_compile=check_choice(
                "decomposition_jit_compile", self.decomposition_jit_compile,
                ("auto", True, False)),
            approximation=approximation, adaptive=adaptive, norm_constraint=norm_constraint,
            scale_update_every=None if scale_update_every is None else int(scale_update_every),
            distributed_inverses=check_bool("distributed_inverses", self.distributed_inverses),
            step_rule=step_rule, orthogonal_iterations=orthogonal_iterations,
            orthogonal_dtype=orthogonal_dtype, orthogonal_step_bound=orthogonal_step_bound,
            nesterov=nesterov, name=check_scope_name("name", self.name),
            base_arguments=base_arguments)

    def _resolve_damping(self, step_rule):
        """`(damping_mode, damping)`. `damping_mode=None` is "relative" for the
        orthogonal rule at its default damping (a scale-free direction, so the
        steps do not change with the loss's scale), else "absolute" (a number
        given for `damping` keeps the loss units it always had; the KL-clipped
        rule's bound is in loss units anyway); `damping=None` is the mode's
        default value."""
        mode = self.damping_mode
        if mode is None:
            relative = self.damping is None and step_rule == "orthogonal"
            mode = "relative" if relative else "absolute"
        mode = check_choice("damping_mode", mode, DAMPING_MODES)
        damping = self.damping
        if damping is None:
            damping = DEFAULT_RELATIVE_DAMPING if mode == "relative" else DEFAULT_ABSOLUTE_DAMPING
        if not is_schedule(damping):
            damping = float(check_number("damping", damping, low=0.0, low_open=True))
        return mode, damping

    def _resolve_orthogonal_iterations(self, step_rule, model_step):
        """`orthogonal_iterations` resolved with the orthogonal rule: an int
        (every matrix) or the dict of `DEFAULT_ORTHOGONAL_ITERATIONS`'s keys
        (by matrix size); else None (a value given without the rule would be
        ignored: refused)."""
        iterations = self.orthogonal_iterations
        if not _orthogonal_rule_option("orthogonal_iterations", iterations, step_rule):
            return None
        if model_step:
            raise ValueError(
                "step_rule='orthogonal' (the default) sets the step length itself (a "
                "fixed RMS per matrix times the learning rate); it cannot be combined "
                "with AdaptiveOptions(quadratic_model_step=True), which chooses the "
                "step length from the quadratic model. Pass step_rule='kl_clip' to "
                "use the quadratic-model step.")
        if iterations is None:
            return dict(DEFAULT_ORTHOGONAL_ITERATIONS)
        if isinstance(iterations, dict):
            if set(iterations) != set(DEFAULT_ORTHOGONAL_ITERATIONS):
                raise ValueError(
                    "`orthogonal_iterations` as a dict needs exactly the keys "
                    f"{sorted(DEFAULT_ORTHOGONAL_ITERATIONS)} (Newton-Schulz iterations of "
                    "the matrices whose smaller side is below `large_min_dim`, and of the "
                    f"others); received {iterations!r}.")
            return {key: int(check_number(f"orthogonal_iterations[{key!r}]", value, low=1,
                                          integer=True))
                    for key, value in sorted(iterations.items())}
        return int(check_number("orthogonal_iterations", iterations, low=1, integer=True))

    def _resolve_orthogonal_dtype(self, step_rule):
        """`orthogonal_dtype` resolved: a dtype name with the orthogonal rule,
        else None (a dtype given without it would be ignored: refused)."""
        dtype = self.orthogonal_dtype
        if not _orthogonal_rule_option("orthogonal_dtype", dtype, step_rule):
            return None
        if dtype is None:
            return DEFAULT_ORTHOGONAL_DTYPE
        if not isinstance(dtype, str):  # a DType compares equal to its name
            raise TypeError(
                f"`orthogonal_dtype` must be a string, one of {ORTHOGONAL_DTYPES}; "
                f"received {dtype!r} of type {type(dtype).__name__}.")
        return check_choice("orthogonal_dtype", dtype, ORTHOGONAL_DTYPES)

    def _resolve_orthogonal_step_bound(self, step_rule):
        """`orthogonal_step_bound` resolved: a float > 0 or None (off) with
        the orthogonal rule; None without it, where only "auto" or None is
        accepted (a number would be ignored: refused)."""
        bound = self.orthogonal_step_bound
        if isinstance(bound, str) and bound == "auto":
            return DEFAULT_ORTHOGONAL_STEP_BOUND if step_rule == "orthogonal" else None
        if step_rule != "orthogonal" and bound is not None:
            raise ValueError(
                f"`orthogonal_step_bound` only applies to step_rule='orthogonal'; received "
                f"orthogonal_step_bound={bound!r} with step_rule={step_rule!r}.")
        if bound is None:
            return None
        return float(check_number("orthogonal_step_bound", bound, low=0.0, low_open=True))

    def _resolve_step_size(self, model_step, step_rule=DEFAULT_STEP_RULE):
        """`(learning_rate, momentum)`: None with the quadratic-model step."""
        learning_rate, momentum = self.learning_rate, self.momentum
        if model_step:
            given = [(n, v) for n, v in (("learning_rate", learning_rate),
                                         ("momentum", momentum)) if v is not None]
            if given:
                raise ValueError(
                    "AdaptiveOptions(quadratic_model_step=True) chooses the step "
                    "size and momentum from the quadratic model; do not pass "
                    f"{' or '.join(f'`{n}`' for n, _ in given)} (received "
                    + ", ".join(f"{n}={v!r}" for n, v in given) + ").")
            return None, None
        if learning_rate is None:
            learning_rate = (DEFAULT_ORTHOGONAL_LEARNING_RATE if step_rule == "orthogonal"
                             else DEFAULT_LEARNING_RATE)
        momentum = DEFAULT_MOMENTUM if momentum is None else momentum
        check_number("learning_rate", learning_rate, low=0.0, low_open=True,
                     allow_schedule=True)
        if is_number(learning_rate):
            learning_rate = float(learning_rate)  # Keras accepts only a Python float.
        if not is_schedule(momentum):
            momentum = float(check_number("momentum", momentum, low=0.0, high=1.0,
                                          high_open=True))
        return learning_rate, momentum

    def _resolve_nesterov(self, model_step, step_rule):
        """`nesterov` as a bool (None: the step rule's default); refused with
        the quadratic-model step, whose momentum is its own."""
        if self.nesterov is None:
            return DEFAULT_ORTHOGONAL_NESTEROV and step_rule == "orthogonal" and not model_step
        nesterov = check_bool("nesterov", self.nesterov)
        if nesterov and model_step:
            raise ValueError(
                "nesterov=True cannot be combined with AdaptiveOptions("
                "quadratic_model_step=True): the quadratic model chooses the step and "
                "its momentum coefficient together for the heavy-ball update. Pass "
                "nesterov=False (or leave it None) with the quadratic-model step.")
        return nesterov

    # ------------------------------------------------------- derived values
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

    @property
    def damping_schedule(self):
        """The damping's `LearningRateSchedule`, or None for a number."""
        return self.damping if is_schedule(self.damping) else None

    @property
    def initial_damping(self):
        """The damping at step 0, a Python float."""
        if self.damping_schedule is None:
            return self.damping
        return float(keras.ops.convert_to_numpy(self.damping_schedule(0)))

    @property
    def scalings_every(self):
        """`T_scale` of EKFAC (`scale_update_every`, else `cov_update_every`)."""
        return self.scale_update_every or self.cov_update_every

    def get_config(self):
        """The K-FAC options as a JSON-ready dict (schedules serialized), for
        `KFAC.get_config`; Keras's own options (`name`, `learning_rate` and
        the base arguments) come from the base optimizer's config."""
        return {
            "momentum": _serialize_schedule(self.momentum),
            "damping": (_serialize_schedule(self.damping_schedule)
                        if self.damping_schedule is not None else self.initial_damping),
            "damping_mode": self.damping_mode,
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
            "step_rule": self.step_rule,
            "orthogonal_iterations": self.orthogonal_iterations,
            "orthogonal_dtype": self.orthogonal_dtype,
            "orthogonal_step_bound": self.orthogonal_step_bound,
            "nesterov": self.nesterov,
        }
