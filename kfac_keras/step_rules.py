"""Step rules: how a preconditioned gradient becomes an update, and how the
damping follows the results. Pure functions (tensors in, tensors out, no
variable assignment); `kfac_keras.KFAC` assigns what they return. A new rule
(per-layer grafting, another trust-region test, ...) is one more function
here.

Notation (Martens & Grosse 2015, sections 6-7; KFAC_NOTES): `grad` is the
gradient of the objective `h` (including `eta theta` for `l2_reg = eta`),
`Delta = (Fhat + lambda + eta)^{-1} grad` the preconditioned gradient,
`delta0` the previous update (the momentum slot), `F` the exact mini-batch
Fisher (`kfac_keras.quadratic_model`) and

    M(delta) - M(0) = grad^T delta + 1/2 delta^T (F + shift I) delta

the local quadratic model, with `shift = eta` (undamped, used for `rho`) or
`lambda + eta` (damped, minimised by the quadratic-model step).

**KL clipping** (after Ba, Grosse & Martens 2017): `Delta` is scaled by
`min(1, sqrt(c / (Delta^T grad)))`, since `Delta^T grad = Delta^T
(Fhat + lambda + eta) Delta`, and the learning rate multiplies the result, so
it always scales the step.

**Quadratic-model step** (section 7): `delta = alpha (-Delta) + mu delta0`
with `(alpha, mu)` minimising the damped model, a 2x2 linear system; on the
first step (`delta0 = 0`) or when the system is singular, `alpha` alone and
`mu = 0`.

**Levenberg-Marquardt damping** (section 6.5). Every `T1` steps
(`AdaptiveOptions.damping_update_every`) the reduction ratio

    rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0))

is measured on the same mini-batch, with the *undamped* model (as in the
paper, `rho` measures how well the local model predicts the objective; the
damped model is the one the step minimises). Then, with `omega1 =
(19/20)^T1`: `rho > 3/4`: `lambda <- omega1 lambda`; `rho < 1/4` or `rho`
undefined (a non-finite loss after the step, or a model that predicts no
decrease): `lambda <- lambda / omega1`; otherwise unchanged; `lambda` is
clamped to `[min_damping, max_damping]`. The factored Tikhonov strength is
tied to it, `gamma = sqrt(lambda + eta)` (KFAC_NOTES section 7; the paper's
separate `gamma` search every `T2` steps is not implemented).

When the new `lambda` takes effect: the quadratic model (the next `rho`,
and `alpha`/`mu` with `quadratic_model_step`) always uses the current
`lambda`; `inverse_method="eigh"` and `"ekfac"` apply it exactly at every
preconditioning; `"cholesky"`/`"inverse"` and tridiagonal chains bake
`gamma` into the stored inverses, so the preconditioner uses the `lambda`
of the last inverse update and lags the rule by up to `inv_update_every`
steps (`inv_update_every / T1` adjustments). The inverses are not
recomputed on every change, which would cost a decomposition of every
factor every `T1` steps; use `"eigh"`/`"ekfac"` (or a smaller
`inv_update_every`) when the damping must act at once.

The extra work of the rule: every `T1` steps, one forward pass at `theta +
delta` on the same batch and, when the step comes from a fixed learning
rate and momentum, one forward-mode pass for `delta^T F delta` before the
update (with `quadratic_model_step` the model's change is already known).

**Orthogonal step** (`KFAC(step_rule="orthogonal")`, issue 12's lead 6):
each Kronecker matrix `P` of `Delta` (`[K; b]` of a Dense layer, shape
`(n_in + 1, n_out)`; `kfac_keras.orthogonal_step` says which matrices each
block has) is replaced by an approximation of its polar factor `U V^T`
(`P = U S V^T`), `k` quintic Newton-Schulz iterations from `X_0 = P /
||P||_F`,

    X <- a X + (b X X^T + c (X X^T)^2) X,   (a, b, c) = (3.4445, -4.7750, 2.0315),

scaled by `0.2 sqrt(max(rows, cols))`: an exactly orthogonal `(rows, cols)`
matrix then has RMS entry 0.2, the update RMS of Keras's `Muon`
(`rms_rate=0.2`). The iteration maps every singular value `s` of `X_0` to
`f^k(s)`, `f(s) = a s + b s^3 + c s^5`, and leaves the singular vectors
unchanged; these coefficients (Muon's) push `s` into roughly [0.7, 1.2]
in a few steps rather than converging to 1. The learning rate and momentum
multiply the result as in `fixed_step`, so the step is linear in `lr`.

The matrix products may run in bfloat16 (`KFAC(orthogonal_dtype=
"bfloat16")`), where the hardware has bfloat16 matrix units (CPUs with
AVX512_BF16 through oneDNN, GPUs): `X_0` is formed in float32 (a norm
over ~10^6 squares), each product takes bfloat16 inputs (`X` and the
polynomial in `X X^T`) and returns a bfloat16 result, and the iterate `X`
and the linear combinations stay in float32, so the coefficients are
exact (rounded to bfloat16 they would be (3.4375, -4.78125, 2.03125), an
error of the same size as the products' rounding). The result is float32.

Fewer iterations for the same effect (`newton_schulz(normalization=,
coefficients=)`; the optimizer's default is still `"frobenius"`/`"muon"`):
`X_0 = P / ||P||_F` starts every singular value at `s / ||P||_F`, and on
the autoencoder's matrices the largest is only 0.2-0.99 of 1
(tools/step_efficiency/RESULTS.md, S5-cost). `normalization="gram"` divides
further by `||X_0 X_0^T||_F^(1/2) = (sum s^4)^(1/4) >= s_max`, so the largest
starts at 0.56-1.0 and all start larger by the same factor; the Gram matrix
is the one the first iteration needs anyway, so it costs no extra product.
`coefficients="tuned"` uses a separate `(a, b, c)` per iteration
(`NEWTON_SCHULZ_TUNED_COEFFICIENTS`, for 1 and 2 iterations), fitted so that
the composed polynomial sends the widest interval `[l, 1]` into Muon's band
[0.68, 1.21]: `l = 0.043` with 2 iterations, where Muon's coefficients
reach 0.061 with 2 and 0.018 with 3.
"""

