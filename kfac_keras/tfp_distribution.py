"""The predictive distribution of a `kfac_keras.DistributionLoss`: any
`tfp.distributions.Distribution` of the model output, whose output Fisher the
quadratic model estimates by Monte Carlo (`distributions` has the analytic
ones)."""

import tensorflow as tf

from kfac_keras import sampling
from kfac_keras.distributions import PredictiveDistribution, _sum_like, _to_float, unwrap_single


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

    def per_value_nll(self, targets, y_pred):
        return -self._distribution(y_pred).log_prob(tf.stop_gradient(targets))

    def output_fisher_gram(self, y_pred, tangents, sample_weight=None):
        """Monte-Carlo estimate with `fisher_samples` draws per example (a
        fixed seed, the same draws for every tangent, so the Gram is
        positive semi-definite): `mean_n c_n mean_s (s_ns . t_i)(s_ns . t_j)`
        with the scores `s_ns = grad_f log p(y_s | f_n)`."""
        y_pred = unwrap_single(y_pred)
        scale = self._objective_scale(y_pred, sample_weight)
        y_pred = tf.stop_gradient(_to_float(y_pred))
        batch = tf.cast(tf.shape(y_pred)[0], tf.float32)
        tangents = [_to_float(unwrap_single(t)) for t in tangents]
        gram = 0.0
        for sample in range(self.fisher_samples):
            targets = self.sample_targets(y_pred, tf.constant([0x5EED, sample], tf.int32))
            with tf.GradientTape() as tape:
                tape.watch(y_pred)
                log_prob = tf.reduce_sum(-self.per_example_nll(targets, y_pred))
            score = tape.gradient(log_prob, y_pred)
            projections = tf.stack([_sum_like(score * t, scale) for t in tangents], axis=-1)
            gram += tf.einsum("n...,n...i,n...j->ij", scale, projections, projections)
        return gram / (batch * float(self.fisher_samples))

    def __repr__(self):
        return f"TFPDistribution({self.distribution_fn!r}, reduction={self.reduction!r})"
