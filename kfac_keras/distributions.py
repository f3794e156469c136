"""Predictive distributions: the negative log-likelihoods behind K-FAC's
losses, their target samplers, per-example scales and output Fisher products.

`kfac_keras.losses` maps Keras losses (and declared custom losses) onto these
classes; its module docstring explains the scale conventions (Keras's
reductions and `loss_weights` folded into the Fisher), the several-output
rule and where TFP samplers are and are not reproducible.
"""

import tensorflow as tf

from kfac_keras import sampling




def unwrap_single(loss):
    """A one-entry list/tuple/dict of losses is that loss."""
    if isinstance(loss, (list, tuple)) and len(loss) == 1:
        return loss[0]
    if isinstance(loss, dict) and len(loss) == 1:
        return next(iter(loss.values()))
    return loss


_EPSILON = 1e-7

SUPPORTED_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight")
#: How the statistics' backward pass gets its output gradients
#: (`PredictiveDistribution.statistics_objective`).
ESTIMATION_MODES = ("fisher", "curvature_propagation", "empirical")


def _to_float(x):
    return tf.cast(x, tf.float32)


def _first_index(values, first_example):
    """Index of the first element of `values` (examples along axis 0, in
    row-major order) in the global batch whose example `first_example` is
    `values[0]`."""
    per_example = tf.reduce_prod(tf.shape(values)[1:])
    return tf.cast(first_example, tf.int32) * per_example


