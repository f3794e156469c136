"""The contract every Fisher block implements.

A block covers some of a model's trainable variables and approximates the
Fisher restricted to them. The curvature pipeline calls, in order:

1. `build(optimizer)` once: create the block's state (factors, inverses) as
   optimizer variables, so checkpoints and `model.save` include them.
2. `update_statistics(captures, sampled_grads, num_examples, decay)` every
   `T_cov` steps:
   fold a new estimate into the factors with an exponential moving average.
3. `update_inverses(damping)` every `T_inv` steps: decompose the factors.
4. `multiply_damped_inverse(grads, damping)` every step: return
   `(F_block + damping I)^{-1} grads` (in the block's approximation).

`damping` is always the total `lambda + eta` (damping plus the L2
coefficient), so blocks never need to know where it came from.
"""

import numpy as np


class FisherBlock:
    """Base class for Fisher blocks.

    Args:
        name: a readable name (usually the layer's path).
        variables: the model variables this block covers, in a fixed order;
            `multiply_damped_inverse` takes and returns gradients in this order.
        layer: the Keras layer the block belongs to, or None.
    """

    #: Short name shown in the registration report.
    kind = "base"
    #: True if the block needs the layer's inputs and pre-activation
    #: gradients captured in the forward pass; False if it uses the sampled
    #: loss's gradients w.r.t. its variables instead.
    needs_capture = False

    def __init__(self, name, variables, layer=None):
        self.name = name
        self.variables = list(variables)
        self.layer = layer
        self.built = False

    # -- lifecycle ----------------------------------------------------------
    def build(self, optimizer):
        """Creates the block's state through `optimizer.add_variable`."""
        raise NotImplementedError

    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        """Folds one estimate into the running factors.

        Args:
            captures: for capture blocks, a list (one entry per call of the
                layer in the forward pass) of `(inputs, preactivation_grads)`
                pairs restricted to the statistics subset of the batch, where
                the gradients are those of the sampled objective (see
                `kfac_keras.losses`); None for other blocks.
            sampled_grads: for non-capture blocks, the gradients of the
                sampled objective (summed, not averaged, over the statistics
                subset) w.r.t. `self.variables`; None otherwise.
            num_examples: float32 scalar, the number of examples in the
                statistics subset.
            decay: scalar EMA weight of the old value (0 on the first
                estimate), or an `EstimateRecorder`, which collects each
                `(variable, estimate)` pair instead of assigning it (so a
                multi-replica step can average the estimates over replicas
                before folding them in; see `kfac_keras.distributed`).
        """
        raise NotImplementedError

    def update_inverses(self, damping):
        """Recomputes the decompositions used by `multiply_damped_inverse`."""
        raise NotImplementedError

    def multiply_damped_inverse(self, grads, damping):
        """Returns the preconditioned gradients, same structure as `grads`."""
        raise NotImplementedError

    # -- introspection ------------------------------------------------------
    def state_variables(self):
        """All optimizer variables holding this block's state."""
        raise NotImplementedError

    def factor_shapes(self):
        """Shapes of the block's curvature factors, for the report."""
        raise NotImplementedError

    def state_bytes(self):
        """Bytes held by the block's state variables."""
        total = 0
        for variable in self.state_variables():
            total += int(np.prod(variable.shape)) * 4
        return total

    def describe(self):
        """One row of the registration report."""
        return {
            "block": self.name,
            "kind": self.kind,
            "layer_class": type(self.layer).__name__ if self.layer is not None else "-",
            "variables": [v.path for v in self.variables],
            "factor_shapes": self.factor_shapes(),
            "bytes": self.state_bytes() if self.built else None,
        }


class EstimateRecorder:
    """Passed as `decay` to `FisherBlock.update_statistics`: collects the
    block's new estimates instead of folding them into its factors.

    Every block folds its statistics with `ema_assign`, which, given a
    recorder, appends `(variable, estimate)` to `pairs` and assigns nothing.
    """

    def __init__(self):
        self.pairs = []

    def record(self, variable, estimate):
        """Keeps `estimate` (a tensor shaped like `variable`) for `variable`."""
        self.pairs.append((variable, estimate))


def ema_assign(variable, new_value, decay):
    """`variable <- decay * variable + (1 - decay) * new_value`.

    With an `EstimateRecorder` as `decay`, records `new_value` instead.
    """
    if isinstance(decay, EstimateRecorder):
        decay.record(variable, new_value)
        return
    variable.assign(decay * variable + (1.0 - decay) * new_value)
