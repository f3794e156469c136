"""Predictive distributions behind the losses K-FAC supports.

K-FAC approximates the Fisher of the objective the model actually minimises.
Each supported loss is the (scaled) negative log-likelihood of a predictive
distribution over the model's output:

=============================  =================  ==========================
Keras loss                     distribution       values Keras averages
=============================  =================  ==========================
(Sparse)CategoricalCrossentr.  categorical        positions
BinaryCrossentropy             Bernoulli          positions x outputs
MeanSquaredError               Gaussian, var 1/2  positions x outputs
`DistributionLoss(fn)`         `fn(y_pred)`       the `log_prob` shape
`declare_loss(fn, ...)`        as declared        positions (x outputs)
=============================  =================  ==========================

"positions" are the non-batch, non-last axes (e.g. time steps). The objective
is `mean_n c_n NLL_n`, with `c_n` set by Keras's `reduction`:
`"sum_over_batch_size"`/`"mean"` divide by the number of values (batch x
positions), `"sum"` by nothing, `"mean_with_sample_weight"` by the sum of the
sample weights (positions are then summed, as Keras does). The Fisher of that
objective is `c_n E_y[grad NLL grad NLL^T]` with `y` drawn from the model (the
*true* Fisher). We therefore differentiate `sum_n sqrt(c_n) * NLL_n(y_sampled)`
(`statistics_objective`): each example's row of the gradient w.r.t. a
pre-activation is `sqrt(c_n) g_n`, and the factor `G = mean_n c_n g_n g_n^T`
carries the right scale. For squared error `(1/d) ||y - f||^2 = c * NLL` with
`NLL = ||y - f||^2` (a Gaussian of variance 1/2, output Hessian `2 I`), so the
output Hessian of the objective is `(2/d) I`, as in KFAC_NOTES section 2.

**Several outputs** (`JointDistribution`): the loss Keras minimises is
`sum_h w_h loss_h` (`loss_weights` `w_h`); the heads' targets are independent
given the input, so the Fisher is the sum of the heads' Fishers. One backward
pass of `sum_h sqrt(w_h) statistics_objective_h`, each head sampled with its own
seed, gives it: the cross terms between heads have zero mean because a score
`grad log p(y_h)` has zero mean under `y_h`'s own distribution.

**Distribution losses** (`DistributionLoss`): any `tfp.distributions`
distribution of the model output. Targets are drawn by the distribution's own
`sample` with a stateless seed and the Fisher comes from differentiating its
`log_prob`, so no per-distribution code is needed. Unlike the built-in losses
(whose targets come from `kfac_keras.sampling`, bitwise identical under XLA and
across replica splits), TFP's samplers are only reproducible for a given seed
in one execution mode: `jit_compile=True` and a multi-replica split of the batch
draw other (equally distributed) targets.

Exact Fisher products in output space (for the quadratic model) are given by
`output_fisher_gram`; for `DistributionLoss` it is a Monte-Carlo estimate.
"""

import collections

import keras
import tensorflow as tf

from kfac_keras import keras_internals
from kfac_keras import sampling

_EPSILON = 1e-7

SUPPORTED_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight")
ESTIMATION_MODES = ("fisher", "empirical")


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


