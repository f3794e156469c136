"""Kronecker blocks for `SimpleRNN`, `LSTM` and `GRU` (also inside `Bidirectional`).

Martens, Ba & Johnson 2018 ("Kronecker-factored curvature approximations
for recurrent neural networks"), with the temporal-independence
approximation ("option 0"): the gradients at different time steps are
treated as independent, so a recurrent weight shared over `T` steps is
handled like a Dense layer applied at `T` sequence positions (KFAC_NOTES
section 6, `DenseBlock`):

    A = (1/B) sum_{n,t} abar_{n,t} abar_{n,t}^T
    G = (1/(B T)) sum_{n,t} g_{n,t} g_{n,t}^T

**SimpleRNN and LSTM.** Every gate's pre-activation is
`z_t = x_t W + h_{t-1} U + b` (`4 units` wide for LSTM, gates `i, f, c, o`),
so the weight `[W; U; b]` acts on `abar_t = [x_t, h_{t-1}, 1]` and has one
pre-activation gradient `g_t = dl/dz_t`: one Kronecker block, `A` of size
`input_dim + units + 1`, `G` of size `gates * units`.

**GRU** (`reset_after=True`, the Keras default). The candidate gate reads
`x_t W_h + b_h + r_t * (h_{t-1} U_h + b'_h)`, so the input projection
`p_t = x_t W + b` and the recurrent projection `q_t = h_{t-1} U + b'` (bias
rows 0 and 1) have different gradients: two Kronecker blocks, over
`[x_t, 1]` with `dl/dp_t` and over `[h_{t-1}, 1]` with `dl/dq_t`, kept in one
`GRUBlock`. (`reset_after=False` multiplies `h_{t-1}` by `r_t` before `U_h`,
so columns of `U` see different inputs; it gets the diagonal fallback.)

**Capture.** Keras runs the cell inside a `While` loop, so the per-step
pre-activations are not reachable from outside it. During capture the block
runs the layer itself (`captured_call`): the input projection for all steps
is one tensor computed before the loop (its gradient gives `g_t` for every
`t`), the recurrence runs in `tf.scan`, and the loop returns the states
`h_t`, from which `h_{t-1}` is read. For the GRU's recurrent projection a
zero tensor `e` of the same shape is added inside the loop; `dl/de_t =
dl/dq_t`. The captured forward computes the same function as the layer
(checked by tests to float32 precision) with the cell's own activations;
outside capture the layer's own call runs. Supported: `return_sequences`,
`return_state`, `go_backwards`, `unroll`, `initial_state`, input masks
(`zero_output_for_mask` too; masked steps add nothing to the factors), any
activation. Not supported (diagonal fallback, reason in the registration
report): `stateful=True`, `dropout`/`recurrent_dropout > 0`, subclassed cells.

Memory: `A` is `(input_dim + units + 1)^2`, `G` is `(gates units)^2`, plus
the same again for inverses; the capture keeps `[x_t, h_{t-1}]` for every
step (`B T (input_dim + units)` floats).
"""

import keras
import tensorflow as tf

from kfac_keras import keras_internals
from kfac_keras.blocks.base import FisherBlock, StatisticsSource, layer_name
from kfac_keras.blocks.errors import UnsupportedLayerError
from kfac_keras.blocks.factors import location_factors
from kfac_keras.blocks.kronecker import (KroneckerBlock, join_location_weights, location_rows,
                                         location_weights, split_capture,
                                         static_or_dynamic_sizes)

#: The recurrent layer classes with a Kronecker block, and their cells.
RECURRENT_CELLS = {
    keras.layers.SimpleRNN: keras.layers.SimpleRNNCell,
    keras.layers.LSTM: keras.layers.LSTMCell,
    keras.layers.GRU: keras.layers.GRUCell,
}


def layer_variables(layer):
    """The trainable variables registration assigns to `layer`: for a
    recurrent layer with a block, also those of its cell (which owns them),
    so the layer (whose call the block captures) gets the block."""
    if isinstance(layer, tuple(RECURRENT_CELLS)):
        return list(layer.trainable_variables)
    return keras_internals.own_trainable_variables(layer)


def choice_layer(layer):
    """The layer whose `layer_blocks`/`exclude_layers` entry decides `layer`'s
    block: for a recurrent layer with a block its cell (the cell's entry, then
    the layer's, then its enclosing layers' apply), else `layer` itself."""
    if isinstance(layer, tuple(RECURRENT_CELLS)):
        return layer.cell
    return layer