def _sum_per_example(values):
    """Sums every non-batch axis: shape `(batch,)`."""
    return tf.reduce_sum(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def _static_count(sizes, y_pred):
    count = 1
    for size in sizes:
        if size is None:
            raise ValueError(
                "K-FAC needs static output shapes (other than the batch axis); "
                f"the model output has shape {y_pred.shape}.")
        count *= size
    return count


def _sum_like(values, scale):
    """Sums `values` (examples along axis 0) down to the shape of `scale`
    (`(batch,)` or `(batch,) + value_axes`, a row-major prefix of `values`)."""
    return tf.reduce_sum(tf.reshape(values, tf.concat([tf.shape(scale), [-1]], axis=0)),
                         axis=-1)


def normalize_sample_weight(sample_weight):
    """Float32 `(batch,)` or `(batch, T)` sample weights (`(batch, 1)` is
    per-example), or None.

    Raises:
        ValueError: for weights of another rank.
    """
    if sample_weight is None:
        return None
    weight = tf.cast(sample_weight, tf.float32)
    if weight.shape.rank == 2 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if weight.shape.rank not in (1, 2):
        raise ValueError(
            "K-FAC supports sample weights of shape (batch,), (batch, 1) or, for "
            f"outputs with positions, (batch, T); received shape {weight.shape}.")
    return weight


def _per_example_weight(sample_weight):
    weight = normalize_sample_weight(sample_weight)
    if weight.shape.rank != 1:
        raise ValueError(
            "Per-example scales need sample weights of shape (batch,) or (batch, 1); "
            f"received shape {weight.shape}: use `value_scale` for per-position weights.")
    return weight


def row_sample_weight(distribution, sample_weight):
    """The sample weights the input factors' row weights start from.

    Args:
        distribution: the `PredictiveDistribution` or `JointDistribution`.
        sample_weight: what the step received.

    Returns:
        `normalize_sample_weight(sample_weight)` for one weight tensor (with
        several outputs, the weights of every output); None without weights
        or for per-output structures (a dict or list of weights), whose
        outputs may weigh an example differently: then only `G` is weighted.
    """
    del distribution  # one tensor weighs every output alike
    if sample_weight is None or isinstance(sample_weight, (dict, list, tuple)):
        return None
    return normalize_sample_weight(sample_weight)


def _keras_mask(y_pred):
    mask = getattr(y_pred, "_keras_mask", None)
    return None if mask is None else tf.cast(mask, tf.float32)


class PredictiveDistribution:
    """Base class: the distribution whose NLL a loss is.

    Args:
        from_logits: whether the model's output is a logit (pre-sigmoid /
            pre-softmax) rather than a probability. Defaults to False.
        reduction: the Keras loss reduction, one of `SUPPORTED_REDUCTIONS`.
            Defaults to `"sum_over_batch_size"`.
        label_smoothing: the loss's label smoothing; it changes only the
            empirical targets (the Fisher does not depend on the labels).
            Defaults to 0.
    """

    name = "base"
    #: Whether `output_fisher_sqrt_product` is defined (curvature propagation).
    has_fisher_sqrt = False

    def __init__(self, from_logits=False, reduction="sum_over_batch_size",
                 label_smoothing=0.0):
        if reduction not in SUPPORTED_REDUCTIONS:
            raise ValueError(
                f"K-FAC supports loss reductions {SUPPORTED_REDUCTIONS}; the "
                f"loss uses reduction={reduction!r}.")
        self.from_logits = bool(from_logits)
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)

    # -- shapes and scale ------------------------------------------------
    def _value_axes(self, y_pred):
        """Static sizes of the non-batch axes of the per-example values the
        loss function returns before Keras's reduction."""
        return list(y_pred.shape[1:-1])

    def _inner_count(self, y_pred):
        """How many output elements the loss function averages into each value."""
        return 1

    def per_example_scale(self, y_pred, sample_weight=None):
        """`c_n` for each example: the objective is `mean_n c_n NLL_n`.

        Args:
            y_pred: the model output.
            sample_weight: optional per-example weights, shape `(batch,)` or
                `(batch, 1)`. Defaults to None.

        Returns:
            A float32 tensor of shape `(batch,)`.
        """
        values = _static_count(self._value_axes(y_pred), y_pred)
        inner = float(self._inner_count(y_pred))
        batch = tf.cast(tf.shape(y_pred)[0], tf.float32)
        weight = None if sample_weight is None else _per_example_weight(sample_weight)
        if self.reduction == "sum":
            scale = tf.fill(tf.shape(y_pred)[:1], 1.0 / inner) * batch
        elif self.reduction == "mean_with_sample_weight" and weight is not None:
            # Keras divides the weighted sum by sum(w): positions are summed.
            scale = tf.fill(tf.shape(y_pred)[:1], 1.0 / inner) * tf.math.divide_no_nan(
                batch, tf.reduce_sum(weight))
        else:
            scale = tf.fill(tf.shape(y_pred)[:1], 1.0 / (inner * values))
        if weight is not None:
            scale = scale * weight
        return scale

    def value_scale(self, y_pred, sample_weight=None, mask=None):
        """`c_{n,t}` per example and position: the objective is
        `(1/B) sum_{n,t} c_{n,t} NLL_{n,t}`, as Keras reduces it.

        Keras merges the output's mask into the sample weights (valid
        entries weigh `total/valid` under `"sum_over_batch_size"`/`"mean"`),
        then divides the weighted sum by the number of values, by nothing
        (`"sum"`) or by the sum of the merged weights
        (`"mean_with_sample_weight"`).

        Args:
            y_pred: the model output.
            sample_weight: optional `(batch,)`, `(batch, 1)` or `(batch, T)`
                weights. Defaults to None.
            mask: optional Keras mask of the loss values, `(batch, T)`.
                Defaults to None.

        Returns:
            `per_example_scale(y_pred, sample_weight)` (shape `(batch,)`)
            without per-position weights or mask; else a float32 tensor of
            shape `(batch,) + value_axes`.

        Raises:
            ValueError: per-position weights or a mask whose shape is not
                `(batch,) + value_axes`.
        """
        weight = normalize_sample_weight(sample_weight)
        if mask is None and (weight is None or weight.shape.rank == 1):
            return self.per_example_scale(y_pred, weight)
        value_axes = self._value_axes(y_pred)
        values = float(_static_count(value_axes, y_pred))
        inner = float(self._inner_count(y_pred))
        batch = tf.cast(tf.shape(y_pred)[0], tf.float32)
        for name, tensor in (("sample weights", weight), ("mask", mask)):
            if tensor is not None and tensor.shape.rank > 1 and (
                    tensor.shape.rank != 1 + len(value_axes)
                    or list(tensor.shape[1:]) != list(value_axes)):
                raise ValueError(
                    f"K-FAC: per-position {name} of shape {tensor.shape} do not match "
                    f"the loss values' positions {tuple(value_axes)} (output shape "
                    f"{y_pred.shape}); give them shape (batch,) + {tuple(value_axes)}.")
        merged = weight
        if mask is not None:
            mask = tf.cast(mask, tf.float32)
            if self.reduction in ("sum_over_batch_size", "mean"):
                total = tf.cast(tf.size(mask), tf.float32)
                mask = mask * tf.math.divide_no_nan(total, tf.reduce_sum(mask))
            if merged is None:
                merged = mask
            elif merged.shape.rank == 1 and mask.shape.rank > 1:
                merged = tf.reshape(merged, [-1] + [1] * (mask.shape.rank - 1)) * mask
            else:
                merged = merged * mask
        if merged.shape.rank == 1:
            merged = tf.reshape(merged, [-1] + [1] * len(value_axes)) * tf.ones(
                [1] + value_axes, tf.float32)
        if self.reduction == "sum":
            return merged * batch / inner
        if self.reduction == "mean_with_sample_weight":
            return merged * tf.math.divide_no_nan(batch, inner * tf.reduce_sum(merged))
        return merged / (inner * values)

    def _objective_scale(self, y_pred, sample_weight):
        """`value_scale` with the output's own Keras mask."""
        return self.value_scale(y_pred, sample_weight, _keras_mask(y_pred))

    def per_value_nll(self, targets, y_pred):
        """Unscaled NLL per example and position, shape `(batch,) +
        value_axes`; `per_example_nll` is its sum over positions."""
        raise NotImplementedError

    @staticmethod
    def _per_value(elementwise):
        """Per-element terms summed over the last (output) axis."""
        if elementwise.shape.rank < 2:
            return elementwise
        return tf.reduce_sum(elementwise, axis=-1)

    def per_example_nll(self, targets, y_pred):
        """Unscaled negative log-likelihood of each example, shape `(batch,)`.

        Summed over every non-batch output element; `targets` are treated as
        constants.
        """
        return _sum_per_example(self.per_value_nll(targets, y_pred))

    # -- targets ----------------------------------------------------------
    def sample_targets(self, y_pred, seed, first_example=0):
        """Targets drawn from the model's predictive distribution.

        Args:
            y_pred: the model output.
            seed: a shape-(2,) int32 tensor for stateless sampling.
            first_example: int scalar (tensor), the index of `y_pred`'s first
                example in the global batch. Defaults to 0. Each example's
                draw depends only on `(seed, its global index)`, so replicas
                holding consecutive slices of a batch draw what one device
                draws for the whole batch.
        """
        raise NotImplementedError

    def empirical_targets(self, y_true, y_pred):
        """The training labels, in the format `per_example_nll` expects."""
        raise NotImplementedError

    def statistics_objective(self, y_pred, y_true, sample_weight, subset, seed,
                             first_example=0, mode="fisher"):
        """`sum_n sqrt(c_n) NLL_n` over the first `subset` examples.

        Its gradient w.r.t. a pre-activation has rows `sqrt(c_n) g_n`, whose
        mean outer product is the Fisher factor `G` of the objective. With
        per-position weights `(batch, T)` or a Keras mask on `y_pred`, the
        sum is over examples and positions, `sum_{n,t} sqrt(c_{n,t})
        NLL_{n,t}` (`value_scale`). With `mode="curvature_propagation"` the
        NLL is replaced by `<B_n e_n, f_n>`, `e_n` random signs and `B_n` the
        square root of the output Fisher (`output_fisher_sqrt_product`): its
        output gradient `B_n e_n` has the sampled score's second moment
        `E[B e e^T B^T] = H_n` (Martens, Sutskever & Swersky 2012), with less
        variance (no sampling of the labels' categories).

        Args:
            y_pred: the model output (whole batch; `c_n` uses its size).
            y_true: the training labels (used when `seed` is None).
            sample_weight: optional `(batch,)` or `(batch, T)` weights.
                Defaults to None.
            subset: int scalar, the number of leading examples used.
            seed: shape-(2,) int32 seed for sampled targets or signs, or None
                for the labels (the empirical Fisher, whatever `mode`).
            first_example: index of `y_pred[0]` in the global batch.
                Defaults to 0.
            mode: `"fisher"` (sampled targets) or `"curvature_propagation"`
                (random signs), used with a seed. Defaults to `"fisher"`.
        """
        y_pred = unwrap_single(y_pred)
        scale = self._objective_scale(y_pred, sample_weight)[:subset]
        y_subset = y_pred[:subset]
        if seed is not None and mode == "curvature_propagation":
            output = _to_float(y_subset)
            signs = 2.0 * tf.cast(sampling.uniform(tf.shape(output), seed, _first_index(
                output, first_example)) < 0.5, tf.float32) - 1.0
            vector = tf.stop_gradient(self.output_fisher_sqrt_product(
                tf.stop_gradient(output), signs))
            values = self._per_value(vector * output)
        else:
            if seed is None:
                targets = self.empirical_targets(unwrap_single(y_true)[:subset], y_subset)
            else:
                targets = self.sample_targets(y_subset, seed, first_example)
            values = self.per_value_nll(targets, y_subset)
        if scale.shape.rank == 1:
            return tf.reduce_sum(tf.sqrt(scale) * _sum_per_example(values))
        return tf.reduce_sum(tf.sqrt(scale) * values)

    def output_fisher_sqrt_product(self, y_pred, noise):
        """`B noise` per output, `B B^T` the output Fisher of
        `output_fisher_product` (per unscaled NLL, output coordinates).

        Args:
            y_pred: the model output (float32).
            noise: a tensor shaped like `y_pred`.
        """
        raise self.missing_fisher_sqrt_error()

    def missing_fisher_sqrt_error(self):
        """The error for curvature propagation without `has_fisher_sqrt`."""
        return ValueError(
            f"estimation_mode='curvature_propagation' needs the square root of the "
            f"output Fisher, which {self!r} does not have in closed form; use "
            "estimation_mode='fisher' (sampled targets) with this loss.")

    # -- output-space Fisher ------------------------------------------------
    def output_hessian_vector_product(self, y_pred, vector):
        """Hessian of the per-example NLL w.r.t. the *output pre-activation*
        (logits, or the output itself for squared error), times `vector`.

        Only defined with `from_logits=True` losses and squared error, where
        the output is the natural parameter; with probability outputs the
        softmax/sigmoid is part of the network and the caller must
        differentiate through it.
        """
        raise NotImplementedError

    def output_fisher_product(self, y_pred, vector):
        """`H v`: the Fisher of the predictive distribution w.r.t. the model
        output, in the output's own coordinates (logits, probabilities or the
        regression output), per element of the *unscaled* NLL.

        Args:
            y_pred: the model output.
            vector: a tangent of the output, same shape as `y_pred`.
        """
        y_pred, vector = _to_float(y_pred), _to_float(vector)
        if self.from_logits:
            return self.output_hessian_vector_product(y_pred, vector)
        return self._probability_fisher_product(y_pred, vector)

    def _probability_fisher_product(self, y_pred, vector):
        raise ValueError(f"No output Fisher is defined for {self!r}.")

    def output_fisher_gram(self, y_pred, tangents, sample_weight=None):
        """`[mean_n c_n <t_i,n, H_n t_j,n>]_ij`: the exact mini-batch Fisher
        between output tangents `t_i = J u_i` (the quadratic model's Gram).

        Args:
            y_pred: the model output.
            tangents: list of K output tangents shaped like `y_pred`.
            sample_weight: optional `(batch,)` or `(batch, T)` weights (a
                Keras mask on `y_pred` applies too). Defaults to None.

        Returns:
            A `(K, K)` float32 tensor.
        """
        y_pred = unwrap_single(y_pred)
        scale = self._objective_scale(y_pred, sample_weight)
        y_pred = _to_float(y_pred)
        batch = tf.cast(tf.shape(y_pred)[0], tf.float32)
        tangents = [_to_float(unwrap_single(t)) for t in tangents]
        products = [self.output_fisher_product(y_pred, t) for t in tangents]
        return tf.stack([
            tf.stack([tf.reduce_sum(scale * _sum_like(left * right, scale)) / batch
                      for right in products])
            for left in tangents])

    def __repr__(self):
        return (f"{type(self).__name__}(from_logits={self.from_logits}, "
                f"reduction={self.reduction!r})")


