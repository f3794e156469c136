"""Levenberg-Marquardt adaptation of the damping (Martens & Grosse 2015, section 6.5).

Every `T1` steps (`AdaptiveOptions.damping_update_every`, default 5) K-FAC
compares the change of the objective after the step `delta` with the change
the quadratic model predicted, on the same mini-batch:

    rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0)),
    M(delta) - M(0) = 1/2 delta^T (F + eta I) delta + grad h^T delta.

`h` is the objective K-FAC minimises (the compiled loss plus
`(l2_reg / 2) ||theta||^2`), `F` the exact mini-batch Fisher (the generalised
Gauss-Newton matrix of the loss, computed with forward-mode products, see
`kfac_keras.quadratic_model`) and `eta` the `l2_reg` coefficient, whose
curvature is part of `h`. As in the paper, the damping `lambda` is *not* part
of this `M`: `rho` measures how well the undamped local model predicts the
objective (the damped model is the one the step minimises).

Then (the paper's rule, with `omega1 = (19/20)^T1`):

* `rho > 3/4`: the model is trustworthy, `lambda <- omega1 * lambda`;
* `rho < 1/4`, or `rho` undefined (a non-finite loss after the step, or a
  model that predicts no decrease): `lambda <- lambda / omega1`;
* otherwise `lambda` is unchanged;

and `lambda` is clamped to `[min_damping, max_damping]`. The factored Tikhonov
strength is tied to it, `gamma = sqrt(lambda + eta)` (KFAC_NOTES section 7;
the paper's separate `gamma` search every `T2` steps is not implemented).

When the new `lambda` takes effect:

* the quadratic model (the next `rho`, and `alpha`/`mu` with
  `quadratic_model_step`) always uses the current `lambda`;
* `inverse_method="eigh"` and `"ekfac"` apply `lambda` exactly at every
  preconditioning, so the next step already uses it;
* `inverse_method="cholesky"`/`"inverse"` and tridiagonal chains bake
  `gamma` into the stored inverses: the preconditioner uses the `lambda` of
  the last inverse update, so it lags the rule by up to `inv_update_every`
  steps (with the defaults `T1 = 5`, `T_inv = 20`: up to 4 adjustments). The
  inverses are not recomputed on every change, which would cost a
  decomposition of every factor every `T1` steps; use `"eigh"`/`"ekfac"`
  (or a smaller `inv_update_every`) when the damping must act at once.

The extra work: every `T1` steps, one forward pass at `theta + delta` on the
same batch (inside a `tf.cond`, in `model.fit` and custom loops alike) and,
when the step comes from a fixed learning rate and momentum, one
forward-mode pass for `delta^T F delta` before the update (with
`quadratic_model_step` the model's change is already known).
"""

import tensorflow as tf

#: The paper's thresholds on `rho`.
LOWER_THRESHOLD = 0.25
UPPER_THRESHOLD = 0.75
#: The paper's per-step factor; the update every `T1` steps uses its `T1`-th power.
BASE_FACTOR = 19.0 / 20.0


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
