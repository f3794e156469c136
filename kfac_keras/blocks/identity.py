"""`IdentityBlock`: variables trained with the plain (un-preconditioned) gradient.

Registration gives it to the variables of layers named in `exclude_layers`.
It has no state and no statistics; `multiply_damped_inverse` returns the
gradients unchanged.
"""

import tensorflow as tf

from kfac_keras.blocks.base import FisherBlock, StatisticsSource


class IdentityBlock(FisherBlock):
    """The identity "Fisher" block: the plain gradient.

    Args:
        name: readable name.
        variables: the covered model variables.
        layer: the owning layer, or None. Defaults to None.
    """

    kind = "identity"
    statistics_source = StatisticsSource.NONE

    def __init__(self, name, variables, layer=None):
        super().__init__(name, variables, layer)
        self.built = True

    def build(self, optimizer):
        """No state."""
        del optimizer

    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        """No statistics."""
        del captures, sampled_grads, num_examples, decay

    def update_inverses(self, damping):
        """Nothing to decompose."""
        del damping

    def multiply_damped_inverse(self, grads, damping):
        del damping
        # New tensors, not the incoming ones: the caller may run this inside a
        # tf.cond branch, where Keras's apply needs branch-local tensors.
        return [tf.identity(g) for g in grads]

    def state_variables(self):
        return []

    def factor_shapes(self):
        return {}
