"""Predictive distributions behind the Keras losses K-FAC supports.

K-FAC approximates the Fisher of the objective the model actually minimises.
Each supported Keras loss is the (scaled) negative log-likelihood of a
predictive distribution over the model's output:

=============================  =================  ==========================
Keras loss                     distribution       scale `c` per example
=============================  =================  ==========================
(Sparse)CategoricalCrossentr.  categorical        1 / (positions per example)
BinaryCrossentropy             Bernoulli          1 / (outputs per example)
MeanSquaredError               Gaussian, var 1/2  1 / (outputs per example)
=============================  =================  ==========================

"positions" are the non-batch, non-class axes (e.g. time steps); Keras averages
its losses over them and over the batch, so the per-example objective is
`l_n = c * NLL_n`. The Fisher of that objective is `c * E_y[grad NLL grad
NLL^T]` with `y` drawn from the model (the *true* Fisher). We therefore
differentiate `sum_n sqrt(c_n) * NLL_n(y_sampled)`: each example's row of the
gradient w.r.t. a pre-activation is `sqrt(c_n) g_n`, and the factor
`G = mean_n sqrt(c_n) g_n (sqrt(c_n) g_n)^T` carries the right scale. For
squared error `(1/d) ||y - f||^2 = c * NLL` with `NLL = ||y - f||^2` (a Gaussian
of variance 1/2, output Hessian `2 I`), so the output Hessian of the objective
is `(2/d) I`, as in KFAC_NOTES section 2. Sample weights multiply `c_n`; the
`"sum"` reduction multiplies it by the batch size.

The output Hessians (for exact Fisher-vector products) are available through
`output_hessian_vector_product`.
"""

import keras
import tensorflow as tf

from kfac_keras import sampling

_EPSILON = 1e-7

SUPPORTED_REDUCTIONS = ("sum_over_batch_size", "mean", "sum")
ESTIMATION_MODES = ("fisher", "empirical")


class PredictiveDistribution:
    """Base class: the distribution whose NLL a Keras loss is.

    Args:
        from_logits: whether the model's output is a logit (pre-sigmoid /
            pre-softmax) rather than a probability.
        reduction: the Keras loss reduction, one of `SUPPORTED_REDUCTIONS`.
        label_smoothing: the loss's label smoothing; it changes only the
            empirical targets (the Fisher does not depend on the labels).
    """

    name = "base"

    def __init__(self, from_logits=False, reduction="sum_over_batch_size",
                 label_smoothing=0.0):
        if reduction not in SUPPORTED_REDUCTIONS:
            raise ValueError(
                f"K-FAC supports loss reductions {SUPPORTED_REDUCTIONS}; the "
                f"compiled loss uses reduction={reduction!r}."
            )
        self.from_logits = bool(from_logits)
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)

    # -- shapes and scale ------------------------------------------------
    def _averaged_axes(self, y_pred):
        """Non-batch axes the Keras loss averages over (static sizes)."""
        raise NotImplementedError

    def per_example_scale(self, y_pred, sample_weight=None):
        """`c_n` for each example: the objective is `mean_n c_n NLL_n`.

        Returns:
            A float32 tensor of shape `(batch,)`.
        """
        count = 1
        for size in self._averaged_axes(y_pred):
            if size is None:
                raise ValueError(
                    "K-FAC needs static output shapes (other than the batch "
                    f"axis); the model output has shape {y_pred.shape}."
                )
            count *= size
        batch = tf.shape(y_pred)[0]
        scale = tf.fill([batch], 1.0 / float(count))
        if self.reduction == "sum":
            scale = scale * tf.cast(batch, tf.float32)
        if sample_weight is not None:
            weight = tf.cast(sample_weight, tf.float32)
            if weight.shape.rank == 2 and weight.shape[1] == 1:
                weight = weight[:, 0]
            if weight.shape.rank != 1:
                raise ValueError(
                    "K-FAC supports per-example sample weights of shape "
                    f"(batch,) or (batch, 1); received shape {weight.shape}."
                )
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

    def output_hessian_vector_product(self, y_pred, vector):
        """Hessian of the per-example NLL w.r.t. the *output pre-activation*
        (logits, or the output itself for squared error), times `vector`.

        Only defined with `from_logits=True` losses and squared error, where
        the output is the natural parameter; with probability outputs the
        softmax/sigmoid is part of the network and the caller must
        differentiate through it.
        """
        raise NotImplementedError

    def __repr__(self):
        return (
            f"{type(self).__name__}(from_logits={self.from_logits}, "
            f"reduction={self.reduction!r})"
        )


def _to_float(x):
    return tf.cast(x, tf.float32)


def _first_index(values, first_example):
    """Index of the first element of `values` (examples along axis 0, in
    row-major order) in the global batch whose example `first_example` is
    `values[0]`."""
    per_example = tf.reduce_prod(tf.shape(values)[1:])
    return tf.cast(first_example, tf.int32) * per_example


