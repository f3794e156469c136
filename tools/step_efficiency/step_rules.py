"""Candidate K-FAC step rules for issue 12, as options of a `kfac_keras.KFAC` subclass.

`StepRuleKFAC` keeps the library's curvature pipeline (factors, Cholesky
inverses, sampling, the non-finite guards) and replaces the step rule that
turns the preconditioned gradient `P = (F + lambda I)^{-1} g` into an update.
Rules act per Kronecker block on the block matrix `V` (`[K; b]` for a Dense
layer, `(kh*kw*cin + 1, cout)` for a convolution; `block.grads_to_matrix`);
variables without a Kronecker block (LayerNormalization, position
embeddings, ...) take the `"kl"` rule below at the learning rate times
`other_lr_ratio`.

Step rules (`step_rule`), with momentum `mu`, learning rate `lr`:

* `"kl"`: KL clip without the learning rate (lead a). One global scale
  `s = min(1, sqrt(c / (P^T g)))` (`P^T g = P^T (F + lambda) P`), then
  `v <- mu v - lr s P`; identical to the library's rule at `lr = 1`.
* `"kl_layer"`: the same clip per block, `s_l = min(1, sqrt(c / (P_l^T g_l)))`.
* `"rms"`: Muon-like fixed RMS per block: buffer `m <- mu m + P`, update
  `-lr * 0.2 * m / rms(m)` (Keras's Muon: polar factor times
  `0.2 sqrt(max(fan_in, fan_out))`, whose RMS is 0.2).
* `"rms_cap"`: the natural step capped at the fixed RMS: buffer `m <- mu m + P`,
  update `-lr * min(natural_lr_ratio, 0.2 / rms(m)) * m` per block, so a block
  whose K-FAC step (at learning rate `lr * natural_lr_ratio`) is already
  small takes it unchanged (convex problems converge), and a large one is
  cut to RMS `0.2 lr` (Muon's size).
* `"graft_adam"` / `"graft_sgd"`: buffer `m <- mu m + P`, update
  `-lr * m * ||a|| / ||m||` per block, with `a` Adam's step
  (`mhat / (sqrt(vhat) + eps)`, beta 0.9/0.999) or the SGD-momentum buffer.
* `"ortho"`: buffer `m <- mu m + P`, update `-lr * 0.2 sqrt(max(n_in, n_out))
  * NS_k(m)`, NS_k = `ns_steps` Newton-Schulz iterations towards the polar
  factor (lead 6); blocks whose smaller side is below `ortho_min_dim` take
  the `"rms"` update instead. With `ortho_every = k > 1` the iterations run
  only every k-th step: each iteration left-multiplies the (short side first)
  matrix `X0 = P / ||P||` by a polynomial of `X X^T`, so `NS_k(X0) = S X0`
  with a small square `S` (~ `(X0 X0^T)^{-1/2}`, the polar scaling); it is
  kept, and the steps between use `S X0` of the new `P`, rescaled to the
  Frobenius norm `sqrt(short side)` of an orthogonal matrix (one matmul
  instead of `2 ns_steps + ...`).
* `"kl_velocity"`: the KL clip on the update actually taken (the velocity)
  instead of on the new step: `u = mu v - lr P`, `v <- s u` with
  `s = min(1, lr sqrt(c / (u^T C u)))`, `C` the damped curvature that
  `precondition` inverts (so the learning rate still scales the step, as in
  the library's rule). `u^T C u = mu^2 v^T C v - 2 mu lr v^T g + lr^2 P^T g`
  (`C P = g`), with `v^T C v` carried from the previous step (exact while the
  inverses are unchanged, stale by one inverse update otherwise): three dot
  products, no extra curvature product.

* `"ortho_len"` (S5-convex): the orthogonal direction of the library's
  default (`D`: per block `0.2 sqrt(max(n_in, n_out)) NS_k(P)`, RMS entry
  0.2, the rest KL-clipped `P`), with its *length* from the quadratic model
  `M(delta) = g^T delta + 1/2 delta^T (F + lambda I) delta` of the batch
  (`F` by the library's forward-mode Fisher products, `batch.fisher_gram`
  of `[u, p]`, `u = -D`, `p = mu v` the heavy-ball part of the update,
  `lambda` the K-FAC damping), one global length per step. With
  `C = [[u'(F+l)u, u'(F+l)p], [.., p'(F+l)p]]`, `b = [g'u, g'p]`,
  `t* = -(b_0 + C_01) / C_00` (the best length given the momentum part),
  `length_rule`:

  - `"model"`: `delta = (lr / length_lr_ref) t* u + p` (at the reference
    learning rate the model's step; halving lr halves the new part);
  - `"model_mu"`: the paper's 2x2 solve `C [t, s] = -b`, `delta = (lr /
    length_lr_ref) (t u + s p)` (`s = 0` on the first step);
  - `"cap"`: `delta = min(max(t*, 0), lr) u + p`: the model's step when it is
    shorter than the fixed-RMS step `lr u` of the library's rule, else that;
  - `"trust"`: `delta = min(max(t*, 0), m lr) u + p`, with a multiplier
    `m` in `[1, trust_max]` adapted after each step by the reduction ratio
    `rho = (L(theta + delta) - L(theta)) / (g'delta + 1/2 delta'F delta)` on
    the same batch (one more forward pass): `m <- trust_grow m` when
    `rho > 3/4` and the cap bound, `m <- m / trust_grow` when `rho < 1/4`.
  - `"trust_mu"`: the 2x2 solve's update `delta* = t u + s p`, cut to the RMS
    entry `R = 0.2 m length_lr_ref` when longer (a trust region in the units
    of the library's fixed step, `m` adapted by `rho` as in `"trust"`, in
    `[trust_min, trust_max]`), then times `lr / length_lr_ref`:
    `delta = (lr / length_lr_ref) min(1, R / rms(delta*)) delta*`.
  - `"trust_mu_floor"`: `"trust_mu"`, but the library's update `lr u + p`
    when that is longer and the previous step's `rho >= 1/4`.

  `effective_step` logs the length `t` actually taken (in units of `u`).

`kl_relative_to_loss`: the KL clips use `c * loss` (the batch loss before the
step) instead of `c`, so that multiplying the loss by a constant changes
nothing once the damping is relative too.

Curvature options: `relative_damping` (lead e): every Kronecker block is
decomposed with `lambda_l = lambda * mean_eig(A_l) * mean_eig(G_l)` (the
damping variable then holds `lambda_rel`; with the factored Tikhonov split
this adds `sqrt(lambda_rel) * mean_eig` to each factor). `warmup_steps`
(lead d): statistics and inverses every step for the first N steps.
The Levenberg-Marquardt rule (the library's `adaptive`) judges the update
actually taken: `M(delta) - M(0) = 1/2 delta^T F delta + g^T delta`.
"""