def recurrent_unsupported_reason(layer):
    """Why `layer` (a SimpleRNN, LSTM or GRU) cannot get a recurrent block,
    or None."""
    cell_class = next(c for l, c in RECURRENT_CELLS.items() if isinstance(layer, l))
    cell = layer.cell
    if type(cell) is not cell_class:
        return (f"its cell is a {type(cell).__name__}, not a plain {cell_class.__name__}, "
                "so its computation is unknown")
    if layer.stateful:
        return ("stateful=True carries states across batches, which the captured "
                "forward pass does not reproduce")
    if cell.dropout > 0 or cell.recurrent_dropout > 0:
        return ("dropout/recurrent_dropout > 0 draw per-gate masks inside the cell, "
                "which the captured forward pass does not reproduce; use Dropout "
                "layers around the recurrent layer instead")
    if isinstance(cell, keras.layers.GRUCell) and not cell.reset_after:
        return ("GRU(reset_after=False) multiplies h_{t-1} by the reset gate before "
                "the recurrent kernel, so its columns see different inputs; use "
                "reset_after=True (the default)")
    if not cell.built:
        return "the layer is not built"
    return None


def make_recurrent_block(layer, inverse_method):
    """The block for a supported SimpleRNN, LSTM or GRU layer."""
    if isinstance(layer, keras.layers.GRU):
        return GRUBlock(layer, inverse_method=inverse_method)
    return RecurrentBlock(layer, inverse_method=inverse_method)


def _call_arguments(args, kwargs):
    """`(sequences, initial_state, mask)` of an `RNN.call`."""
    names = ("sequences", "initial_state", "mask", "training")
    values = dict(zip(names, args))
    values.update(kwargs)
    mask = values.get("mask")
    if isinstance(mask, (list, tuple)):
        mask = mask[0]
    return values["sequences"], values.get("initial_state"), mask


class _Recurrence:
    """The parts of a captured recurrent forward pass shared by all cells:
    direction, initial states, the step mask, and the loop.

    With a mask (from `Masking` or `Embedding(mask_zero=True)`), a masked step
    keeps the previous states and outputs the previous output (zeros with
    `zero_output_for_mask=True`), as Keras's loop does; its captured input
    row, homogeneous coordinate included, is zeroed, so it adds nothing to
    `A` (its pre-activation gradient is zero, so nothing to `G` either; the
    `1/T` of `G` counts all steps). The mask is recorded with the rows, so
    the training step's row weights leave masked steps out of `m_w`, the
    input factor's count (docs/weighted_factors.md).
    """

    def __init__(self, layer, args, kwargs):
        sequences, initial_state, mask = _call_arguments(args, kwargs)
        if layer.go_backwards:
            sequences = tf.reverse(sequences, axis=[1])
        self.layer = layer
        self.sequences = sequences
        self.dtype = sequences.dtype
        self.states = _initial_states(layer, sequences, initial_state)
        self.mask = None
        if mask is not None:
            mask = tf.cast(mask, tf.bool)
            if layer.go_backwards:
                mask = tf.reverse(mask, axis=[1])
            self.mask = mask

    def rows(self, parts, homogeneous):
        """`[parts..., 1]` (without the 1 unless `homogeneous`) per step,
        zeroed at masked steps, without gradient."""
        parts = [tf.cast(p, tf.float32) for p in parts]
        if homogeneous:
            parts.append(tf.ones_like(parts[0][..., :1]))
        rows = tf.concat(parts, axis=-1)
        if self.mask is not None:
            rows = rows * tf.cast(self.mask, tf.float32)[..., None]
        return tf.stop_gradient(rows)

    def run(self, step, elements):
        """Scans `step(states, elements_t) -> new states` over time (`elements`
        batch-major); returns `(outputs (T, B, units), states per step)`, time-major."""
        elements = [tf.transpose(e, [1, 0, 2]) for e in elements]
        has_mask = self.mask is not None
        if has_mask:
            elements.append(tf.transpose(self.mask, [1, 0])[..., None])
        zero_output = getattr(self.layer, "zero_output_for_mask", False)

        def masked_step(carry, elements_t):
            previous_output, previous_states = carry[0], carry[1:]
            new_states = step(previous_states, elements_t[:-1] if has_mask else elements_t)
            if not has_mask:
                return (new_states[0],) + tuple(new_states)
            keep = elements_t[-1]
            fallback = tf.zeros_like(previous_output) if zero_output else previous_output
            output = tf.where(keep, new_states[0], fallback)
            states = tuple(tf.where(keep, new, old)
                           for new, old in zip(new_states, previous_states))
            return (output,) + states

        initial = (tf.zeros_like(self.states[0]),) + tuple(self.states)
        per_step = tf.scan(masked_step, tuple(elements), initializer=initial)
        return per_step[0], per_step[1:]

    def previous_states(self, states):
        """`h_{t-1}` for every step, batch-major, from time-major `h_t`."""
        previous = tf.concat([self.states[0][None], states[0][:-1]], axis=0)
        return tf.transpose(previous, [1, 0, 2])

    def layer_outputs(self, outputs, states):
        """What the layer's call returns."""
        layer = self.layer
        output = tf.transpose(outputs, [1, 0, 2]) if layer.return_sequences else outputs[-1]
        if layer.return_state:
            return [output] + [s[-1] for s in states]
        return output