def _per_example_weight(sample_weight):
    weight = tf.cast(sample_weight, tf.float32)
    if weight.shape.rank == 2 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if weight.shape.rank != 1:
        raise ValueError(
            "K-FAC supports per-example sample weights of shape (batch,) or "
            f"(batch, 1); received shape {weight.shape}. Per-position weights "
            "of shape (batch, T) are not yet supported in the factors.")
    return weight


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

    def per_example_nll(self, targets, y_pred):
        """Unscaled negative log-likelihood of each example, shape `(batch,)`.

        Summed over every non-batch output element; `targets` are treated as
        constants.
        """
        raise NotImplementedError

    def statistics_objective(self, y_pred, y_true, sample_weight, subset, seed,
                             first_example=0):
        """`sum_n sqrt(c_n) NLL_n` over the first `subset` examples.

        Its gradient w.r.t. a pre-activation has rows `sqrt(c_n) g_n`, whose
        mean outer product is the Fisher factor `G` of the objective.

        Args:
            y_pred: the model output (whole batch; `c_n` uses its size).
            y_true: the training labels (used when `seed` is None).
            sample_weight: optional per-example weights. Defaults to None.
            subset: int scalar, the number of leading examples used.
            seed: shape-(2,) int32 seed for sampled targets (the true
                Fisher), or None for the labels (the empirical Fisher).
            first_example: index of `y_pred[0]` in the global batch.
                Defaults to 0.
        """
        y_pred = _unwrap_single(y_pred)
        scale = self.per_example_scale(y_pred, sample_weight)[:subset]
        y_subset = y_pred[:subset]
        if seed is None:
            targets = self.empirical_targets(_unwrap_single(y_true)[:subset], y_subset)
        else:
            targets = self.sample_targets(y_subset, seed, first_example)
        return tf.reduce_sum(tf.sqrt(scale) * self.per_example_nll(targets, y_subset))

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
            sample_weight: optional per-example weights. Defaults to None.

        Returns:
            A `(K, K)` float32 tensor.
        """
        y_pred = _to_float(_unwrap_single(y_pred))
        scale = self.per_example_scale(y_pred, sample_weight)
        batch = tf.cast(tf.shape(y_pred)[0], tf.float32)
        tangents = [_to_float(_unwrap_single(t)) for t in tangents]
        products = [self.output_fisher_product(y_pred, t) for t in tangents]
        return tf.stack([
            tf.stack([tf.reduce_sum(scale * _sum_per_example(left * right)) / batch
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

    def per_example_nll(self, targets, y_pred):
        nll = -tf.reduce_sum(tf.stop_gradient(targets) * self._log_probs(y_pred), axis=-1)
        return _sum_per_example(nll)

    def output_hessian_vector_product(self, y_pred, vector):
        probs = tf.nn.softmax(_to_float(y_pred), axis=-1)
        weighted = tf.reduce_sum(probs * vector, axis=-1, keepdims=True)
        return probs * vector - probs * weighted

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

    def per_example_nll(self, targets, y_pred):
        targets = tf.stop_gradient(targets)
        if self.from_logits:
            nll = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=_to_float(y_pred))
        else:
            probs = self._probs(y_pred)
            nll = -(targets * tf.math.log(probs) + (1.0 - targets) * tf.math.log(1.0 - probs))
        return _sum_per_example(nll)

    def output_hessian_vector_product(self, y_pred, vector):
        probs = tf.sigmoid(_to_float(y_pred))
        return probs * (1.0 - probs) * vector

    def _probability_fisher_product(self, y_pred, vector):
        probs = tf.clip_by_value(y_pred, _EPSILON, 1.0 - _EPSILON)
        return vector / (probs * (1.0 - probs))


class Gaussian(_ElementwiseDistribution):
    """Squared error: Gaussian of variance 1/2, so `NLL = ||y - f||^2 + const`.

    Args:
        **kwargs: `_ElementwiseDistribution`'s arguments except `from_logits`
            (the output is the mean itself).
    """

    name = "gaussian"

    def __init__(self, **kwargs):
        super().__init__(from_logits=True, **kwargs)

    def sample_targets(self, y_pred, seed, first_example=0):
        mean = tf.stop_gradient(_to_float(y_pred))
        return mean + tf.sqrt(0.5) * sampling.normal(
            tf.shape(mean), seed, _first_index(mean, first_example))

    def empirical_targets(self, y_true, y_pred):
        return tf.stop_gradient(tf.reshape(_to_float(y_true), tf.shape(y_pred)))

    def per_example_nll(self, targets, y_pred):
        residual = tf.stop_gradient(targets) - _to_float(y_pred)
        return _sum_per_example(tf.square(residual))

    def output_hessian_vector_product(self, y_pred, vector):
        return 2.0 * vector


# ------------------------------------------------------ distribution losses
class TFPDistribution(PredictiveDistribution):
    """The predictive distribution of a `DistributionLoss`.

    Args:
        distribution_fn: callable `y_pred -> tfp.distributions.Distribution`.
        reduction: the Keras reduction. Defaults to `"sum_over_batch_size"`.
        fisher_samples: int >= 1, samples per example of the Monte-Carlo
            output Fisher used by the quadratic model
            (`KFAC(adaptive=...)`). Defaults to 16.
    """

    name = "tfp"

    def __init__(self, distribution_fn, reduction="sum_over_batch_size", fisher_samples=16):
        super().__init__(from_logits=True, reduction=reduction)
        if not callable(distribution_fn):
            raise TypeError("`distribution_fn` must be a callable y_pred -> "
                            f"tfp.distributions.Distribution; received {distribution_fn!r}.")
        if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int) \
                or fisher_samples < 1:
            raise ValueError(f"`fisher_samples` must be an int >= 1; received {fisher_samples!r}.")
        self.distribution_fn = distribution_fn
        self.fisher_samples = fisher_samples

    def _distribution(self, y_pred):
        return self.distribution_fn(_to_float(y_pred))

    def _value_axes(self, y_pred):
        return list(self._distribution(tf.stop_gradient(y_pred)).batch_shape[1:])

    def sample_targets(self, y_pred, seed, first_example=0):
        # TFP samplers take a stateless seed but no per-element index: fold
        # in the first example so replicas draw different targets.
        seed = sampling.fold_in(seed, first_example)
        return tf.stop_gradient(self._distribution(tf.stop_gradient(y_pred)).sample(seed=seed))

    def empirical_targets(self, y_true, y_pred):
        return tf.stop_gradient(tf.convert_to_tensor(y_true))

    def per_example_nll(self, targets, y_pred):
        return _sum_per_example(-self._distribution(y_pred).log_prob(tf.stop_gradient(targets)))

    def output_fisher_gram(self, y_pred, tangents, sample_weight=None):
        """Monte-Carlo estimate with `fisher_samples` draws per example (a
        fixed seed, the same draws for every tangent, so the Gram is
        positive semi-definite): `mean_n c_n mean_s (s_ns . t_i)(s_ns . t_j)`
        with the scores `s_ns = grad_f log p(y_s | f_n)`."""
        y_pred = tf.stop_gradient(_to_float(_unwrap_single(y_pred)))
        scale = self.per_example_scale(y_pred, sample_weight)
        batch = tf.cast(tf.shape(y_pred)[0], tf.float32)
        tangents = [_to_float(_unwrap_single(t)) for t in tangents]
        gram = 0.0
        for sample in range(self.fisher_samples):
            targets = self.sample_targets(y_pred, tf.constant([0x5EED, sample], tf.int32))
            with tf.GradientTape() as tape:
                tape.watch(y_pred)
                log_prob = tf.reduce_sum(-self.per_example_nll(targets, y_pred))
            score = tape.gradient(log_prob, y_pred)
            projections = tf.stack([_sum_per_example(score * t) for t in tangents], axis=1)
            gram += tf.einsum("n,ni,nj->ij", scale, projections, projections)
        return gram / (batch * float(self.fisher_samples))

    def __repr__(self):
        return f"TFPDistribution({self.distribution_fn!r}, reduction={self.reduction!r})"


class DistributionLoss(keras.losses.Loss):
    """A Keras loss that is the NLL of a `tfp.distributions` distribution of
    the model output; K-FAC uses that distribution's true Fisher.

    Example (heteroscedastic regression, two outputs: mean and raw scale)::

        tfd = tfp.distributions
        loss = kfac_keras.DistributionLoss(lambda y_pred: tfd.Normal(
            loc=y_pred[..., :1], scale=1e-3 + tf.math.softplus(y_pred[..., 1:])))
        model.compile(optimizer=kfac_keras.KFAC(...), loss=loss)

    `call(y_true, y_pred)` is `-distribution_fn(y_pred).log_prob(y_true)`,
    one value per element of the distribution's batch shape, reduced
    Keras-style (`reduction`), sample weights and masks included.

    Args:
        distribution_fn: callable `y_pred -> tfp.distributions.Distribution`
            whose batch shape starts with the batch axis (use
            `tfd.Independent` to sum the NLL over output axes).
        reduction: Keras reduction: `"sum_over_batch_size"`, `"mean"`,
            `"sum"` or `"mean_with_sample_weight"`. Defaults to
            `"sum_over_batch_size"`.
        name: the loss name. Defaults to `"distribution_loss"`.
        fisher_samples: int >= 1, Monte-Carlo samples per example of the
            output Fisher in the quadratic model (`KFAC(adaptive=...)` only).
            Defaults to 16.
        dtype: the Keras loss dtype. Defaults to None (Keras's default).
    """

    def __init__(self, distribution_fn, reduction="sum_over_batch_size",
                 name="distribution_loss", fisher_samples=16, dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.predictive_distribution = TFPDistribution(
            distribution_fn, reduction=reduction, fisher_samples=fisher_samples)
        self.distribution_fn = distribution_fn

    def call(self, y_true, y_pred):
        distribution = self.distribution_fn(y_pred)
        return -distribution.log_prob(tf.cast(y_true, distribution.dtype))


_DECLARED = {
    "categorical": (Categorical, {"sparse_labels": False}),
    "sparse_categorical": (Categorical, {"sparse_labels": True}),
    "bernoulli": (Bernoulli, {}),
    "gaussian": (Gaussian, {}),
}


class DeclaredLoss(keras.losses.Loss):
    """A plain loss function declared to be a known distribution's NLL; made
    by `declare_loss`.

    Args:
        fn: callable `(y_true, y_pred) -> values` reducing the last axis.
        predictive_distribution: the declared `PredictiveDistribution`.
        reduction: the Keras reduction.
        name: the loss name.
    """

    def __init__(self, fn, predictive_distribution, reduction, name):
        super().__init__(reduction=reduction, name=name)
        self.fn = fn
        self.predictive_distribution = predictive_distribution

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def declare_loss(fn, distribution, from_logits=False, last_axis="sum",
                 reduction="sum_over_batch_size", name=None):
    """Declares what a custom loss function is the negative log-likelihood of.

    Example (the paper's autoencoder loss, Bernoulli NLL summed over pixels)::

        def pixel_cross_entropy(y_true, y_pred):
            return tf.reduce_sum(keras.ops.binary_crossentropy(y_true, y_pred), -1)

        loss = kfac_keras.declare_loss(pixel_cross_entropy, "bernoulli")

    K-FAC takes the declaration on trust: `fn(y_true, y_pred)` must equal,
    for each example (and position), the declared distribution's NLL over the
    last axis, summed (`last_axis="sum"`) or averaged (`"mean"`, what Keras's
    own functions do). For `"gaussian"` the NLL is `sum (y - f)^2` (variance
    1/2). Anything else (a `tfp.distributions` NLL): use `DistributionLoss`.

    Args:
        fn: callable `(y_true, y_pred) -> values`, one value per example (and
            position): it reduces the last axis only.
        distribution: `"bernoulli"`, `"categorical"` (one-hot labels),
            `"sparse_categorical"` (integer labels) or `"gaussian"`.
        from_logits: whether `y_pred` is a logit (for `"bernoulli"` and the
            categoricals). Defaults to False.
        last_axis: `"sum"` or `"mean"`, how `fn` reduces the last axis
            (the categoricals consume the class axis and need `"sum"`).
            Defaults to `"sum"`.
        reduction: Keras reduction of `fn`'s values. Defaults to
            `"sum_over_batch_size"`.
        name: the loss name. Defaults to `fn.__name__`.

    Returns:
        A `DeclaredLoss` (a Keras loss) for `model.compile` or `make_train_step`.

    Raises:
        ValueError: for an unknown distribution or option.
    """
    if distribution not in _DECLARED:
        raise ValueError(f"`distribution` must be one of {sorted(_DECLARED)}; received "
                         f"{distribution!r}. For other distributions use DistributionLoss.")
    cls, kwargs = _DECLARED[distribution]
    if cls is Categorical:
        if last_axis != "sum":
            raise ValueError("A categorical NLL consumes the class axis: use last_axis='sum'.")
        predictive = cls(from_logits=from_logits, reduction=reduction, **kwargs)
    elif cls is Gaussian:
        if from_logits:
            raise ValueError("`from_logits` has no meaning for a Gaussian loss.")
        predictive = cls(last_axis=last_axis, reduction=reduction)
    else:
        predictive = cls(last_axis=last_axis, from_logits=from_logits, reduction=reduction)
    return DeclaredLoss(fn, predictive, reduction=reduction,
                        name=name or getattr(fn, "__name__", "declared_loss"))


# ---------------------------------------------------------- several outputs
Head = collections.namedtuple("Head", ["key", "name", "index", "distribution", "weight"])
Head.__doc__ = """One model output with a loss: `key` indexes the output
structure (a dict key or a list index), `name` is its output name, `index`
its position in the flattened outputs, `weight` its `loss_weights` entry."""


def _select(structure, head, what):
    if isinstance(structure, dict):
        for key in (head.key, head.name):
            if key in structure:
                return structure[key]
        raise KeyError(f"K-FAC found no {what} for output {head.name!r} in the keys "
                       f"{sorted(structure)}.")
    if isinstance(structure, (list, tuple)):
        return structure[head.index]
    return structure


class JointDistribution:
    """Independent predictive distributions over a model's outputs.

    Exposes `statistics_objective` and `output_fisher_gram` like a single
    `PredictiveDistribution` (module docstring: the Fisher of a sum of
    independent NLLs is the sum of their Fishers), so the training step and
    the quadratic model need no per-head code.

    Args:
        heads: list of `Head`s (outputs without a loss are left out).
    """

    name = "joint"

    def __init__(self, heads):
        if not heads:
            raise ValueError("K-FAC needs at least one output with a loss.")
        for head in heads:
            if head.weight < 0:
                raise ValueError(f"K-FAC needs loss_weights >= 0; output {head.name!r} "
                                 f"has weight {head.weight!r}.")
        self.heads = list(heads)

    @property
    def reduction(self):
        """`"sum"` if any head sums over the batch (what the multi-replica
        check needs to know), else the first head's reduction."""
        reductions = [head.distribution.reduction for head in self.heads]
        return "sum" if "sum" in reductions else reductions[0]

    @staticmethod
    def _head_seed(seed, head):
        # The first output keeps the step's seed (a single weighted output
        # draws what the unweighted one draws); the others get their own.
        return seed if head.index == 0 else sampling.fold_in(seed, head.index)

    def _sample_weight(self, sample_weight, head):
        if sample_weight is None:
            return None
        return _select(sample_weight, head, "sample weight")

    def per_example_nll(self, targets, y_pred):
        """Weighted joint NLL `sum_h w_h NLL_h`, shape `(batch,)`; `targets`
        are per head, in the structure of `sample_targets`."""
        return tf.add_n([head.weight * head.distribution.per_example_nll(
            _select(targets, head, "targets"), _select(y_pred, head, "output"))
            for head in self.heads])

    def sample_targets(self, y_pred, seed, first_example=0):
        """A dict `{head name: targets}`, each head with its own seed."""
        return {head.name: head.distribution.sample_targets(
            _select(y_pred, head, "output"), self._head_seed(seed, head), first_example)
            for head in self.heads}

    def empirical_targets(self, y_true, y_pred):
        """A dict `{head name: labels}`."""
        return {head.name: head.distribution.empirical_targets(
            _select(y_true, head, "labels"), _select(y_pred, head, "output"))
            for head in self.heads}

    def statistics_objective(self, y_pred, y_true, sample_weight, subset, seed,
                             first_example=0):
        """`sum_h sqrt(w_h) sum_n sqrt(c_hn) NLL_hn`; arguments as in
        `PredictiveDistribution.statistics_objective`."""
        terms = []
        for head in self.heads:
            if head.weight == 0:
                continue
            terms.append(head.weight ** 0.5 * head.distribution.statistics_objective(
                _select(y_pred, head, "output"),
                None if seed is not None else _select(y_true, head, "labels"),
                self._sample_weight(sample_weight, head), subset,
                None if seed is None else self._head_seed(seed, head), first_example))
        return tf.add_n(terms) if terms else tf.constant(0.0)

    def output_fisher_gram(self, y_pred, tangents, sample_weight=None):
        """`sum_h w_h` of each head's Gram; `tangents` shaped like `y_pred`."""
        return tf.add_n([head.weight * head.distribution.output_fisher_gram(
            _select(y_pred, head, "output"), [_select(t, head, "tangent") for t in tangents],
            self._sample_weight(sample_weight, head)) for head in self.heads])

    def __repr__(self):
        return "JointDistribution(" + ", ".join(
            f"{head.name}: {head.weight} * {head.distribution!r}" for head in self.heads) + ")"


# ------------------------------------------------------------ resolution
_STRING_LOSSES = {
    "sparse_categorical_crossentropy": (Categorical, {"sparse_labels": True}),
    "categorical_crossentropy": (Categorical, {"sparse_labels": False}),
    "binary_crossentropy": (Bernoulli, {}),
    "mean_squared_error": (Gaussian, {}),
    "mse": (Gaussian, {}),
}

_CLASS_LOSSES = (
    (keras.losses.SparseCategoricalCrossentropy, Categorical, {"sparse_labels": True}),
    (keras.losses.CategoricalCrossentropy, Categorical, {"sparse_labels": False}),
    (keras.losses.BinaryCrossentropy, Bernoulli, {}),
    (keras.losses.MeanSquaredError, Gaussian, {}),
)

_FUNCTION_LOSSES = {
    keras.losses.sparse_categorical_crossentropy: "sparse_categorical_crossentropy",
    keras.losses.categorical_crossentropy: "categorical_crossentropy",
    keras.losses.binary_crossentropy: "binary_crossentropy",
    keras.losses.mean_squared_error: "mean_squared_error",
}

SUPPORTED_LOSSES = tuple(sorted(_STRING_LOSSES)) + tuple(
    cls.__name__ for cls, _, _ in _CLASS_LOSSES) + ("DistributionLoss", "declare_loss")


def _unsupported(loss):
    return ValueError(
        f"K-FAC cannot build a Fisher for loss={loss!r}: it supports "
        f"{', '.join(SUPPORTED_LOSSES[:-2])} (as strings, classes or the keras.losses "
        "functions). For another loss, declare what it is the negative "
        "log-likelihood of: `kfac_keras.DistributionLoss(lambda y_pred: "
        "tfp.distributions.<Distribution>(...))`, or for a plain function "
        "`kfac_keras.declare_loss(fn, distribution='bernoulli' | 'categorical' | "
        "'sparse_categorical' | 'gaussian')`.")


_LOSS_CLASSES = {
    "sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy,
    "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
    "binary_crossentropy": keras.losses.BinaryCrossentropy,
    "mean_squared_error": keras.losses.MeanSquaredError,
    "mse": keras.losses.MeanSquaredError,
}


def _unwrap_single(loss):
    """A one-entry list/tuple/dict of losses is that loss."""
    if isinstance(loss, (list, tuple)) and len(loss) == 1:
        return loss[0]
    if isinstance(loss, dict) and len(loss) == 1:
        return next(iter(loss.values()))
    return loss


def loss_object(loss):
    """A `keras.losses.Loss` instance for a supported string, function or object.

    Raises:
        ValueError: for an unsupported loss.
    """
    loss = _unwrap_single(loss)
    distribution_for_loss(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss
    name = _FUNCTION_LOSSES.get(loss, loss)
    return _LOSS_CLASSES[name]()


def distribution_for_loss(loss):
    """Maps one loss (string, object or function; or a one-entry list or
    dict of one) to its distribution.

    Raises:
        ValueError: for an unsupported loss or loss option, naming it.
    """
    loss = _unwrap_single(loss)
    if isinstance(loss, (list, tuple, dict)):
        raise ValueError(
            f"K-FAC maps one loss to one output here; received loss={loss!r}. For "
            "several outputs compile the model with the losses (and loss_weights) "
            "or use `kfac_keras.losses.distribution_for_model`.")
    if isinstance(loss, (DistributionLoss, DeclaredLoss)):
        return loss.predictive_distribution
    if isinstance(loss, str):
        if loss not in _STRING_LOSSES:
            raise _unsupported(loss)
        cls, kwargs = _STRING_LOSSES[loss]
        return cls(**kwargs)
    if loss in _FUNCTION_LOSSES:
        return distribution_for_loss(_FUNCTION_LOSSES[loss])
    for keras_cls, cls, kwargs in _CLASS_LOSSES:
        if type(loss) is keras_cls:
            options = keras_internals.loss_function_options(loss)
            from_logits = options.pop("from_logits", False)
            label_smoothing = options.pop("label_smoothing", 0.0)
            axis = options.pop("axis", -1)
            ignore_class = options.pop("ignore_class", None)
            if axis != -1:
                raise ValueError(
                    f"K-FAC supports {keras_cls.__name__} with axis=-1 only; "
                    f"received axis={axis!r}.")
            if ignore_class is not None:
                raise ValueError(
                    "K-FAC does not support SparseCategoricalCrossentropy("
                    f"ignore_class={ignore_class!r}); use ignore_class=None and "
                    "sample weights instead.")
            if options:
                raise ValueError(
                    f"K-FAC does not support the {keras_cls.__name__} options "
                    f"{sorted(options)}.")
            if cls is Gaussian:
                return Gaussian(reduction=loss.reduction)
            return cls(from_logits=from_logits, reduction=loss.reduction,
                       label_smoothing=label_smoothing, **kwargs)
    raise _unsupported(loss)


def _output_keys(model):
    """`(keys, names)` of the model's outputs in flattened (`keras.tree`)
    order, or None for a model with one output tensor."""
    structure = getattr(model, "_outputs_struct", None)
    if structure is None:
        outputs = getattr(model, "outputs", None) or []
        structure = outputs if len(outputs) > 1 else None
    if not isinstance(structure, (dict, list, tuple)):
        return None
    names = list(getattr(model, "output_names", None) or [])
    if isinstance(structure, dict):
        keys = sorted(structure)
        return keys, keys
    if any(isinstance(s, (dict, list, tuple)) for s in structure):
        raise ValueError("K-FAC supports a flat list or dict of model outputs; the "
                         "model's outputs are nested.")
    if len(structure) == 1:
        return None
    keys = list(range(len(structure)))
    return keys, (names if len(names) == len(keys) else [str(k) for k in keys])


def _per_output(value, keys, names, what):
    """`value` (a loss or loss weight) given per output -> list aligned with keys."""
    if isinstance(value, dict):
        unknown = set(value) - set(keys) - set(names)
        if unknown:
            raise ValueError(f"K-FAC: the {what} has keys {sorted(map(str, unknown))} that "
                             f"are not model outputs {names}.")
        return [value.get(key, value.get(name)) for key, name in zip(keys, names)]
    if isinstance(value, (list, tuple)):
        if len(value) != len(keys):
            raise ValueError(f"K-FAC: the {what} has {len(value)} entries for "
                             f"{len(keys)} model outputs.")
        return list(value)
    return [value] * len(keys)


def distribution_for_model(model, loss, loss_weights=None):
    """The predictive distribution of a model's outputs under `loss`.

    Args:
        model: the Keras model; its output structure (one tensor, a list or a
            dict) is read from the functional graph.
        loss: one loss (applied to every output, as Keras does) or a list or
            dict of losses per output (None: that output has no loss).
        loss_weights: None, a float (one output) or a list/dict per output, as
            in `model.compile`. Defaults to None (weights 1).

    Returns:
        A `PredictiveDistribution` for one output with weight 1, else a
        `JointDistribution`.

    Raises:
        ValueError: for unsupported losses, or losses and weights that do not
            match the outputs.
    """
    outputs = _output_keys(model)
    if outputs is None:
        loss = _unwrap_single(loss)
        weight = _unwrap_single(loss_weights) if loss_weights is not None else None
        distribution = distribution_for_loss(loss)
        if weight is None or float(weight) == 1.0:
            return distribution
        return JointDistribution([Head(None, "output", 0, distribution, float(weight))])
    keys, names = outputs
    per_loss = _per_output(loss, keys, names, "loss")
    per_weight = (_per_output(loss_weights, keys, names, "loss_weights")
                  if loss_weights is not None else [None] * len(keys))
    heads = []
    for index, (key, name, head_loss, weight) in enumerate(zip(keys, names, per_loss, per_weight)):
        if head_loss is None:
            continue
        try:
            distribution = distribution_for_loss(head_loss)
        except ValueError as error:
            raise ValueError(f"Output {name!r}: {error}") from None
        heads.append(Head(key, name, index, distribution, 1.0 if weight is None else float(weight)))
    return JointDistribution(heads)