import tensorflow as tf

#: The paper's thresholds on `rho`.
LOWER_THRESHOLD = 0.25
UPPER_THRESHOLD = 0.75
#: The paper's per-step factor; the update every `T1` steps uses its `T1`-th power.
BASE_FACTOR = 19.0 / 20.0
#: Coefficients `(a, b, c)` of the quintic Newton-Schulz iteration (Muon's).
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
#: RMS entry of an orthogonal step before the learning rate: Keras's `Muon`
#: update RMS (`rms_rate=0.2`), so learning rates carry over from Muon.
ORTHOGONAL_STEP_RMS = 0.2
#: Dtypes of the Newton-Schulz matrix products (`newton_schulz(dtype=...)`).
NEWTON_SCHULZ_DTYPES = ("float32", "bfloat16")
#: How `newton_schulz` scales `X_0` (`newton_schulz(normalization=...)`).
NEWTON_SCHULZ_NORMALIZATIONS = ("frobenius", "gram")
#: Coefficient schedules of `newton_schulz(coefficients=...)`.
NEWTON_SCHULZ_COEFFICIENT_SCHEDULES = ("muon", "tuned")
#: Per-iteration `(a, b, c)` for `k` iterations, fitted by
#: tools/step_efficiency/ns_coefficients.py: the composed map sends the widest
#: interval `[l, 1]` into Muon's band [0.68, 1.21] (Muon: l = 0.061 at k = 2,
#: 0.018 at k = 3; these: l = 0.17 at k = 1, 0.043 at k = 2) and stays in
#: [0, 1.21] on [0, 1.05] (to 4e-5 after rounding to 4 decimals).
NEWTON_SCHULZ_TUNED_COEFFICIENTS = {
    1: ((4.1486, -8.2340, 5.0035),),
    2: ((4.89, -12.2394, 8.0535), (3.4702, -4.8192, 2.0491)),
}


# ----------------------------------------------------------- list algebra
def dot(first, second):
    """`sum_i <first_i, second_i>` over two aligned lists of tensors (float32)."""
    terms = [tf.reduce_sum(tf.cast(a, tf.float32) * tf.cast(b, tf.float32))
             for a, b in zip(first, second)]
    if not terms:
        return tf.constant(0.0)
    return tf.add_n(terms)