def _initial_states(layer, sequences, initial_state):
    if initial_state is None:
        return list(layer.cell.get_initial_state(batch_size=tf.shape(sequences)[0]))
    if not isinstance(initial_state, (list, tuple)):
        initial_state = [initial_state]
    return [tf.cast(s, sequences.dtype) for s in initial_state]


class _SequenceKroneckerBlock(KroneckerBlock):
    """A Kronecker block whose captures are `(rows (B, T, input_dim), grads
    (B, T, output_dim))` per use, the rows already carrying the homogeneous
    coordinate when there is a bias (`_Recurrence.rows`); positions are
    handled like `DenseBlock`'s."""

    def compute_factors(self, captures, num_examples):
        split = [split_capture(c) for c in captures]
        inputs = tf.concat([location_rows(x, self.input_dim) for x, _, _ in split], axis=0)
        grads = tf.concat([location_rows(g, self.output_dim) for _, g, _ in split], axis=0)
        weights = self._flat_weights(captures)
        if weights is not None:
            # Uses are concatenated along the row axis here, along the step
            # axis in `per_example_weights`: reorder to match.
            weights = tf.concat([tf.reshape(location_weights(
                w, tf.shape(x)[0], static_or_dynamic_sizes(x, [1])), [-1])
                for x, _, w in split], axis=0)
        return location_factors(inputs, grads, num_examples, weights)

    def per_example_rows(self, captures):
        """`(examples, steps * uses, d)` rows for EKFAC's per-example gradients."""
        split = [split_capture(c) for c in captures]
        inputs = tf.concat([tf.cast(x, tf.float32) for x, _, _ in split], axis=1)
        grads = tf.concat([tf.cast(g, tf.float32) for _, g, _ in split], axis=1)
        return inputs, grads

    def per_example_weights(self, captures):
        """Row weights `(examples, steps * uses)` (per-step weights apply step
        by step; the mask of masked steps is in them), or None."""
        return join_location_weights(captures, [
            (tf.shape(x)[0], static_or_dynamic_sizes(x, [1]))
            for x, _, _ in (split_capture(c) for c in captures)])


