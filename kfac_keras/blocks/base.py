"""The contract every Fisher block implements.

A block covers some of a model's trainable variables and approximates the
Fisher restricted to them. The curvature pipeline calls, in order:

1. `build(optimizer)` once: create the block's state (factors, inverses) as
   optimizer variables, so checkpoints and `model.save` include them.
2. `update_statistics(captures, sampled_grads, num_examples, decay)` every
   `T_cov` steps: fold a new estimate into the factors with an exponential
   moving average.
3. `update_inverses(damping)` every `T_inv` steps: decompose the factors.
4. `update_scalings(captures, num_examples, factor_decay)`, only for blocks
   whose `uses_eigenbasis_scalings` is True (EKFAC), every
   `scale_update_every` steps, after the decomposition when both are due.
5. `multiply_damped_inverse(grads, damping)` every step: return
   `(F_block + damping I)^{-1} grads` (in the block's approximation).

`damping` is always the total `lambda + eta` (damping plus the L2
coefficient), so blocks never need to know where it came from.

Every capability the rest of the package relies on is declared here with a
default (class attributes and overridable methods), so callers never probe a
block with `getattr`/`hasattr`:

* `statistics_source`: where the statistics come from (`StatisticsSource`).
* `capture_mode`, `capture_tangent_variable`, `capture_layers()`,
  `captured_call(...)`, `verify_captures(recorder)`: what the capture wrapper
  records for the block (see `kfac_keras.capture`).
* `accepts_indexed_slices`: `multiply_damped_inverse` takes and returns
  `tf.IndexedSlices` (sparse rows) for its single variable.
* `uses_eigenbasis_scalings`: the block runs `update_scalings` (EKFAC).
* `kronecker_matrices(grads)` / `grads_from_kronecker_matrices(matrices)`:
  the gradients as one matrix per Kronecker pair and back, or None for a
  block without Kronecker pairs (`step_rule="orthogonal"`,
  `kfac_keras.orthogonal_step`).
* `lookup_table`: the block's variable is a table whose rows only the
  looked-up ids touch (Embedding); `step_rule="orthogonal"` steps it with the
  KL-clipped rule at its own rate instead of orthogonalising it.
* `registration_note`: why registration chose this block (report column).
"""

import abc
import enum

import numpy as np
import tensorflow as tf


class StatisticsSource(enum.Enum):
    """Where a block's curvature statistics come from."""

    #: Layer inputs and pre-activation (or output) gradients recorded in the
    #: forward pass by the capture wrappers.
    CAPTURES = "captures"
    #: Gradients of the sampled objective w.r.t. the block's variables.
    SAMPLED_GRADIENTS = "sampled_gradients"
    #: No statistics (the plain gradient).
    NONE = "none"


#: Lower bound of a block's curvature scale under relative damping (a block
#: whose statistics are all zero still gets a positive damping).
RELATIVE_SCALE_FLOOR = 1e-30


def layer_name(layer):
    """The name blocks and reports use for `layer`: its path, else its name."""
    return getattr(layer, "path", None) or layer.name


def trainable_bias(layer):
    """The layer's `bias` variable if it exists and is trainable, else None."""
    bias = getattr(layer, "bias", None)
    return bias if bias is not None and bias.trainable else None


def keras_variant_reason(layer, layers_label):
    """Why a LoRA-enabled or quantized Keras layer gets no Kronecker block.

    Args:
        layer: a Keras layer.
        layers_label: plural label for the message, e.g. `"Dense layers"`.

    Returns:
        The reason as a string, or None when the layer is a plain one.
    """
    if getattr(layer, "lora_enabled", False):
        return f"LoRA-enabled {layers_label} are not Kronecker-factored"
    if getattr(layer, "quantization_mode", None):
        return f"quantized {layers_label} are not Kronecker-factored"
    return None