import keras
import tensorflow as tf

import kfac_keras
from kfac_keras import guards
from kfac_keras import linalg
from kfac_keras import quadratic_model
from kfac_keras.blocks.kronecker import KroneckerBlock

STEP_RULES = ("library", "kl", "kl_layer", "rms", "rms_cap", "graft_adam", "graft_sgd",
              "ortho", "kl_velocity", "ortho_len")
#: `length_rule` values of the `"ortho_len"` rule (module docstring).
LENGTH_RULES = ("model", "model_mu", "cap", "trust", "trust_mu", "trust_mu_floor")
#: Quintic Newton-Schulz coefficients (a, b, c): X <- a X + (b A + c A^2) X,
#: A = X X^T; they push all singular values of a normalised X towards ~1 fast.
QUINTIC = (3.4445, -4.7750, 2.0315)
MUON_RMS = 0.2


def newton_schulz(matrix, steps):
    """Approximate polar factor of `matrix` by `steps` quintic Newton-Schulz
    iterations, after scaling to Frobenius norm 1 (singular values <= 1)."""
    a, b, c = QUINTIC
    transpose = matrix.shape[0] > matrix.shape[1]
    x = tf.transpose(matrix) if transpose else matrix
    x = x / (tf.norm(x) + 1e-7)
    for _ in range(steps):
        gram = tf.matmul(x, x, transpose_b=True)
        x = a * x + tf.matmul(b * gram + c * tf.matmul(gram, gram), x)
    return tf.transpose(x) if transpose else x


def newton_schulz_scaling(matrix, steps):
    """`(O, S)`: `O` as `newton_schulz(matrix, steps)` and the square matrix
    `S` (side `min(matrix.shape)`) with `O = S X0` (`X0` = `matrix / ||matrix||`,
    short side first) resp. its transpose."""
    a, b, c = QUINTIC
    transpose = matrix.shape[0] > matrix.shape[1]
    x = tf.transpose(matrix) if transpose else matrix
    x = x / (tf.norm(x) + 1e-7)
    scaling = tf.eye(x.shape[0], dtype=x.dtype)
    for _ in range(steps):
        gram = tf.matmul(x, x, transpose_b=True)
        poly = a * tf.eye(x.shape[0], dtype=x.dtype) + b * gram + c * tf.matmul(gram, gram)
        x = tf.matmul(poly, x)
        scaling = tf.matmul(poly, scaling)
    return (tf.transpose(x) if transpose else x), scaling