class RecurrentBlock(_SequenceKroneckerBlock):
    """One Kronecker block over `[W; U; b]` of a SimpleRNN or LSTM layer.

    Args:
        layer: a built `keras.layers.SimpleRNN` or `keras.layers.LSTM` (the
            recurrent layer, not its cell).
        inverse_method: see `KroneckerBlock`. Defaults to `"cholesky"`.
    """

    kind = "kronecker (recurrent)"

    def __init__(self, layer, inverse_method="cholesky"):
        cell = layer.cell
        has_bias = cell.bias is not None
        variables = [cell.kernel, cell.recurrent_kernel] + ([cell.bias] if has_bias else [])
        self.input_size, gate_units = cell.kernel.shape
        self.units = int(cell.recurrent_kernel.shape[0])
        self.has_bias = has_bias
        super().__init__(layer_name(layer), variables, layer,
                         input_dim=self.input_size + self.units + int(has_bias),
                         output_dim=gate_units, inverse_method=inverse_method)

    def grads_to_matrix(self, grads):
        rows = [grads[0], grads[1]] + ([grads[2][None, :]] if self.has_bias else [])
        return tf.concat(rows, axis=0)

    def matrix_to_grads(self, matrix):
        grads = [matrix[:self.input_size], matrix[self.input_size:self.input_size + self.units]]
        if self.has_bias:
            grads.append(matrix[-1])
        return grads

    def captured_call(self, original_call, recorder, args, kwargs):
        """Runs the layer with its per-step pre-activations exposed and records
        `([x_t, h_{t-1}], z_t - h_{t-1} U)` (the second tensor's gradient is
        `dl/dz_t`); returns what the layer's call returns."""
        del original_call  # the captured forward replaces it
        layer, cell = self.layer, self.layer.cell
        recurrence = _Recurrence(layer, args, kwargs)
        dtype = recurrence.dtype
        projection = tf.einsum("btd,dk->btk", recurrence.sequences, tf.cast(cell.kernel, dtype))
        if self.has_bias:
            projection = projection + tf.cast(cell.bias, dtype)
        recurrent_kernel = tf.cast(cell.recurrent_kernel, dtype)
        is_lstm = isinstance(cell, keras.layers.LSTMCell)

        def step(states, elements_t):
            preactivation = elements_t[0] + tf.matmul(states[0], recurrent_kernel)
            if not is_lstm:
                return (cell.activation(preactivation),)
            gate_i, gate_f, gate_c, gate_o = tf.split(preactivation, 4, axis=-1)
            carry = (cell.recurrent_activation(gate_f) * states[1]
                     + cell.recurrent_activation(gate_i) * cell.activation(gate_c))
            return (cell.recurrent_activation(gate_o) * cell.activation(carry), carry)

        outputs, states = recurrence.run(step, [projection])
        previous = recurrence.previous_states(states)
        recorder.record(layer, recurrence.rows([recurrence.sequences, previous], self.has_bias),
                        projection, recurrence.mask)
        result = recurrence.layer_outputs(outputs, states)
        return result


class _ProjectionPart(_SequenceKroneckerBlock):
    """One projection of a GRU (`[W; b]` or `[U; b']`); its gradients are
    already the `(rows, columns)` matrix."""

    def grads_to_matrix(self, grads):
        return grads[0]

    def matrix_to_grads(self, matrix):
        return [matrix]