class FisherBlock(abc.ABC):
    """Abstract base class of Fisher blocks.

    Args:
        name: a readable name (usually the layer's path).
        variables: the model variables this block covers, in a fixed order;
            `multiply_damped_inverse` takes and returns gradients in this order.
        layer: the Keras layer the block belongs to, or None. Defaults to None.
    """

    #: Short label shown in the registration report (not a type tag).
    kind = "base"
    #: True for a lookup table (Embedding): see the module docstring.
    lookup_table = False
    #: Where `update_statistics` gets its inputs from.
    statistics_source = StatisticsSource.SAMPLED_GRADIENTS
    #: What the capture wrapper records, one of `kfac_keras.capture.CAPTURE_MODES`.
    capture_mode = "preactivation"
    #: Variable whose forward-mode tangent an `"output_tangent"` capture
    #: records (normalization layers' scale), or None.
    capture_tangent_variable = None
    #: `multiply_damped_inverse` accepts and returns `tf.IndexedSlices`.
    accepts_indexed_slices = False
    #: Why registration chose this block; shown in the report.
    registration_note = ""

    def __init__(self, name, variables, layer=None):
        self.name = name
        self.variables = list(variables)
        self.layer = layer
        self.built = False

    # -- capture ------------------------------------------------------------
    @property
    def needs_capture(self):
        """True if the block reads captured activations."""
        return self.statistics_source is StatisticsSource.CAPTURES

    def capture_layers(self):
        """The layers whose calls the block reads, in the order its
        `update_statistics` expects their records."""
        return [self.layer]

    def captured_call(self, original_call, recorder, args, kwargs):
        """Optional hook: run the layer's forward pass during capture.

        A block whose statistics live inside the layer's computation (e.g. the
        per-time-step pre-activations of a recurrent layer) overrides this,
        records what it needs with `recorder.record(layer, inputs, tensor)`
        and returns the layer's output.

        Args:
            original_call: the layer's own `call`.
            recorder: the active `kfac_keras.capture.Recorder`.
            args: positional arguments of the call.
            kwargs: keyword arguments of the call.

        Returns:
            The layer output, or None (the default) to record according to
            `capture_mode`.
        """
        del original_call, recorder, args, kwargs
        return None

    def verify_captures(self, recorder):
        """Checks, at trace time, that a forward pass's records fit the block.

        The default accepts every pass; multi-layer blocks (Dense chains)
        raise a RuntimeError when the pass no longer has their structure.

        Args:
            recorder: the capture recorder of the current forward pass.
        """
        del recorder

    # -- lifecycle ----------------------------------------------------------
    @abc.abstractmethod
    def build(self, optimizer):
        """Creates the block's state through `optimizer.add_variable`."""

    @abc.abstractmethod
    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        """Folds one estimate into the running factors.

        Args:
            captures: for capture blocks, a list (one entry per call of the
                layer in the forward pass) of `(inputs, preactivation_grads)`
                pairs or `(inputs, preactivation_grads, row_weight)` triples
                restricted to the statistics subset of the batch, where the
                gradients are those of the sampled objective (see
                `kfac_keras.losses`) and `row_weight` is a float32 `(m,)` or
                `(m, T)` tensor of row weights (sample weights times Keras
                masks), or None (every row weighs 1; see `split_capture` and
                docs/weighted_factors.md); None for other blocks.
            sampled_grads: for `SAMPLED_GRADIENTS` blocks, the gradients of the
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

    # -- damping -------------------------------------------------------------
    #: `"absolute"`: the block is damped with the optimizer's damping as is;
    #: `"relative"`: with it times `curvature_scale()` (`KFAC(damping_mode=)`).
    damping_mode = "absolute"

    def set_damping_mode(self, mode):
        """Sets `damping_mode` (composite blocks pass it on to their parts).

        Args:
            mode: `"absolute"` or `"relative"`.
        """
        self.damping_mode = mode

    def curvature_scale(self):
        """The block's curvature in loss units, a float32 tensor (one value, or
        one per group): relative damping multiplies the damping by it.

        The default, 1, is for blocks that take no damping (identity)."""
        return tf.constant(1.0)

    def block_damping(self, damping):
        """The damping this block uses: `damping` in the absolute mode,
        `damping * max(curvature_scale(), RELATIVE_SCALE_FLOOR)` in the relative
        mode (the floor keeps an all-zero block invertible)."""
        if self.damping_mode == "absolute":
            return damping
        return tf.cast(damping, tf.float32) * tf.maximum(
            tf.cast(self.curvature_scale(), tf.float32), RELATIVE_SCALE_FLOOR)

    @abc.abstractmethod
    def update_inverses(self, damping):
        """Recomputes the decompositions used by `multiply_damped_inverse`."""

    @abc.abstractmethod
    def multiply_damped_inverse(self, grads, damping):
        """Returns the preconditioned gradients, same structure as `grads`."""

    @property
    def uses_eigenbasis_scalings(self):
        """True if the block re-estimates an eigenbasis diagonal (EKFAC)."""
        return False

    def update_scalings(self, captures, num_examples, factor_decay):
        """EKFAC: folds one estimate of the eigenbasis diagonal (see
        `kfac_keras.blocks.kronecker`), or records it when `factor_decay` is
        an `EstimateRecorder`. Blocks without scalings raise."""
        del captures, num_examples, factor_decay
        raise ValueError(f"Block {self.name!r} ({self.kind}) has no eigenbasis scalings.")

    # -- step rules ---------------------------------------------------------
    def kronecker_matrices(self, grads):
        """The block's gradients as its Kronecker matrices.

        One matrix per Kronecker pair `A (x) G` of the block, in the pair's
        layout `(..., input_dim, output_dim)` (bias row included, a leading
        group axis for grouped pairs). `step_rule="orthogonal"` replaces each
        by its scaled polar factor (`kfac_keras.orthogonal_step`).

        Args:
            grads: dense tensors aligned with `self.variables`.

        Returns:
            A list of tensors, or None (the default) for a block without
            Kronecker pairs, whose variables then take the KL-clipped step.
        """
        del grads
        return None

    def grads_from_kronecker_matrices(self, matrices):
        """Inverse of `kronecker_matrices`: tensors aligned with `self.variables`.

        Args:
            matrices: a list shaped like what `kronecker_matrices` returns.

        Raises:
            ValueError: for a block whose `kronecker_matrices` is None.
        """
        del matrices
        raise ValueError(f"Block {self.name!r} ({self.kind}) has no Kronecker matrices.")

    # -- introspection ------------------------------------------------------
    @abc.abstractmethod
    def state_variables(self):
        """All optimizer variables holding this block's state."""

    @abc.abstractmethod
    def factor_shapes(self):
        """Shapes of the block's curvature factors, for the report."""

    def state_bytes(self):
        """Bytes held by the block's state variables."""
        return sum(int(np.prod(variable.shape)) * 4 for variable in self.state_variables())

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


