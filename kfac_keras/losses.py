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

import keras
import tensorflow as tf

from kfac_keras import keras_internals
from kfac_keras.distributions import (  # noqa: F401 (some re-exported)
    ESTIMATION_MODES, SUPPORTED_REDUCTIONS, Bernoulli, Categorical, Gaussian,
    PredictiveDistribution, normalize_sample_weight, row_sample_weight, unwrap_single)
from kfac_keras.joint_distribution import Head, JointDistribution  # noqa: F401
from kfac_keras.tfp_distribution import TFPDistribution  # noqa: F401

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


def loss_object(loss):
    """A `keras.losses.Loss` instance for a supported string, function or object.

    Raises:
        ValueError: for an unsupported loss.
    """
    loss = unwrap_single(loss)
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
    loss = unwrap_single(loss)
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
        loss = unwrap_single(loss)
        weight = unwrap_single(loss_weights) if loss_weights is not None else None
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