# ------------------------------------------------------------ KL clipping
def kl_clipping_scale(full_grads, preconditioned, norm_constraint):
    """`min(1, sqrt(c / (Delta^T grad)))`, 1 when `Delta^T grad <= 0`.

    The bound is on the preconditioned gradient itself, before the learning
    rate multiplies it, so the step `lr * scale * Delta` always scales with
    `lr`: halving the learning rate (or a schedule, or `ReduceLROnPlateau`)
    halves the step even when the bound binds. (Ba et al. 2017 bound
    `lr^2 Delta^T grad` instead, which makes `lr` irrelevant whenever the
    bound binds; at `lr = 1` the two agree.)

    Args:
        full_grads: list of tensors, `grad` (with the `l2_reg` term).
        preconditioned: list of tensors, `Delta`, aligned with `full_grads`.
        norm_constraint: float > 0, `c`.

    Returns:
        A float32 scalar tensor in (0, 1].
    """
    size = dot(preconditioned, full_grads)
    positive = size > 0.0
    return tf.where(
        positive,
        tf.minimum(1.0, tf.sqrt(norm_constraint / tf.where(positive, size, 1.0))),
        1.0)


# -------------------------------------------------------- fixed step rule
def fixed_step(preconditioned, previous, learning_rate, momentum, nesterov=False):
    """The learning-rate + momentum update (float32): heavy ball `v = mu v0 -
    lr Delta`, or with Nesterov `mu v - lr Delta` (`KFAC.update_step`).

    Args:
        preconditioned: list of tensors, `Delta`.
        previous: list of tensors, the velocity `v0`, aligned with
            `preconditioned`.
        learning_rate: scalar, `lr`.
        momentum: scalar, `mu`.
        nesterov: bool, whether the update is Nesterov's. Defaults to False.
    """
    learning_rate = tf.cast(learning_rate, tf.float32)
    momentum = tf.cast(momentum, tf.float32)
    steps = []
    for v, p in zip(previous, preconditioned):
        p = learning_rate * tf.cast(p, tf.float32)
        velocity = momentum * tf.cast(v, tf.float32) - p
        steps.append(momentum * velocity - p if nesterov else velocity)
    return steps


def predicted_change(step, step_fisher, full_grads, l2_reg):
    """`M(delta) - M(0)` of the undamped model for one update `delta`.

    Args:
        step: list of tensors, `delta`.
        step_fisher: scalar, `delta^T F delta`.
        full_grads: list of tensors, `grad`, aligned with `step`.
        l2_reg: float, `eta`.
    """
    return 0.5 * (step_fisher + l2_reg * dot(step, step)) + dot(full_grads, step)


# ------------------------------------------------- quadratic-model step
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


def quadratic_model_step(direction, previous, full_grads, fisher, total_damping, l2_reg):
    """Section 7: `alpha`, `mu` and the undamped model's predicted change.

    Args:
        direction: list of tensors, `-Delta`.
        previous: list of tensors, `delta0`, aligned with `direction`.
        full_grads: list of tensors, `grad`.
        fisher: `(2, 2)` float32 tensor, the Gram matrix of `[direction,
            previous]` under the exact Fisher.
        total_damping: scalar, `lambda + eta`.
        l2_reg: float, `eta`.

    Returns:
        `(alpha, mu, change)` float32 scalars; `change` is `M(delta) - M(0)`
        of the undamped model for `delta = alpha direction + mu previous`.
    """
    cross = dot(direction, previous)
    norms = tf.stack([tf.stack([dot(direction, direction), cross]),
                      tf.stack([cross, dot(previous, previous)])])
    linear = tf.stack([dot(full_grads, direction), dot(full_grads, previous)])
    alpha, mu, _ = solve_step_coefficients(
        fisher + total_damping * norms, linear, first_step=norms[1, 1] <= 0.0)
    change = quadratic_change(tf.stack([alpha, mu]), fisher, norms, linear, l2_reg)
    return alpha, mu, change


