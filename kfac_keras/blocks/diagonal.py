"""Diagonal Fisher block: the fallback for any other trainable variable.

Used for variables no structured block covers (custom layers, PReLU, bias-only
layers, layers the user asks to treat diagonally). The estimate comes from the
same sampled-loss backward pass as the Kronecker factors: with `s` the
gradient of the sampled objective summed over the `m` examples of the
statistics subset, `s = sum_n sqrt(c_n) grad NLL_n`, the estimate is

    diag(F) ~= s**2 / m.

Under the true Fisher (`estimation_mode="fisher"`) the per-example terms have
mean zero given the inputs and are independent across examples, so
`E[s**2] = sum_n E[(sqrt(c_n) grad NLL_n)**2]` and the estimate is unbiased
(but noisier than squaring per-example gradients, which would need `m` extra
backward passes). With `estimation_mode="empirical"` the terms do not have
mean zero and the estimate is biased upward by the squared mean gradient.

Memory: one float per parameter for the estimate.
"""

import tensorflow as tf

from kfac_keras.blocks.base import FisherBlock, ema_assign


class DiagonalBlock(FisherBlock):
    """Diagonal Fisher block `(diag(F) + damping)^{-1} g`.

    Args:
        name: readable name.
        variables: the covered model variables.
        layer: the owning layer, if known.
    """

    kind = "diagonal"

    def build(self, optimizer):
        if self.built:
            return
        self.diagonal_factors = [
            optimizer.add_variable(
                tuple(v.shape), initializer="zeros", dtype="float32",
                name=v.path.replace("/", "_") + "_diagonal_factor")
            for v in self.variables
        ]
        self.built = True

    def state_variables(self):
        return list(self.diagonal_factors)

    def factor_shapes(self):
        return {"diagonal": [tuple(v.shape) for v in self.variables]}

    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        for factor, grad in zip(self.diagonal_factors, sampled_grads):
            grad = tf.cast(tf.convert_to_tensor(grad), tf.float32)
            ema_assign(factor, tf.square(grad) / num_examples, decay)

    def update_inverses(self, damping):
        """Nothing to decompose."""
        del damping

    def curvature_scale(self):
        """The mean of the diagonal Fisher over all the block's entries."""
        total = tf.add_n([tf.reduce_sum(f) for f in self.diagonal_factors])
        count = sum(f.shape.num_elements() for f in self.diagonal_factors)
        return total / count

    def multiply_damped_inverse(self, grads, damping):
        damping = tf.cast(self.block_damping(damping), tf.float32)
        return [tf.cast(g, tf.float32) / (factor + damping)
                for g, factor in zip(grads, self.diagonal_factors)]