class Categorical(PredictiveDistribution):
    """Softmax cross-entropy: categorical distribution over the last axis.

    Args:
        sparse_labels: True for `SparseCategoricalCrossentropy` (integer
            labels), False for one-hot `CategoricalCrossentropy`.
        **kwargs: `PredictiveDistribution`'s arguments.
    """

    name = "categorical"
    has_fisher_sqrt = True

    def __init__(self, sparse_labels, **kwargs):
        super().__init__(**kwargs)
        self.sparse_labels = bool(sparse_labels)

    def _log_probs(self, y_pred):
        y_pred = _to_float(y_pred)
        if self.from_logits:
            return tf.nn.log_softmax(y_pred, axis=-1)
        probs = y_pred / tf.reduce_sum(y_pred, axis=-1, keepdims=True)
        return tf.math.log(tf.clip_by_value(probs, _EPSILON, 1.0 - _EPSILON))

    def sample_targets(self, y_pred, seed, first_example=0):
        log_probs = tf.stop_gradient(self._log_probs(y_pred))
        num_classes = log_probs.shape[-1]
        flat = tf.reshape(log_probs, [-1, num_classes])
        labels = sampling.categorical(flat, seed, _first_index(log_probs, first_example))
        one_hot = tf.one_hot(labels, num_classes, dtype=tf.float32)
        return tf.reshape(one_hot, tf.shape(log_probs))

    def empirical_targets(self, y_true, y_pred):
        num_classes = y_pred.shape[-1]
        if self.sparse_labels:
            labels = tf.cast(y_true, tf.int32)
            if labels.shape.rank == y_pred.shape.rank:
                labels = tf.squeeze(labels, axis=-1)
            targets = tf.one_hot(labels, num_classes, dtype=tf.float32)
        else:
            targets = _to_float(y_true)
        if self.label_smoothing:
            targets = (targets * (1.0 - self.label_smoothing)
                       + self.label_smoothing / num_classes)
        return tf.stop_gradient(targets)

    def per_value_nll(self, targets, y_pred):
        return -tf.reduce_sum(tf.stop_gradient(targets) * self._log_probs(y_pred), axis=-1)

    def output_hessian_vector_product(self, y_pred, vector):
        probs = tf.nn.softmax(_to_float(y_pred), axis=-1)
        weighted = tf.reduce_sum(probs * vector, axis=-1, keepdims=True)
        return probs * vector - probs * weighted

    def output_fisher_sqrt_product(self, y_pred, noise):
        # Logits: H = diag(p) - p p^T = B B^T, B = diag(sqrt p) - p sqrt(p)^T.
        # Probabilities: diag(1/q) - 1 1^T = B B^T, B = diag(1/sqrt q) (I - sqrt(q) sqrt(q)^T).
        root = tf.sqrt(tf.exp(self._log_probs(y_pred)))
        along = tf.reduce_sum(root * noise, axis=-1, keepdims=True)
        if self.from_logits:
            return root * noise - tf.square(root) * along
        return (noise - root * along) / root

    def _probability_fisher_product(self, y_pred, vector):
        # q = p / sum(p): Fisher in p-coordinates diag(1/p) - 1 1^T (for sum(p) = 1).
        probs = tf.maximum(y_pred, _EPSILON)
        return vector / probs - tf.reduce_sum(vector, axis=-1, keepdims=True)