# ----------------------------------------- Levenberg-Marquardt damping
def adjustment_factor(update_every):
    """`omega1 = (19/20)^T1`, the factor applied every `T1` steps.

    Args:
        update_every: int >= 1, `T1`.

    Returns:
        A Python float in (0, 1).
    """
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(
            f"`update_every` must be an integer >= 1; received {update_every!r}.")
    return BASE_FACTOR ** update_every


def actual_change(loss_before, loss_after, variables, updates, l2_reg):
    """`h(theta + delta) - h(theta)`, with the L2 term of `h`.

    Args:
        loss_before: scalar, the loss at `theta`.
        loss_after: scalar, the loss at `theta + delta` (same batch).
        variables: list of tensors, the new weights `theta + delta`.
        updates: list of tensors, `delta`, aligned with `variables`.
        l2_reg: float, `eta`.
    """
    change = tf.cast(loss_after, tf.float32) - tf.cast(loss_before, tf.float32)
    if l2_reg:
        # (eta/2)(||theta + delta||^2 - ||theta||^2), from the new weights.
        change += l2_reg * (dot(variables, updates) - 0.5 * dot(updates, updates))
    return change


def reduction_ratio(actual_change, predicted_change):
    """`rho = actual / predicted`, or NaN when the model predicts no decrease.

    Args:
        actual_change: scalar tensor, `h(theta + delta) - h(theta)`.
        predicted_change: scalar tensor, `M(delta) - M(0)`.

    Returns:
        A float32 scalar tensor; NaN if `predicted_change >= 0` or either
        input is not finite.
    """
    actual = tf.cast(actual_change, tf.float32)
    predicted = tf.cast(predicted_change, tf.float32)
    defined = tf.logical_and(
        predicted < 0.0,
        tf.logical_and(tf.math.is_finite(actual), tf.math.is_finite(predicted)))
    safe = tf.where(defined, predicted, -1.0)
    return tf.where(defined, actual / safe, tf.constant(float("nan"), tf.float32))


def levenberg_marquardt_update(damping, rho, factor, min_damping, max_damping):
    """One application of the Levenberg-Marquardt rule.

    Args:
        damping: scalar tensor, the current `lambda`.
        rho: scalar tensor, the reduction ratio (NaN counts as `< 1/4`).
        factor: float in (0, 1), `omega1`.
        min_damping: float > 0, the lower bound.
        max_damping: float >= min_damping, the upper bound.

    Returns:
        The new damping, a float32 scalar tensor in `[min_damping, max_damping]`.
    """
    damping = tf.cast(damping, tf.float32)
    rho = tf.cast(rho, tf.float32)
    trusted = rho > UPPER_THRESHOLD
    distrusted = tf.logical_or(rho < LOWER_THRESHOLD, tf.math.is_nan(rho))
    new = tf.where(trusted, damping * factor,
                   tf.where(distrusted, damping / factor, damping))
    return tf.clip_by_value(new, min_damping, max_damping)


