"""The local quadratic model: exact Fisher products, step size and momentum.

Martens & Grosse 2015, sections 6.4-7. Around the current parameters the
objective `h` is modelled by

    M(delta) = h(theta) + grad^T delta + 1/2 delta^T C delta,   C = F + (lambda + eta) I,

with `F` the *exact* Fisher of the current mini-batch, which for the losses
K-FAC supports equals the generalised Gauss-Newton matrix:

    u^T F v = mean_n c_n (J_n u)^T H_n (J_n v).

`J_n v` is the directional derivative of example `n`'s output along the
parameter direction `v`, computed in forward mode
(`tf.autodiff.ForwardAccumulator`, one extra forward pass per direction, no
per-example Jacobians); `H_n` is the Fisher of the predictive distribution
w.r.t. the model output (`kfac_keras.losses`, `output_fisher_gram`): softmax cross-entropy on
logits `diag(p) - p p^T`, sigmoid cross-entropy on logits `diag(p (1-p))`,
squared error `2 I` (with the `1/d` averaging in `c_n`); on probability
outputs the same Fisher in probability coordinates, `diag(1/p) - 1 1^T` and
`1 / (p (1-p))`. `c_n` is the per-example scale of the Keras loss (reduction,
averaging over outputs and positions, sample weights), as in
`kfac_keras.losses`.

**Step size and momentum** (section 7, `AdaptiveOptions(quadratic_model_step=True)`).
With the preconditioned direction `Delta = -Fhat^{-1} grad` and the previous
update `delta0`, the update `delta = alpha Delta + mu delta0` minimises `M`
when

    [[Delta^T C Delta,  Delta^T C delta0],    [alpha]      [grad^T Delta ]
     [delta0^T C Delta, delta0^T C delta0]] @ [mu   ] = - [grad^T delta0].

On the first step (`delta0 = 0`), or when the system is singular, only
`alpha = -grad^T Delta / Delta^T C Delta` is used and `mu = 0`. The `F`
products need two forward-mode passes per step.

**Cost**: every step with `quadratic_model_step`, two forward-mode passes
(each about 1.5-3x a forward pass); every `T1` steps with `adapt_damping`,
one plain forward pass for `h(theta + delta)`, plus one forward-mode pass
when the step comes from a fixed learning rate.

**Stochastic layers.** The extra passes run the model in training mode, like
the step's own forward pass. Non-trainable state they would change (e.g.
BatchNormalization moving statistics, random-seed state) is put back after
each pass, so the extra passes leave no trace. Dropout draws a fresh mask in
each pass, so with dropout the products and `rho` are noisier estimates.
"""

import dataclasses
import math
import numbers

import tensorflow as tf

from kfac_keras import fisher_products

# --------------------------------------------------------------- options
def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool; received {value!r} of type "
                        f"{type(value).__name__}.")


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number; received {value!r} of type "
                        f"{type(value).__name__}.")
    if not math.isfinite(value) or value <= 0 or value > float(tf.float32.max):
        raise ValueError(
            f"`{name}` must be a finite float32 number > 0; received {value!r}.")


