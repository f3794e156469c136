"""Scale-and-shift blocks for normalization layers' `gamma` and `beta`.

`BatchNormalization`, `LayerNormalization`, `GroupNormalization` and
`RMSNormalization` end with an affine map per parameter entry `c`:
`y = x_hat * gamma_c + beta_c`, broadcast over the batch and the other
("position") axes. With `g = dl/dy`, the per-example gradients are

    dgamma_{n,c} = sum_t x_hat_{n,t,c} g_{n,t,c},    dbeta_{n,c} = sum_t g_{n,t,c}.

Unlike Dense/conv factors these are computed *exactly per example* (the
sums over positions happen before the outer products), and the block keeps,
for every entry `c`, the full 2x2 Fisher of `(gamma_c, beta_c)` (KFAC_NOTES
section 6; no Kronecker approximation is involved, only the block-diagonal
structure over entries):

    F_c = (1/m) sum_n [dgamma_{n,c}, dbeta_{n,c}]^T [dgamma_{n,c}, dbeta_{n,c}]

over the `m` examples of the statistics subset (gradients of the sampled
objective, so each row already carries `sqrt(c_n)`). Cross-entry terms are
dropped (block diagonal over entries). The damped inverse
`(F_c + damping I)^{-1}` is the closed-form 2x2 inverse, with exact damping,
recomputed every step from the stored moments (no decomposition to schedule;
the optimizer's `inverse_method` does not apply). With `scale=False` or
`center=False` (or `RMSNormalization`, scale only) the block is diagonal,
`(1/m) sum_n dparam_{n,c}^2 + damping`.

`x_hat` is the derivative of the layer output w.r.t. `gamma`, obtained
exactly by forward-mode differentiation (`tf.autodiff.ForwardAccumulator`,
tangent of ones on `gamma`) during the same forward pass: no re-implementation
of the layer's moments (batch statistics, masks, renorm, groups), no division
by `gamma`. The cost is one forward-mode pass through the layer per training
step (elementwise work of the size of the layer's output).

Shared layers: each call's per-example gradients are computed separately and
summed over calls before the outer product, so the block is the Fisher of the
parameters' total per-example gradient (exact, not pooled as locations).

Memory: 3 floats per entry (`gamma^2`, `gamma beta` and `beta^2` moments), or
1 per entry when only one of `gamma`/`beta` is trained.
"""

import tensorflow as tf

from kfac_keras.blocks.base import (FisherBlock, StatisticsSource, ema_assign, layer_name,
                                    split_capture)
from kfac_keras.blocks.errors import UnsupportedLayerError


def _trainable(variable):
    return variable if variable is not None and variable.trainable else None


def _parameter_axes(layer):
    """The input axes the layer's scale/shift parameters span (may be < 0)."""
    axis = getattr(layer, "axis", -1)
    if isinstance(axis, (list, tuple)):
        return [int(a) for a in axis]
    return [int(axis)]


def scale_shift_variables(layer):
    """`(scale, shift)` trainable variables of a normalization layer."""
    if isinstance(layer, _rms_class()):
        return _trainable(getattr(layer, "scale", None)), None
    return _trainable(getattr(layer, "gamma", None)), _trainable(getattr(layer, "beta", None))


def _rms_class():
    import keras

    return getattr(keras.layers, "RMSNormalization", type(None))


def scale_shift_unsupported_reason(layer):
    """Why a normalization layer cannot get a scale-and-shift block, or None."""
    scale, shift = scale_shift_variables(layer)
    if scale is None and shift is None:
        return "the layer has no trainable scale or shift"
    shape = tuple((scale if scale is not None else shift).shape)
    axes = _parameter_axes(layer)
    if len(shape) != len(axes):
        return (f"its parameters have shape {shape}, which does not match its "
                f"normalization axes {axes}")
    return None