# ------------------------------------------------------- orthogonal step
def newton_schulz(matrix, iterations, dtype="float32", normalization="frobenius",
                  coefficients="muon"):
    """Approximate polar factor of `matrix` by quintic Newton-Schulz.

    Args:
        matrix: float tensor of shape `(..., rows, cols)`; leading axes are a
            batch (one polar factor per matrix, e.g. per group of a grouped
            convolution).
        iterations: int >= 1, `k`.
        dtype: one of `NEWTON_SCHULZ_DTYPES`, the dtype of the matrix
            products; `X_0`, the iterate and the coefficients are float32
            (module docstring). Defaults to `"float32"`.
        normalization: one of `NEWTON_SCHULZ_NORMALIZATIONS`, how `X_0` is
            scaled: `"frobenius"`, `matrix / ||matrix||_F`; `"gram"`, divided
            further by `||X X^T||_F^(1/2)` of that (which bounds the largest
            singular value more tightly, so they all start larger), the Gram
            matrix reused by the first iteration (no extra product).
            Defaults to `"frobenius"`.
        coefficients: one of `NEWTON_SCHULZ_COEFFICIENT_SCHEDULES`:
            `"muon"`, `NEWTON_SCHULZ_COEFFICIENTS` in every iteration;
            `"tuned"`, the per-iteration `NEWTON_SCHULZ_TUNED_COEFFICIENTS[k]`
            (defined for the `k` listed there). Defaults to `"muon"`.

    Returns:
        A float32 tensor of the same shape, `X_k` (per matrix; a zero matrix
        stays zero).

    Raises:
        ValueError: if `dtype`, `normalization` or `coefficients` is not one
            of the names above, or `coefficients="tuned"` has no schedule for
            `iterations`.
    """
    if dtype not in NEWTON_SCHULZ_DTYPES:
        raise ValueError(f"`dtype` must be one of {NEWTON_SCHULZ_DTYPES}; received {dtype!r}.")
    schedule = newton_schulz_schedule(iterations, coefficients)
    if normalization not in NEWTON_SCHULZ_NORMALIZATIONS:
        raise ValueError(f"`normalization` must be one of {NEWTON_SCHULZ_NORMALIZATIONS}; "
                         f"received {normalization!r}.")
    x = tf.cast(matrix, tf.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide side, so the Gram matrix is the smaller one
        x = tf.linalg.matrix_transpose(x)
    # Frobenius first in both cases: the Gram matrix of the raw matrix could
    # overflow float32 (its squared norm is a sum of fourth powers).
    # Rescaled by a power of two first (exact), so that the squares of a tiny
    # matrix are not flushed to zero (`power_of_two_scale`).
    x = power_of_two_rescaled(x)
    x = tf.math.divide_no_nan(x, tf.norm(x, axis=[-2, -1], keepdims=True))
    gram = None
    if normalization == "gram":
        low = tf.cast(x, dtype)
        gram = tf.cast(tf.matmul(low, low, transpose_b=True), tf.float32)
        # ||X X^T||_F = (sum s^4)^(1/2) >= s_max^2, so s_max <= 1 after this.
        gram_norm = tf.norm(gram, axis=[-2, -1], keepdims=True)
        x = tf.math.divide_no_nan(x, tf.sqrt(gram_norm))
        gram = tf.math.divide_no_nan(gram, gram_norm)
    for a, b, c in schedule:
        # The casts are no-ops in float32; in bfloat16 only the products'
        # inputs and results are rounded, never the iterate or a coefficient.
        low = tf.cast(x, dtype)
        if gram is None:
            gram = tf.cast(tf.matmul(low, low, transpose_b=True), tf.float32)
        gram_low = tf.cast(gram, dtype)
        polynomial = b * gram + c * tf.cast(tf.matmul(gram_low, gram_low), tf.float32)
        x = a * x + tf.cast(tf.matmul(tf.cast(polynomial, dtype), low), tf.float32)
        gram = None
    return tf.linalg.matrix_transpose(x) if tall else x


def power_of_two_scale(matrix):
    """`2^-e` per matrix, `e = floor(log2(max |entry|))` (1 for a zero matrix).

    `matrix * power_of_two_scale(matrix)` has its largest entry in [1, 2),
    so its squares neither underflow nor overflow float32, and the product is
    exact (a power of two changes only the exponent). Why: a preconditioned
    gradient whose loss is ~0 has entries ~1e-20, whose squares (~1e-40) are
    below float32's smallest normal number (1.2e-38) and are flushed to zero
    on CPUs; the Frobenius norm then comes out too small (or 0), `X_0` gets
    singular values above 1 and the quintic iteration diverges to ~1e34
    (tools/keras_programs/FINDINGS.md, S6-bilstm).

    Args:
        matrix: float32 tensor `(..., rows, cols)`.

    Returns:
        A float32 tensor `(..., 1, 1)`.
    """
    largest = tf.reduce_max(tf.abs(matrix), axis=[-2, -1], keepdims=True)
    exponent = tf.floor(tf.math.log(tf.where(largest > 0.0, largest, 1.0)) / tf.math.log(2.0))
    # Within float32's normal exponents, so the scale itself is finite.
    return tf.pow(2.0, -tf.clip_by_value(exponent, -126.0, 126.0))


def power_of_two_rescaled(matrix):
    """`matrix * power_of_two_scale(matrix)` (float32; see there)."""
    return matrix * power_of_two_scale(matrix)


def newton_schulz_schedule(iterations, coefficients="muon"):
    """The `(a, b, c)` of each Newton-Schulz iteration.

    Args:
        iterations: int >= 1, `k`.
        coefficients: one of `NEWTON_SCHULZ_COEFFICIENT_SCHEDULES`
            (`newton_schulz`). Defaults to `"muon"`.

    Returns:
        A tuple of `k` tuples `(a, b, c)`.

    Raises:
        ValueError: if `iterations < 1`, `coefficients` is unknown, or
            `"tuned"` has no schedule for `iterations`.
    """
    if int(iterations) < 1:
        raise ValueError(f"`iterations` must be >= 1; received {iterations!r}.")
    if coefficients == "muon":
        return (NEWTON_SCHULZ_COEFFICIENTS,) * int(iterations)
    if coefficients == "tuned":
        if int(iterations) not in NEWTON_SCHULZ_TUNED_COEFFICIENTS:
            raise ValueError(
                f"coefficients='tuned' has schedules for iterations in "
                f"{sorted(NEWTON_SCHULZ_TUNED_COEFFICIENTS)}; received {iterations!r}. Use "
                f"coefficients='muon' for other iteration counts.")
        return NEWTON_SCHULZ_TUNED_COEFFICIENTS[int(iterations)]
    raise ValueError(f"`coefficients` must be one of {NEWTON_SCHULZ_COEFFICIENT_SCHEDULES}; "
                     f"received {coefficients!r}.")


def orthogonal_direction(matrix, iterations, dtype="float32", normalization="frobenius",
                         coefficients="muon"):
    """`0.2 sqrt(max(rows, cols)) NS_k(matrix)`: the orthogonal step's direction
    for one Kronecker matrix (to be multiplied by `-lr`, momentum after).

    Args:
        matrix: float tensor `(..., rows, cols)`, the preconditioned gradient
            `P` of one block in its matrix layout (`[K; b]`: rows include the
            bias row).
        iterations: int >= 1, Newton-Schulz iterations.
        dtype: the dtype of the matrix products (`newton_schulz`).
            Defaults to `"float32"`.
        normalization: how `X_0` is scaled (`newton_schulz`). Defaults to
            `"frobenius"`.
        coefficients: the coefficient schedule (`newton_schulz`). Defaults
            to `"muon"`.

    Returns:
        A float32 tensor of the same shape.
    """
    rows, cols = matrix.shape[-2], matrix.shape[-1]
    scale = ORTHOGONAL_STEP_RMS * float(max(rows, cols)) ** 0.5
    return scale * newton_schulz(matrix, iterations, dtype, normalization, coefficients)


def frobenius_norm(matrix):
    """`||matrix||_F` per matrix of `(..., rows, cols)`, shape `(..., 1, 1)`,
    float32, computed on the power-of-two rescaled matrix (`power_of_two_scale`)
    so that entries ~1e-20 do not flush their squares to zero."""
    matrix = tf.cast(matrix, tf.float32)
    scale = power_of_two_scale(matrix)
    return tf.norm(matrix * scale, axis=[-2, -1], keepdims=True) / scale


def newton_bound_scale(matrix, direction, learning_rate, bound):
    """`min(1, bound ||P||_F / (lr ||D||_F))` per matrix: the factor that
    shortens the orthogonal step `lr D` to at most `bound` times the damped
    quadratic model's minimiser `P` (`kfac_keras.orthogonal_step`, "the
    Newton bound").

    Args:
        matrix: float tensor `(..., rows, cols)`, `P` (the preconditioned
            gradient in its matrix layout).
        direction: float tensor of the same shape, `D`
            (`orthogonal_direction(P)`).
        learning_rate: scalar, `lr`.
        bound: float > 0.

    Returns:
        A float32 tensor `(..., 1, 1)` in [0, 1]; 1 where `lr ||D||_F` is 0.
    """
    step = tf.cast(learning_rate, tf.float32) * frobenius_norm(direction)
    limit = bound * frobenius_norm(matrix)
    return tf.where(step > limit, limit / tf.where(step > 0.0, step, 1.0), 1.0)