class GRUBlock(FisherBlock):
    """Two Kronecker blocks of a GRU (`reset_after=True`): the input
    projection `[W; b_input]` over `[x_t, 1]` and the recurrent projection
    `[U; b_recurrent]` over `[h_{t-1}, 1]`.

    Captures alternate per call: `(x, dl/dp)`, then `(h_{t-1}, dl/dq)`.

    Args:
        layer: a built `keras.layers.GRU` with `reset_after=True`.
        inverse_method: see `KroneckerBlock`. Defaults to `"cholesky"`.
    """

    kind = "kronecker (gru)"
    statistics_source = StatisticsSource.CAPTURES

    def __init__(self, layer, inverse_method="cholesky"):
        cell = layer.cell
        if not cell.reset_after:
            raise UnsupportedLayerError(
                "GRUBlock needs reset_after=True")  # guarded by the reason function
        self.has_bias = cell.bias is not None
        variables = [cell.kernel, cell.recurrent_kernel] + ([cell.bias] if self.has_bias else [])
        name = layer_name(layer)
        super().__init__(name, variables, layer)
        input_size, gate_units = cell.kernel.shape
        units = int(cell.recurrent_kernel.shape[0])
        self.inverse_method = inverse_method
        self.input_projection = _ProjectionPart(
            f"{name}/input_projection", [cell.kernel], layer,
            input_dim=input_size + int(self.has_bias), output_dim=gate_units,
            inverse_method=inverse_method)
        self.recurrent_projection = _ProjectionPart(
            f"{name}/recurrent_projection", [cell.recurrent_kernel], layer,
            input_dim=units + int(self.has_bias), output_dim=gate_units,
            inverse_method=inverse_method)
        self.parts = (self.input_projection, self.recurrent_projection)

    def _part_matrices(self, grads):
        if not self.has_bias:
            return [grads[0], grads[1]]
        return [tf.concat([grads[0], grads[2][:1]], axis=0),
                tf.concat([grads[1], grads[2][1:]], axis=0)]

    def _part_grads(self, input_matrix, recurrent_matrix):
        """Inverse of `_part_matrices`."""
        if not self.has_bias:
            return [input_matrix, recurrent_matrix]
        bias = tf.concat([input_matrix[-1:], recurrent_matrix[-1:]], axis=0)
        return [input_matrix[:-1], recurrent_matrix[:-1], bias]

    def kronecker_matrices(self, grads):
        """Two pairs: `[W; b_input]` and `[U; b_recurrent]`."""
        return self._part_matrices(grads)

    def grads_from_kronecker_matrices(self, matrices):
        """Inverse of `kronecker_matrices`."""
        return self._part_grads(*matrices)

    def build(self, optimizer):
        for part in self.parts:
            part.build(optimizer)
        self.built = True

    def state_variables(self):
        return [v for part in self.parts for v in part.state_variables()]

    def factor_shapes(self):
        return {f"{label}/{key}": shape
                for label, part in (("input", self.input_projection),
                                    ("recurrent", self.recurrent_projection))
                for key, shape in part.factor_shapes().items()}

    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        self.input_projection.update_statistics(captures[0::2], None, num_examples, decay)
        self.recurrent_projection.update_statistics(captures[1::2], None, num_examples, decay)

    @property
    def uses_eigenbasis_scalings(self):
        return self.inverse_method == "ekfac"

    def update_scalings(self, captures, num_examples, factor_decay):
        """EKFAC: see `KroneckerBlock.update_scalings`, for each projection."""
        self.input_projection.update_scalings(captures[0::2], num_examples, factor_decay)
        self.recurrent_projection.update_scalings(captures[1::2], num_examples, factor_decay)

    def set_damping_mode(self, mode):
        """Each part is damped relative to its own curvature (see
        `FisherBlock.set_damping_mode`)."""
        super().set_damping_mode(mode)
        for part in self.parts:
            part.set_damping_mode(mode)

    def update_inverses(self, damping):
        for part in self.parts:
            part.update_inverses(damping)

    def multiply_damped_inverse(self, grads, damping):
        input_matrix, recurrent_matrix = [
            part.multiply_damped_inverse([m], damping)[0]
            for part, m in zip(self.parts, self._part_matrices(grads))]
        return self._part_grads(input_matrix, recurrent_matrix)

    def captured_call(self, original_call, recorder, args, kwargs):
        """Runs the GRU with both projections exposed; records `(x, p)` and
        `(h_{t-1}, e)`; returns what the layer's call returns."""
        del original_call  # the captured forward replaces it
        layer, cell = self.layer, self.layer.cell
        recurrence = _Recurrence(layer, args, kwargs)
        dtype = recurrence.dtype
        projection = tf.einsum("btd,dk->btk", recurrence.sequences, tf.cast(cell.kernel, dtype))
        recurrent_bias = None
        if self.has_bias:
            bias = tf.cast(cell.bias, dtype)
            projection = projection + bias[0]
            recurrent_bias = bias[1]
        # A zero tensor on the gradient path (so the tape differentiates it):
        # its gradient is dl/dq_t for every step.
        recurrent_slot = 0.0 * projection
        recurrent_kernel = tf.cast(cell.recurrent_kernel, dtype)

        def step(states, elements_t):
            projection_t, slot_t = elements_t
            recurrent = tf.matmul(states[0], recurrent_kernel) + slot_t
            if recurrent_bias is not None:
                recurrent = recurrent + recurrent_bias
            x_z, x_r, x_h = tf.split(projection_t, 3, axis=-1)
            r_z, r_r, r_h = tf.split(recurrent, 3, axis=-1)
            update = cell.recurrent_activation(x_z + r_z)
            reset = cell.recurrent_activation(x_r + r_r)
            candidate = cell.activation(x_h + reset * r_h)
            return (update * states[0] + (1.0 - update) * candidate,)

        outputs, states = recurrence.run(step, [projection, recurrent_slot])
        previous = recurrence.previous_states(states)
        recorder.record(layer, recurrence.rows([recurrence.sequences], self.has_bias), projection,
                        recurrence.mask)
        recorder.record(layer, recurrence.rows([previous], self.has_bias), recurrent_slot,
                        recurrence.mask)
        result = recurrence.layer_outputs(outputs, states)
        return result