class _ElementwiseDistribution(PredictiveDistribution):
    """A distribution over each output element; the loss averages (or, for a
    declared loss, sums) its NLL over the last axis.

    Args:
        last_axis: `"mean"` (Keras's own losses) or `"sum"`: how the loss
            function reduces the last axis. Defaults to `"mean"`.
        **kwargs: `PredictiveDistribution`'s arguments.
    """

    def __init__(self, last_axis="mean", **kwargs):
        super().__init__(**kwargs)
        if last_axis not in ("mean", "sum"):
            raise ValueError(f"`last_axis` must be 'mean' or 'sum'; received {last_axis!r}.")
        self.last_axis = last_axis

    def _value_axes(self, y_pred):
        return list(y_pred.shape[1:-1])

    def _inner_count(self, y_pred):
        if self.last_axis == "sum" or y_pred.shape.rank < 2:
            return 1
        return _static_count([y_pred.shape[-1]], y_pred)


class Bernoulli(_ElementwiseDistribution):
    """Sigmoid cross-entropy: independent Bernoulli outputs."""

    name = "bernoulli"
    has_fisher_sqrt = True

    def _probs(self, y_pred):
        y_pred = _to_float(y_pred)
        if self.from_logits:
            return tf.sigmoid(y_pred)
        return tf.clip_by_value(y_pred, _EPSILON, 1.0 - _EPSILON)

    def sample_targets(self, y_pred, seed, first_example=0):
        probs = tf.stop_gradient(self._probs(y_pred))
        uniform = sampling.uniform(tf.shape(probs), seed, _first_index(probs, first_example))
        return tf.cast(uniform < probs, tf.float32)

    def empirical_targets(self, y_true, y_pred):
        targets = tf.reshape(_to_float(y_true), tf.shape(y_pred))
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        return tf.stop_gradient(targets)

    def per_value_nll(self, targets, y_pred):
        targets = tf.stop_gradient(targets)
        if self.from_logits:
            nll = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=_to_float(y_pred))
        else:
            probs = self._probs(y_pred)
            nll = -(targets * tf.math.log(probs) + (1.0 - targets) * tf.math.log(1.0 - probs))
        return self._per_value(nll)

    def output_hessian_vector_product(self, y_pred, vector):
        probs = tf.sigmoid(_to_float(y_pred))
        return probs * (1.0 - probs) * vector

    def _probability_fisher_product(self, y_pred, vector):
        probs = tf.clip_by_value(y_pred, _EPSILON, 1.0 - _EPSILON)
        return vector / (probs * (1.0 - probs))

    def output_fisher_sqrt_product(self, y_pred, noise):
        probs = self._probs(y_pred)
        variance = probs * (1.0 - probs)
        return noise * (tf.sqrt(variance) if self.from_logits else tf.math.rsqrt(variance))


class Gaussian(_ElementwiseDistribution):
    """Squared error: Gaussian of variance 1/2, so `NLL = ||y - f||^2 + const`.

    Args:
        **kwargs: `_ElementwiseDistribution`'s arguments except `from_logits`
            (the output is the mean itself).
    """

    name = "gaussian"
    has_fisher_sqrt = True

    def __init__(self, **kwargs):
        super().__init__(from_logits=True, **kwargs)

    def sample_targets(self, y_pred, seed, first_example=0):
        mean = tf.stop_gradient(_to_float(y_pred))
        return mean + tf.sqrt(0.5) * sampling.normal(
            tf.shape(mean), seed, _first_index(mean, first_example))

    def empirical_targets(self, y_true, y_pred):
        return tf.stop_gradient(tf.reshape(_to_float(y_true), tf.shape(y_pred)))

    def per_value_nll(self, targets, y_pred):
        residual = tf.stop_gradient(targets) - _to_float(y_pred)
        return self._per_value(tf.square(residual))

    def output_hessian_vector_product(self, y_pred, vector):
        return 2.0 * vector

    def output_fisher_sqrt_product(self, y_pred, noise):
        return tf.sqrt(2.0) * noise