def apply_scaling(matrix, scaling):
    """`S X0` for a new `matrix` (see `newton_schulz_scaling`), rescaled to the
    Frobenius norm `sqrt(min(matrix.shape))` of an orthogonal matrix."""
    transpose = matrix.shape[0] > matrix.shape[1]
    x = tf.transpose(matrix) if transpose else matrix
    y = tf.matmul(scaling, x / (tf.norm(x) + 1e-7))
    y = y * (float(x.shape[0]) ** 0.5 / (tf.norm(y) + 1e-7))
    return tf.transpose(y) if transpose else y


def warm_newton_schulz(matrix, scaling, steps, power_steps=4):
    """`steps` quintic Newton-Schulz iterations started from the stale polar
    estimate `S X0` instead of `X0` (see `newton_schulz_scaling`); the start is
    divided by its largest singular value (`power_steps` power iterations with
    matrix-vector products, times 1.05) so that the iteration converges."""
    a, b, c = QUINTIC
    transpose = matrix.shape[0] > matrix.shape[1]
    x = tf.transpose(matrix) if transpose else matrix
    y = tf.matmul(scaling, x / (tf.norm(x) + 1e-7))
    u = tf.ones([y.shape[0], 1], y.dtype)
    for _ in range(power_steps):
        u = tf.matmul(y, tf.matmul(y, u, transpose_a=True))
        u = u / (tf.norm(u) + 1e-12)
    top = tf.norm(tf.matmul(y, u, transpose_a=True))
    y = y / (1.05 * top + 1e-7)
    for _ in range(steps):
        gram = tf.matmul(y, y, transpose_b=True)
        y = a * y + tf.matmul(b * gram + c * tf.matmul(gram, gram), y)
    return tf.transpose(y) if transpose else y


class InverseSqrtDecay(keras.optimizers.schedules.LearningRateSchedule):
    """`lr / sqrt(1 + (1/f^2 - 1) t / T)`: from `lr` at step 0 to `f lr` at `T`
    (then on down as `1/sqrt(t)`).

    Args:
        initial_learning_rate: float, `lr`.
        decay_steps: int, `T`.
        final_fraction: float in (0, 1], `f`. Defaults to 0.1.
    """

    def __init__(self, initial_learning_rate, decay_steps, final_fraction=0.1):
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = int(decay_steps)
        self.final_fraction = float(final_fraction)

    def __call__(self, step):
        t = tf.cast(step, tf.float32) / float(self.decay_steps)
        return self.initial_learning_rate / tf.sqrt(
            1.0 + (1.0 / self.final_fraction**2 - 1.0) * t)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "final_fraction": self.final_fraction}


def learning_rate_schedule(learning_rate, kind, steps, final_fraction=0.1):
    """A decaying schedule from `learning_rate` to `final_fraction` of it at `steps`.

    Args:
        learning_rate: float, initial value.
        kind: `"cosine"` (Keras `CosineDecay`, `alpha = final_fraction`) or
            `"inv_sqrt"` (`InverseSqrtDecay`).
        steps: int, steps of the decay.
        final_fraction: float. Defaults to 0.1.
    """
    if kind == "cosine":
        return keras.optimizers.schedules.CosineDecay(learning_rate, steps, alpha=final_fraction)
    if kind == "inv_sqrt":
        return InverseSqrtDecay(learning_rate, steps, final_fraction)
    raise ValueError(f"lr schedule kind must be 'cosine' or 'inv_sqrt'; received {kind!r}.")


def _dot(first, second):
    return tf.add_n([tf.reduce_sum(tf.cast(a, tf.float32) * tf.cast(b, tf.float32))
                     for a, b in zip(first, second)])