class ScaleShiftBlock(FisherBlock):
    """Per-entry 2x2 (or 1x1) Fisher blocks of a normalization layer's gamma/beta.

    Args:
        layer: a built normalization layer (`BatchNormalization`,
            `LayerNormalization`, `GroupNormalization`, `RMSNormalization`).

    Raises:
        UnsupportedLayerError: when the layer has no trainable scale/shift or
            their shape does not match the layer's axes.
    """

    statistics_source = StatisticsSource.CAPTURES
    #: Record `(d output / d gamma, output)`; differentiate w.r.t. the output.
    capture_mode = "output_tangent"

    def __init__(self, layer):
        reason = scale_shift_unsupported_reason(layer)
        if reason is not None:
            raise UnsupportedLayerError(reason)
        self.scale_variable, self.shift_variable = scale_shift_variables(layer)
        variables = [v for v in (self.scale_variable, self.shift_variable) if v is not None]
        super().__init__(layer_name(layer), variables, layer)
        self.parameter_shape = tuple(int(d) for d in variables[0].shape)
        self.size = 1
        for d in self.parameter_shape:
            self.size *= d
        self.axes = _parameter_axes(layer)
        self.full = len(variables) == 2
        self.kind = ("scale-shift (2x2 per entry)" if self.full
                     else "scale-shift (diagonal)")
        #: Variable whose forward-mode tangent the capture records (or None).
        self.capture_tangent_variable = self.scale_variable

    def build(self, optimizer):
        if self.built:
            return
        prefix = self.name.replace("/", "_")

        def add(suffix):
            return optimizer.add_variable((self.size,), initializer="zeros",
                                          dtype="float32", name=f"{prefix}_{suffix}")

        self.scale_moment = add("scale_moment") if self.scale_variable is not None else None
        self.shift_moment = add("shift_moment") if self.shift_variable is not None else None
        self.cross_moment = add("scale_shift_moment") if self.full else None
        self.built = True

    def state_variables(self):
        return [v for v in (self.scale_moment, self.shift_moment, self.cross_moment)
                if v is not None]

    def factor_shapes(self):
        if self.full:
            return {"per_entry_2x2": (self.size, 2, 2)}
        return {"diagonal": (self.size,)}

    def per_example_grads(self, captures):
        """`(dgamma, dbeta)`, each `(m, size)` or None, summed over calls."""
        dscale, dshift = None, None
        # Row weights need no handling: these are per-example gradients of
        # the sampled objective, which carries the weights already.
        for tangent, grads, _ in (split_capture(c) for c in captures):
            grads = tf.cast(grads, tf.float32)
            rank = len(grads.shape)
            axes = sorted(a % rank for a in self.axes)
            if 0 in axes:
                raise ValueError(
                    f"{self.name}: normalization parameters over the batch axis "
                    "have no per-example gradient.")
            reduce_axes = [a for a in range(1, rank) if a not in axes]
            if self.scale_variable is not None:
                term = tf.reduce_sum(tf.cast(tangent, tf.float32) * grads, reduce_axes)
                term = tf.reshape(term, [-1, self.size])
                dscale = term if dscale is None else dscale + term
            if self.shift_variable is not None:
                term = tf.reshape(tf.reduce_sum(grads, reduce_axes), [-1, self.size])
                dshift = term if dshift is None else dshift + term
        return dscale, dshift

    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        dscale, dshift = self.per_example_grads(captures)
        if dscale is not None:
            ema_assign(self.scale_moment,
                       tf.reduce_sum(tf.square(dscale), 0) / num_examples, decay)
        if dshift is not None:
            ema_assign(self.shift_moment,
                       tf.reduce_sum(tf.square(dshift), 0) / num_examples, decay)
        if self.full:
            ema_assign(self.cross_moment,
                       tf.reduce_sum(dscale * dshift, 0) / num_examples, decay)

    def update_inverses(self, damping):
        """Nothing to decompose: the 2x2 inverses are closed-form."""
        del damping

    def curvature_scale(self):
        """The mean diagonal of the block's Fisher: the scale and shift second
        moments averaged over channels (both together)."""
        moments = [tf.convert_to_tensor(m) for m in (self.scale_moment, self.shift_moment)
                   if m is not None]
        return tf.reduce_mean(tf.concat(moments, 0))

    def multiply_damped_inverse(self, grads, damping):
        damping = tf.cast(self.block_damping(damping), tf.float32)
        flat = [tf.reshape(tf.cast(g, tf.float32), [-1]) for g in grads]
        if not self.full:
            moment = self.scale_moment if self.scale_moment is not None else self.shift_moment
            return [tf.reshape(flat[0] / (moment + damping), self.parameter_shape)]
        ss = self.scale_moment + damping
        bb = self.shift_moment + damping
        sb = tf.convert_to_tensor(self.cross_moment)
        determinant = ss * bb - sb * sb
        scale = (bb * flat[0] - sb * flat[1]) / determinant
        shift = (ss * flat[1] - sb * flat[0]) / determinant
        return [tf.reshape(scale, self.parameter_shape),
                tf.reshape(shift, self.parameter_shape)]


def make_scale_shift_block(layer, inverse_method="cholesky"):
    """`ScaleShiftBlock` for `layer`; `inverse_method` is not used (see module)."""
    del inverse_method  # 2x2 blocks are inverted in closed form with exact damping.
    return ScaleShiftBlock(layer)