class Categorical(PredictiveDistribution):
    """Softmax cross-entropy: categorical distribution over the last axis.

    Args:
        sparse_labels: True for `SparseCategoricalCrossentropy` (integer
            labels), False for one-hot `CategoricalCrossentropy`.
    """

    name = "categorical"

    def __init__(self, sparse_labels, **kwargs):
        super().__init__(**kwargs)
        self.sparse_labels = bool(sparse_labels)

    def _averaged_axes(self, y_pred):
        return list(y_pred.shape[1:-1])

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
        nll = -tf.reduce_sum(tf.stop_gradient(targets) * self._log_probs(y_pred),
                             axis=-1)
        return tf.reduce_sum(tf.reshape(nll, [tf.shape(nll)[0], -1]), axis=1)

    def output_hessian_vector_product(self, y_pred, vector):
        probs = tf.nn.softmax(_to_float(y_pred), axis=-1)
        weighted = tf.reduce_sum(probs * vector, axis=-1, keepdims=True)
        return probs * vector - probs * weighted


class Bernoulli(PredictiveDistribution):
    """Sigmoid cross-entropy: independent Bernoulli outputs."""

    name = "bernoulli"

    def _averaged_axes(self, y_pred):
        return list(y_pred.shape[1:])

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
            nll = tf.nn.sigmoid_cross_entropy_with_logits(
                labels=targets, logits=_to_float(y_pred))
        else:
            probs = self._probs(y_pred)
            nll = -(targets * tf.math.log(probs)
                    + (1.0 - targets) * tf.math.log(1.0 - probs))
        return tf.reduce_sum(tf.reshape(nll, [tf.shape(nll)[0], -1]), axis=1)

    def output_hessian_vector_product(self, y_pred, vector):
        probs = tf.sigmoid(_to_float(y_pred))
        return probs * (1.0 - probs) * vector


class Gaussian(PredictiveDistribution):
    """Squared error: Gaussian of variance 1/2, so `NLL = ||y - f||^2 + const`."""

    name = "gaussian"

    def __init__(self, **kwargs):
        super().__init__(from_logits=True, **kwargs)

    def _averaged_axes(self, y_pred):
        return list(y_pred.shape[1:])

    def sample_targets(self, y_pred, seed, first_example=0):
        mean = tf.stop_gradient(_to_float(y_pred))
        return mean + tf.sqrt(0.5) * sampling.normal(
            tf.shape(mean), seed, _first_index(mean, first_example))

    def empirical_targets(self, y_true, y_pred):
        return tf.stop_gradient(tf.reshape(_to_float(y_true), tf.shape(y_pred)))

    def per_example_nll(self, targets, y_pred):
        residual = tf.stop_gradient(targets) - _to_float(y_pred)
        return tf.reduce_sum(
            tf.reshape(tf.square(residual), [tf.shape(residual)[0], -1]), axis=1)

    def output_hessian_vector_product(self, y_pred, vector):
        return 2.0 * vector


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
    cls.__name__ for cls, _, _ in _CLASS_LOSSES)


def _unsupported(loss):
    return ValueError(
        f"K-FAC cannot build a Fisher for loss={loss!r}: it supports "
        f"{', '.join(SUPPORTED_LOSSES)} (as strings, classes or the "
        "keras.losses functions). Other losses have no predictive "
        "distribution registered."
    )


_LOSS_CLASSES = {
    "sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy,
    "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
    "binary_crossentropy": keras.losses.BinaryCrossentropy,
    "mean_squared_error": keras.losses.MeanSquaredError,
    "mse": keras.losses.MeanSquaredError,
}


def loss_object(loss):
    """A `keras.losses.Loss` instance for a supported string, function or object.

    Raises:
        ValueError: for an unsupported loss.
    """
    distribution_for_loss(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss
    name = _FUNCTION_LOSSES.get(loss, loss)
    return _LOSS_CLASSES[name]()


def distribution_for_loss(loss):
    """Maps a Keras loss (string, object or function) to its distribution.

    Raises:
        ValueError: for an unsupported loss or loss option, naming it.
    """
    if isinstance(loss, (list, tuple, dict)):
        raise ValueError(
            "K-FAC supports a single loss on a single model output; received "
            f"loss={loss!r}."
        )
    if isinstance(loss, str):
        if loss not in _STRING_LOSSES:
            raise _unsupported(loss)
        cls, kwargs = _STRING_LOSSES[loss]
        return cls(**kwargs)
    if loss in _FUNCTION_LOSSES:
        return distribution_for_loss(_FUNCTION_LOSSES[loss])
    for keras_cls, cls, kwargs in _CLASS_LOSSES:
        if type(loss) is keras_cls:
            options = dict(loss._fn_kwargs)
            from_logits = options.pop("from_logits", False)
            label_smoothing = options.pop("label_smoothing", 0.0)
            axis = options.pop("axis", -1)
            ignore_class = options.pop("ignore_class", None)
            if axis != -1:
                raise ValueError(
                    f"K-FAC supports {keras_cls.__name__} with axis=-1 only; "
                    f"received axis={axis!r}."
                )
            if ignore_class is not None:
                raise ValueError(
                    "K-FAC does not support SparseCategoricalCrossentropy("
                    f"ignore_class={ignore_class!r}); use ignore_class=None and "
                    "sample weights instead."
                )
            if options:
                raise ValueError(
                    f"K-FAC does not support the {keras_cls.__name__} options "
                    f"{sorted(options)}."
                )
            if cls is Gaussian:
                return Gaussian(reduction=loss.reduction)
            return cls(from_logits=from_logits, reduction=loss.reduction,
                       label_smoothing=label_smoothing, **kwargs)
    raise _unsupported(loss)