class StepRuleKFAC(kfac_keras.KFAC):
    """`kfac_keras.KFAC` with a replaceable step rule (see the module docstring).

    Args:
        step_rule: one of `STEP_RULES`; `"library"` keeps `KFAC.apply_step`.
            Defaults to `"kl"`.
        kl_bound: float > 0, `c` of the `"kl"`/`"kl_layer"` clips. Defaults
            to 1e-4.
        ns_steps: int >= 1, Newton-Schulz iterations of `"ortho"`. Defaults to 2.
        ortho_min_dim: int, smallest block side that `"ortho"` orthogonalises.
            Defaults to 0 (every block).
        other_lr_ratio: float, learning-rate multiplier of the `"kl"` step of
            variables without a Kronecker block (and, for `"rms"`, `"graft_*"`
            and `"ortho"`, the learning rate is in their own units). Defaults
            to 1.0.
        relative_damping: bool, per-block damping relative to the factor
            scale. Defaults to False.
        warmup_steps: int >= 0, steps with statistics and inverses every step.
            Defaults to 0.
        nesterov: bool, Nesterov form of the buffer (`P + mu m`) for the
            buffer rules. Defaults to False.
        natural_lr_ratio: float > 0, `"rms_cap"`'s uncapped step is the K-FAC
            step at `lr * natural_lr_ratio`. Defaults to 100 (the full step at
            lr 1e-2).
        kl_relative_to_loss: bool, clip with `c * loss`. Defaults to False.
        momentum_after: bool, for `"rms"`/`"ortho"`: normalise or
            orthogonalise `P` itself and add heavy-ball momentum after
            (`v <- mu v - lr * step(P)`, lead 6 as first measured) instead of
            normalising the momentum buffer (Muon's order). Defaults to False.
        ortho_every: int >= 1, `"ortho"` runs its Newton-Schulz iterations
            every this many steps and reuses the polar scaling between.
            Defaults to 1.
        ortho_refine_steps: int >= 0, with `ortho_every > 1`: 0 uses `S X0`
            rescaled (`apply_scaling`) between full steps; n > 0 runs n
            Newton-Schulz iterations from `S X0` (`warm_newton_schulz`).
            Defaults to 0.
        length_rule: one of `LENGTH_RULES`, how `"ortho_len"` sets the
            length. Defaults to `"model"`.
        length_lr_ref: float > 0, the learning rate at which `"model"` /
            `"model_mu"` take the model's step. Defaults to 1e-2 (the
            orthogonal rule's default learning rate).
        trust_grow: float > 1, `"trust"`'s factor on `m`. Defaults to 2.
        trust_max: float >= 1, `"trust"`'s largest `m`. Defaults to 1e6.
        trust_min: float in (0, trust_init], the smallest `m`. Defaults to 1.
        trust_reject: bool, `"trust"`/`"trust_mu"` undo a step that raised
            the batch loss (weights and velocity back; the velocity set to
            zero). Defaults to False.
        length_damping: float >= 0, the `lambda` of the length's quadratic
            model is this times the K-FAC damping. Defaults to 1.
        trust_init: float >= 1, the first `m` (10 = `1 / (1 - 0.9)`: the
            RMS of the library's heavy-ball velocity at a steady direction).
            Defaults to 1.
        **kwargs: `kfac_keras.KFAC` arguments (`learning_rate`, `momentum`,
            `damping`, `adaptive`, `cov_update_every`, ...). `norm_constraint`
            is forced to None for rules other than `"library"` (they clip
            themselves).
    """

    def __init__(self, step_rule="kl", kl_bound=1e-4, ns_steps=2, ortho_min_dim=0,
                 other_lr_ratio=1.0, relative_damping=False, warmup_steps=0,
                 nesterov=False, natural_lr_ratio=100.0, kl_relative_to_loss=False,
                 momentum_after=False, ortho_every=1, ortho_refine_steps=0,
                 length_rule="model", length_lr_ref=1e-2, trust_grow=2.0, trust_max=1e6,
                 trust_min=1.0, trust_init=1.0, length_damping=1.0,
                 trust_reject=False, **kwargs):
        if step_rule not in STEP_RULES:
            raise ValueError(f"`step_rule` must be one of {STEP_RULES}; received {step_rule!r}.")
        if length_rule not in LENGTH_RULES:
            raise ValueError(f"`length_rule` must be one of {LENGTH_RULES}; received "
                             f"{length_rule!r}.")
        if not (length_lr_ref > 0 and trust_grow > 1 and trust_max >= 1):
            raise ValueError("need length_lr_ref > 0, trust_grow > 1 and trust_max >= 1; "
                             f"received {length_lr_ref!r}, {trust_grow!r}, {trust_max!r}.")
        if step_rule == "ortho_len" and kwargs.get("adaptive", "auto") is None:
            raise ValueError("step_rule='ortho_len' needs the batch's quadratic model: "
                             "leave `adaptive` at 'auto' or pass adaptive options.")
        if step_rule != "library":
            if kwargs.get("norm_constraint") not in (None, "auto"):
                raise ValueError("pass the clip as `kl_bound` for step rules other than "
                                 "'library'.")
            kwargs["norm_constraint"] = None
        super().__init__(**kwargs)
        self.candidate_rule = step_rule
        self.kl_bound = float(kl_bound)
        self.ns_steps = int(ns_steps)
        self.ortho_min_dim = int(ortho_min_dim)
        self.other_lr_ratio = float(other_lr_ratio)
        self.relative_damping = bool(relative_damping)
        self.warmup_steps = int(warmup_steps)
        self.buffer_nesterov = bool(nesterov)  # the library has its own `nesterov`
        self.natural_lr_ratio = float(natural_lr_ratio)
        self.kl_relative_to_loss = bool(kl_relative_to_loss)
        self._bound = None
        self.momentum_after = bool(momentum_after)
        if int(ortho_every) < 1:
            raise ValueError(f"`ortho_every` must be >= 1; received {ortho_every!r}.")
        self.ortho_every = int(ortho_every)
        self.ortho_refine_steps = int(ortho_refine_steps)
        self.polar_scalings = {}
        self.length_rule = length_rule
        self.length_lr_ref = float(length_lr_ref)
        self.trust_grow = float(trust_grow)
        self.trust_max = float(trust_max)
        self.trust_min = float(trust_min)
        self.trust_init = float(trust_init)
        if not length_damping >= 0:
            raise ValueError(f"`length_damping` must be >= 0; received {length_damping!r}.")
        self.length_damping = float(length_damping)
        self.trust_reject = bool(trust_reject)
        if not (0 < self.trust_min <= self.trust_init and self.trust_init >= 1):
            raise ValueError("need 0 < trust_min <= trust_init and trust_init >= 1; received "
                             f"{trust_min!r}, {trust_init!r}.")
        self.trust_multiplier = None
        self.effective_step = None
        self.velocity_quadratic = None

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        if self.candidate_rule in ("rms", "rms_cap", "graft_adam", "graft_sgd", "ortho"):
            self.buffers = self.add_optimizer_variables(variables, "direction_buffer")
        if self.candidate_rule == "graft_adam":
            self.adam_first = self.add_optimizer_variables(variables, "adam_m")
            self.adam_second = self.add_optimizer_variables(variables, "adam_v")
        if self.candidate_rule == "graft_sgd":
            self.sgd_buffers = self.add_optimizer_variables(variables, "sgd_m")
        self.effective_step = tf.Variable(0.0, trainable=False, name="effective_step")
        if self.candidate_rule == "ortho_len":
            self.trust_multiplier = tf.Variable(self.trust_init, trainable=False,
                                                name="trust_multiplier")
            self.last_rho_ok = tf.Variable(True, trainable=False, name="last_rho_ok")
        if self.step_rule == "kl_velocity":
            self.velocity_quadratic = tf.Variable(0.0, trainable=False,
                                                  name="velocity_quadratic")

    def attach(self, model):
        registration = super().attach(model)
        if self.step_rule == "ortho" and self.ortho_every > 1 and not self.polar_scalings:
            for block in registration.blocks:
                if isinstance(block, KroneckerBlock):
                    shape = block.grads_to_matrix(
                        [tf.zeros(v.shape, tf.float32) for v in block.variables]).shape
                    side = min(shape)
                    self.polar_scalings[block.name] = tf.Variable(
                        tf.eye(side), trainable=False, name=f"polar_scaling_{len(self.polar_scalings)}")
        return registration

    # ------------------------------------------------------ curvature timing
    def _step(self):
        """The step counter (int64), as the curvature schedule reads it."""
        return self.curvature.step()

    def statistics_due(self):
        due = super().statistics_due()
        if self.warmup_steps:
            due = tf.logical_or(due, self._step() < self.warmup_steps)
        return due

    def inverses_due(self, statistics_updated):
        due = super().inverses_due(statistics_updated)
        if self.warmup_steps:
            due = tf.logical_or(due, tf.logical_and(statistics_updated,
                                                    self._step() < self.warmup_steps))
        return due

    def _decompose(self):
        if not self.relative_damping:
            return super()._decompose()
        damping = self.total_damping()
        flags = []
        for block in self._registration.blocks:
            block_damping = damping
            if isinstance(block, KroneckerBlock):
                block_damping = damping * tf.maximum(
                    linalg.mean_diagonal(block.input_factor)
                    * linalg.mean_diagonal(block.output_grad_factor), 1e-30)
            flags.extend(guards.decompose_blocks([block], block_damping))
        guards.raise_damping_unless(self, guards.all_true(flags))
        return tf.constant(True)

    # ------------------------------------------------------------ step rule
    def logged_values(self):
        values = super().logged_values()
        if self.effective_step is not None:
            values["effective_step"] = tf.convert_to_tensor(self.effective_step)
        return values

    def _groups(self, variables):
        """Per Kronecker block `(block, [indices])`, then one group of the rest."""
        index = {id(v): i for i, v in enumerate(variables)}
        groups, covered = [], set()
        for block in self._registration.blocks:
            members = [index[id(v)] for v in block.variables if id(v) in index]
            if not members:
                continue
            if isinstance(block, KroneckerBlock) and len(members) == len(block.variables):
                groups.append((block, members))
                covered.update(members)
        rest = [i for i in range(len(variables)) if i not in covered]
        return groups, rest

    def _slot(self, slots, variable):
        return slots[self._get_variable_index(variable)]

    def _buffer_update(self, variable, direction):
        buffer = self._slot(self.buffers, variable)
        momentum = tf.cast(self.current_momentum(), tf.float32)
        new = momentum * buffer + direction
        buffer.assign(new)
        return direction + momentum * new if self.buffer_nesterov else new

    def _rule_directions(self, block, members, grads, precond, variables):
        """Unscaled-by-lr step (to be multiplied by `-lr`) of one block's variables,
        or None for the KL rules (handled with momentum by `_kl_updates`)."""
        rule = self.candidate_rule
        if self.momentum_after and rule in ("rms", "ortho"):
            directions = [precond[i] for i in members]
        else:
            directions = [self._buffer_update(variables[i], precond[i]) for i in members]
        if rule == "rms_cap":
            rms = tf.sqrt(_dot(directions, directions)
                          / float(sum(d.shape.num_elements() for d in directions)))
            scale = tf.minimum(self.natural_lr_ratio, MUON_RMS / (rms + 1e-12))
            return [d * scale for d in directions]
        if rule in ("rms", "ortho"):
            matrix = block.grads_to_matrix(directions)
            rows, cols = matrix.shape
            if rule == "ortho" and min(rows, cols) >= self.ortho_min_dim:
                step = self._orthogonalise(block, matrix) * (
                    MUON_RMS * max(rows, cols) ** 0.5)
            else:
                rms = tf.sqrt(tf.reduce_mean(tf.square(matrix)))
                step = matrix * (MUON_RMS / (rms + 1e-12))
            return block.matrix_to_grads(step)
        if rule == "graft_adam":
            beta1, beta2, eps = 0.9, 0.999, 1e-7
            t = tf.cast(self._step() + 1, tf.float32)
            size = []
            for i in members:
                v = variables[i]
                m = self._slot(self.adam_first, v)
                s = self._slot(self.adam_second, v)
                m.assign(beta1 * m + (1 - beta1) * grads[i])
                s.assign(beta2 * s + (1 - beta2) * tf.square(grads[i]))
                size.append(tf.reduce_sum(tf.square(
                    (m / (1 - beta1**t)) / (tf.sqrt(s / (1 - beta2**t)) + eps))))
        else:  # graft_sgd
            momentum = tf.cast(self.current_momentum(), tf.float32)
            size = []
            for i in members:
                m = self._slot(self.sgd_buffers, variables[i])
                m.assign(momentum * m + grads[i])
                size.append(tf.reduce_sum(tf.square(m)))
        target = tf.sqrt(tf.add_n(size))
        norm = tf.sqrt(_dot(directions, directions))
        return [d * (target / (norm + 1e-12)) for d in directions]

    def _orthogonalise(self, block, matrix):
        if self.ortho_every == 1:
            return newton_schulz(matrix, self.ns_steps)
        store = self.polar_scalings[block.name]

        def full():
            polar, scaling = newton_schulz_scaling(matrix, self.ns_steps)
            store.assign(scaling)
            return polar

        return tf.cond(tf.equal(self._step() % self.ortho_every, 0), full,
                       lambda: (warm_newton_schulz(matrix, store, self.ortho_refine_steps)
                                if self.ortho_refine_steps else apply_scaling(matrix, store)))

    def _ortho_direction(self, block, members, precond):
        """`D` of one block: `0.2 sqrt(max(rows, cols)) NS_k(P)` (or the
        fixed-RMS `P` below `ortho_min_dim`), momentum not included."""
        matrix = block.grads_to_matrix([precond[i] for i in members])
        rows, cols = matrix.shape
        if min(rows, cols) >= self.ortho_min_dim:
            step = newton_schulz(matrix, self.ns_steps) * (MUON_RMS * max(rows, cols) ** 0.5)
        else:
            step = matrix * (MUON_RMS / (tf.sqrt(tf.reduce_mean(tf.square(matrix))) + 1e-12))
        return block.matrix_to_grads(step)

    def _length_deltas(self, u, p, grads, variables, batch, lr):
        """`"ortho_len"`: the update from the direction `u`, the momentum part
        `p` and the batch's quadratic model (module docstring). Returns
        `(deltas, t, predicted)`: `predicted` is the undamped model change of
        `deltas` (`"trust"` judges the step by it)."""
        damping = self.length_damping * tf.cast(self.total_damping(), tf.float32)
        gram = batch.fisher_gram([u, p], variables)
        self._length_cap_bound = None
        uu, up, pp = _dot(u, u), _dot(u, p), _dot(p, p)
        c00 = gram[0, 0] + damping * uu
        c01 = gram[0, 1] + damping * up
        c11 = gram[1, 1] + damping * pp
        b0, b1 = _dot(grads, u), _dot(grads, p)
        safe = tf.where(c00 > 0, c00, 1.0)
        t_best = tf.where(c00 > 0, -(b0 + c01) / safe, 0.0)
        ratio = lr / self.length_lr_ref
        rule = self.length_rule
        if rule in ("model_mu", "trust_mu", "trust_mu_floor"):
            det = c00 * c11 - c01 * c01
            solvable = tf.logical_and(pp > 0, det > 1e-12 * tf.abs(c00 * c11))
            det_safe = tf.where(solvable, det, 1.0)
            t = tf.where(solvable, (-b0 * c11 + b1 * c01) / det_safe, -b0 / safe)
            s = tf.where(solvable, (-b1 * c00 + b0 * c01) / det_safe, 0.0)
            if rule in ("trust_mu", "trust_mu_floor"):
                size = tf.sqrt(tf.maximum(t * t * uu + 2 * t * s * up + s * s * pp, 0.0)
                               / float(sum(a.shape.num_elements() for a in u)))
                radius = MUON_RMS * self.trust_multiplier * self.length_lr_ref
                cut = tf.minimum(1.0, radius / (size + 1e-30))
                self._length_cap_bound = cut < 1.0
                t, s = cut * t, cut * s
            t, s = ratio * t, ratio * s
            if rule == "trust_mu_floor":
                model_size = t * t * uu + 2 * t * s * up + s * s * pp
                library_size = lr * lr * uu + 2 * lr * up + pp
                use_library = tf.logical_and(model_size < library_size, self.last_rho_ok)
                t, s = tf.where(use_library, lr, t), tf.where(use_library, 1.0, s)
        elif rule == "model":
            t, s = ratio * t_best, tf.constant(1.0)
        else:
            bound = lr if rule == "cap" else self.trust_multiplier * lr
            t, s = tf.clip_by_value(t_best, 0.0, bound), tf.constant(1.0)
        deltas = [t * a + s * b for a, b in zip(u, p)]
        predicted = (t * b0 + s * b1 + 0.5 * (t * t * gram[0, 0] + 2 * t * s * gram[0, 1]
                                              + s * s * gram[1, 1]))
        if rule == "trust":
            self._length_cap_bound = t >= (1.0 - 1e-6) * self.trust_multiplier * lr
        return deltas, t, predicted

    def _adapt_trust(self, loss, predicted, batch):
        """`"trust"`: `m` from the reduction ratio of the step just taken."""
        actual = tf.cast(batch.loss(), tf.float32) - tf.cast(loss, tf.float32)
        rho = tf.where(predicted < 0, actual / tf.where(predicted < 0, predicted, -1.0), -1.0)
        m = self.trust_multiplier
        grown = tf.where(tf.logical_and(rho > 0.75, self._length_cap_bound),
                         m * self.trust_grow, m)
        new = tf.where(rho < 0.25, m / self.trust_grow, grown)
        m.assign(tf.clip_by_value(new, self.trust_min, self.trust_max))
        self.last_rho_ok.assign(rho >= 0.25)
        return actual

    def _kl_scale(self, grads, precond):
        quadratic = _dot(precond, grads)
        bound = self.kl_bound if self._bound is None else self._bound
        return tf.where(quadratic > 0, tf.minimum(1.0, tf.sqrt(
            bound / tf.where(quadratic > 0, quadratic, 1.0))), 1.0)

    def apply_step(self, grads, trainable_variables, batch=None, loss=None):
        if self.candidate_rule == "library":
            return super().apply_step(grads, trainable_variables, batch=batch, loss=loss)
        if self._registration is None:
            raise RuntimeError("attach the optimizer first (make_train_step / KFACCallback)")
        pairs = [(g, v) for g, v in zip(grads, trainable_variables) if g is not None]
        grads = [tf.cast(tf.convert_to_tensor(g), tf.float32) for g, _ in pairs]
        variables = [v for _, v in pairs]
        if self.l2_reg:
            raise ValueError("StepRuleKFAC does not implement l2_reg.")
        precond = [tf.cast(p, tf.float32) for p in self.precondition(grads, variables)]
        lr = tf.cast(self._get_current_learning_rate(), tf.float32)
        momentum = tf.cast(self.current_momentum(), tf.float32)
        previous = [tf.convert_to_tensor(self.velocities[self._get_variable_index(v)])
                    for v in variables]
        groups, rest = self._groups(variables)
        self._bound = None
        if self.kl_relative_to_loss:
            if loss is None:
                raise ValueError("kl_relative_to_loss needs the loss (use make_train_step).")
            self._bound = self.kl_bound * tf.abs(tf.cast(loss, tf.float32))
        deltas = [None] * len(variables)
        if self.candidate_rule in ("kl", "kl_layer"):
            if self.candidate_rule == "kl":
                scale = self._kl_scale(grads, precond)
                scales = [scale] * len(variables)
            else:
                scales = [None] * len(variables)
                for _, members in groups:
                    s = self._kl_scale([grads[i] for i in members], [precond[i] for i in members])
                    for i in members:
                        scales[i] = s
                if rest:
                    s = self._kl_scale([grads[i] for i in rest], [precond[i] for i in rest])
                    for i in rest:
                        scales[i] = s
                scale = tf.reduce_mean(tf.stack([scales[i] for i, _ in enumerate(variables)]))
            for i in range(len(variables)):
                deltas[i] = momentum * previous[i] - lr * scales[i] * precond[i]
            self.effective_step.assign(lr * scale)
        elif self.step_rule == "kl_velocity":
            carried = self.velocity_quadratic
            quadratic = (momentum**2 * carried - 2.0 * momentum * lr * _dot(previous, grads)
                         + lr**2 * _dot(precond, grads))
            bound = lr**2 * (self.kl_bound if self._bound is None else self._bound)
            scale = tf.where(quadratic > 0, tf.minimum(1.0, tf.sqrt(
                bound / tf.where(quadratic > 0, quadratic, 1.0))), 1.0)
            for i in range(len(variables)):
                deltas[i] = scale * (momentum * previous[i] - lr * precond[i])
            carried.assign(tf.maximum(scale**2 * quadratic, 0.0))
            self.effective_step.assign(lr * scale)
        elif self.candidate_rule == "ortho_len":
            if batch is None or loss is None:
                raise ValueError("step_rule='ortho_len' needs the batch and its loss "
                                 "(use make_train_step).")
            directions = [None] * len(variables)
            for block, members in groups:
                for i, d in zip(members, self._ortho_direction(block, members, precond)):
                    directions[i] = d
            if rest:
                s = self._kl_scale([grads[i] for i in rest], [precond[i] for i in rest])
                for i in rest:
                    directions[i] = self.other_lr_ratio * s * precond[i]
            u = [-d for d in directions]
            p = [momentum * v for v in previous]
            deltas, length, length_prediction = self._length_deltas(u, p, grads, variables,
                                                                    batch, lr)
            self.effective_step.assign(length)
        else:
            for block, members in groups:
                for i, d in zip(members, self._rule_directions(block, members, grads,
                                                               precond, variables)):
                    deltas[i] = (momentum * previous[i] - lr * d if self.momentum_after
                                 else -lr * d)
            if rest:
                s = self._kl_scale([grads[i] for i in rest], [precond[i] for i in rest])
                for i in rest:
                    deltas[i] = (momentum * previous[i]
                                 - self.other_lr_ratio * lr * s * precond[i])
            self.effective_step.assign(lr)
        if self.adapts_damping:
            adapt_now = self.damping_adaptation_due()

            def predicted():
                fisher = batch.fisher_gram([deltas], variables)[0, 0]
                change = 0.5 * fisher + _dot(grads, deltas)
                self._diagnostics.qmodel_change.assign(change)
                return change

            change = tf.cond(adapt_now, predicted, lambda: tf.constant(0.0))
        for v, d in zip(variables, deltas):
            self.velocities[self._get_variable_index(v)].assign(d)
            v.assign_add(tf.cast(d, v.dtype))
        self._iterations.assign_add(1)
        self._diagnostics.update_norm.assign(tf.sqrt(_dot(deltas, deltas)))
        if self.candidate_rule == "ortho_len" and self.length_rule in ("trust", "trust_mu",
                                                                         "trust_mu_floor"):
            actual = self._adapt_trust(loss, length_prediction, batch)
            if self.trust_reject:
                reject = actual > 0
                for v, d in zip(variables, deltas):
                    v.assign_sub(tf.where(reject, tf.cast(d, v.dtype), tf.zeros_like(v)))
                    velocity = self.velocities[self._get_variable_index(v)]
                    velocity.assign(tf.where(reject, tf.zeros_like(velocity), velocity))
        if self.adapts_damping:
            tf.cond(adapt_now,
                    lambda: self._adaptive_step.adapt_damping(loss, change, deltas, variables, batch),
                    lambda: tf.constant(False))