def split_capture(capture):
    """`(inputs, grads, row_weight)` of a capture pair or triple (a pair's
    row weight is None: every row weighs 1)."""
    if len(capture) == 2:
        return capture[0], capture[1], None
    inputs, grads, row_weight = capture
    return inputs, grads, row_weight


class EstimateRecorder:
    """Passed as `decay` to `FisherBlock.update_statistics` (or as
    `factor_decay` to `update_scalings`): collects the block's new estimates
    instead of folding them in.

    Every block folds its statistics with `ema_assign`, which, given a
    recorder, appends `(variable, estimate)` to `pairs` and the estimate's
    count to `counts` (the weighted number of examples it is a mean over, or
    None for the statistics subset's size), and assigns nothing. A
    multi-replica step averages each estimate over replicas with these counts
    as weights. EKFAC's Kronecker blocks append `(block, estimate)` to
    `scalings`, for their `fold_scalings`.
    """

    def __init__(self):
        self.pairs = []
        self.scalings = []
        self.counts = []

    def record(self, variable, estimate, count=None):
        """Keeps `estimate` (a tensor shaped like `variable`) for `variable`
        and its count (a float32 scalar, or None)."""
        self.pairs.append((variable, estimate))
        self.counts.append(count)

    def record_scalings(self, block, estimate):
        """Keeps EKFAC's `estimate` of `block`'s corrected diagonal."""
        self.scalings.append((block, estimate))


def ema_assign(variable, new_value, decay, count=None):
    """`variable <- decay * variable + (1 - decay) * new_value`.

    With an `EstimateRecorder` as `decay`, records `new_value` (and `count`,
    the weighted number of examples `new_value` averages, or None for the
    statistics subset's size) instead.
    """
    if isinstance(decay, EstimateRecorder):
        decay.record(variable, new_value, count)
        return
    if count is not None:  # an estimate over no weight is no estimate: keep the factor
        decay = tf.where(tf.convert_to_tensor(count) > 0, decay, 1.0)
    variable.assign(decay * variable + (1.0 - decay) * new_value)