@dataclasses.dataclass(frozen=True)
class AdaptiveOptions:
    """The adaptive parts of the paper's algorithm, for `KFAC(adaptive=...)`.

    Both features use the exact mini-batch Fisher through forward-mode
    products (module docstring), so they need the K-FAC training step
    (`KFACCallback` or `make_train_step`).

    Args:
        quadratic_model_step: bool; choose the step size `alpha` and the
            momentum `mu` every step by minimising the quadratic model
            (paper section 7; alpha only on the first step). `KFAC`'s
            `learning_rate` and `momentum` must then be left unset, and
            `norm_constraint` is not available (the model already sets the
            step length). Defaults to False.
        adapt_damping: bool; adapt the damping `lambda` with the
            Levenberg-Marquardt rule (paper section 6.5, `kfac_keras.damping`)
            every `damping_update_every` steps, starting from `KFAC`'s
            `damping` (which must then be a number, not a schedule).
            Defaults to False.
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
        _check_bool("quadratic_model_step", self.quadratic_model_step)
        _check_bool("adapt_damping", self.adapt_damping)
        every = self.damping_update_every
        if isinstance(every, bool) or not isinstance(every, numbers.Integral):
            raise TypeError(
                f"`damping_update_every` must be an integer; received {every!r}.")
        if not 1 <= every <= 2**31 - 1:
            raise ValueError(
                f"`damping_update_every` must be in [1, {2**31 - 1}]; received {every!r}.")
        _check_positive("min_damping", self.min_damping)
        _check_positive("max_damping", self.max_damping)
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


# ----------------------------------------------------------- list algebra
def dot(first, second):
    """`sum_i <first_i, second_i>` over two aligned lists of tensors (float32)."""
    terms = [tf.reduce_sum(tf.cast(a, tf.float32) * tf.cast(b, tf.float32))
             for a, b in zip(first, second)]
    if not terms:
        return tf.constant(0.0)
    return tf.add_n(terms)


# ------------------------------------------------------- model passes
def _read(variables):
    return [tf.identity(tf.convert_to_tensor(v)) for v in variables]


class BatchQuadraticModel:
    """Exact-Fisher products and loss re-evaluation on one mini-batch.

    Built by the training step for each batch; every method runs the model
    in training mode and then puts back the model's non-trainable variables
    (so a BatchNormalization layer's moving statistics are updated once per
    step, by the step's own forward pass).

    Args:
        model: the Keras model (one output, or several with one loss each).
        distribution: its `kfac_keras.losses.PredictiveDistribution`.
        x: the batch inputs.
        y: the batch targets.
        sample_weight: optional per-example weights.
        loss_fn: callable `(x, y, y_pred, sample_weight) -> scalar loss`, the
            loss of the training step (unscaled).
    """

    def __init__(self, model, distribution, x, y, sample_weight, loss_fn):
        self.model = model
        self.distribution = distribution
        self.x = x
        self.y = y
        self.sample_weight = sample_weight
        self.loss_fn = loss_fn

    def _stateless(self, fn):
        state = list(self.model.non_trainable_variables)
        before = _read(state)
        result = fn()
        with tf.control_dependencies(tf.nest.flatten(result)):
            for variable, value in zip(state, before):
                variable.assign(value)
            return tf.nest.map_structure(tf.identity, result)

    def jacobian_vector_product(self, tangents, variables):
        """`(y_pred, J v)` for the direction `tangents` (aligned with `variables`;
        other parameters stay fixed)."""
        # Forward mode cannot cross a recurrent layer's While loop in graph
        # mode; such models use the double-backward product (fisher_products).
        method = fisher_products.jvp_method(self.model)

        def forward():
            y_pred, jvp = fisher_products.jacobian_vector_product(
                lambda: self.model(self.x, training=True), variables, tangents, method)
            return tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), (y_pred, jvp))

        return self._stateless(forward)

    def fisher_gram(self, directions, variables):
        """The matrix `[u_i^T F u_j]` for a list of parameter directions.

        Args:
            directions: list of K directions, each a list of tensors aligned
                with `variables`.
            variables: the model variables the directions move (the others
                are held fixed).

        Returns:
            A `(K, K)` float32 tensor.
        """
        outputs = [self.jacobian_vector_product(d, variables) for d in directions]
        gram = self.distribution.output_fisher_gram(  # losses.py: per-loss, per-output maths
            outputs[0][0], [jv for _, jv in outputs], self.sample_weight)
        return 0.5 * (gram + tf.transpose(gram))

    def loss(self):
        """The step's loss at the model's current weights, on this batch."""
        def forward():
            y_pred = self.model(self.x, training=True)
            return tf.cast(self.loss_fn(self.x, self.y, y_pred, self.sample_weight),
                           tf.float32)

        return self._stateless(forward)


# ------------------------------------------------------------ 2x2 system
def solve_step_coefficients(curvature, linear, first_step):
    """Minimises `1/2 x^T curvature x + linear^T x` over `x = (alpha, mu)`.

    Args:
        curvature: `(2, 2)` float32 tensor, `[[Delta^T C Delta, Delta^T C delta0],
            [delta0^T C Delta, delta0^T C delta0]]`.
        linear: `(2,)` float32 tensor, `[grad^T Delta, grad^T delta0]`.
        first_step: scalar bool tensor; when True only `alpha` is used.

    Returns:
        `(alpha, mu, change)`, with `change = 1/2 x^T curvature x + linear^T x`,
        the damped model's predicted change. When the 2x2 system is singular
        (or not positive definite) the alpha-only solution is used; when
        `Delta^T C Delta <= 0` (a zero direction) `alpha = 0`.
    """
    curvature = tf.cast(curvature, tf.float32)
    linear = tf.cast(linear, tf.float32)
    m11, m12, m22 = curvature[0, 0], curvature[0, 1], curvature[1, 1]
    b1, b2 = linear[0], linear[1]
    alpha_only = tf.where(m11 > 0.0, -b1 / tf.where(m11 > 0.0, m11, 1.0), 0.0)
    determinant = m11 * m22 - m12 * m12
    well_posed = tf.logical_and(
        tf.logical_not(first_step),
        tf.logical_and(m22 > 0.0, determinant > 1e-6 * tf.abs(m11 * m22)))
    safe_det = tf.where(well_posed, determinant, 1.0)
    alpha_pair = (-m22 * b1 + m12 * b2) / safe_det
    mu_pair = (m12 * b1 - m11 * b2) / safe_det
    alpha = tf.where(well_posed, alpha_pair, alpha_only)
    mu = tf.where(well_posed, mu_pair, 0.0)
    x = tf.stack([alpha, mu])
    change = 0.5 * tf.tensordot(x, tf.linalg.matvec(curvature, x), 1) + tf.tensordot(linear, x, 1)
    return alpha, mu, change


def quadratic_change(coefficients, fisher, norms, linear, curvature_shift):
    """`1/2 x^T (fisher + shift * norms) x + linear^T x` for a 2x2 model.

    Args:
        coefficients: `(2,)` tensor `x = (alpha, mu)`.
        fisher: `(2, 2)` Gram matrix of the directions under `F`.
        norms: `(2, 2)` Gram matrix of the directions (plain inner products).
        linear: `(2,)` gradient inner products.
        curvature_shift: scalar added to `F` (e.g. `eta`, or `lambda + eta`).
    """
    matrix = fisher + curvature_shift * norms
    return (0.5 * tf.tensordot(coefficients, tf.linalg.matvec(matrix, coefficients), 1)
            + tf.tensordot(linear, coefficients, 1))
