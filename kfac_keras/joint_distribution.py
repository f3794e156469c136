"""Several outputs: independent predictive distributions, one per model
output with a loss (`kfac_keras.losses` builds them from Keras's dict or list
of losses and its `loss_weights`). The Fisher of a sum of independent negative
log-likelihoods is the sum of their Fishers, so one sampled backward pass over
every head gives the statistics.
"""

import collections

import tensorflow as tf

from kfac_keras import sampling

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
    `PredictiveDistribution` (this module's docstring: the Fisher of a sum of
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

    @property
    def has_fisher_sqrt(self):
        """True if every head's output Fisher has a closed-form square root."""
        return all(head.distribution.has_fisher_sqrt for head in self.heads)

    def missing_fisher_sqrt_error(self):
        """The first head's error that has no closed-form square root."""
        return next(head.distribution.missing_fisher_sqrt_error() for head in self.heads
                    if not head.distribution.has_fisher_sqrt)

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
                             first_example=0, mode="fisher"):
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
                None if seed is None else self._head_seed(seed, head), first_example, mode))
        return tf.add_n(terms) if terms else tf.constant(0.0)

    def output_fisher_gram(self, y_pred, tangents, sample_weight=None):
        """`sum_h w_h` of each head's Gram; `tangents` shaped like `y_pred`."""
        return tf.add_n([head.weight * head.distribution.output_fisher_gram(
            _select(y_pred, head, "output"), [_select(t, head, "tangent") for t in tangents],
            self._sample_weight(sample_weight, head)) for head in self.heads])

    def __repr__(self):
        return "JointDistribution(" + ", ".join(
            f"{head.name}: {head.weight} * {head.distribution!r}" for head in self.heads) + ")"
