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
`return_state`, `go_backwards`, `unroll`, `initial_state`, any activation.
Not supported (diagonal fallback, reason in the registration report):
`stateful=True`, `dropout`/`recurrent_dropout > 0`, subclassed cells;
an input mask raises an error at the first captured call.

Memory: `A` is `(input_dim + units + 1)^2`, `G` is `(gates units)^2`, plus
the same again for inverses; the capture keeps `[x_t, h_{t-1}]` for every
step (`B T (input_dim + units)` floats).
"""

import keras
import tensorflow as tf

from kfac_keras.blocks.base import FisherBlock
from kfac_keras.blocks.errors import UnsupportedLayerError
from kfac_keras.blocks.kronecker import KroneckerBlock, append_homogeneous, location_rows

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
    return list(layer._trainable_variables)


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


def _call_arguments(layer, args, kwargs):
    """`(sequences, initial_state, mask)` of an `RNN.call`; raises on a mask."""
    names = ("sequences", "initial_state", "mask", "training")
    values = dict(zip(names, args))
    values.update(kwargs)
    if values.get("mask") is not None:
        raise ValueError(
            f"K-FAC's recurrent block for layer {layer.name!r} does not support "
            "input masks (from Masking or Embedding(mask_zero=True)); pass "
            f"KFAC(layer_blocks={{{layer.name!r}: 'diagonal'}}) or remove the mask.")
    return values["sequences"], values.get("initial_state")


def _initial_states(layer, sequences, initial_state):
    if initial_state is None:
        return list(layer.cell.get_initial_state(batch_size=tf.shape(sequences)[0]))
    if not isinstance(initial_state, (list, tuple)):
        initial_state = [initial_state]
    return [tf.cast(s, sequences.dtype) for s in initial_state]


def _previous_states(initial, states):
    """`h_{t-1}` for every step `(B, T, units)` from `h_0` and time-major `h_t`."""
    previous = tf.concat([initial[None], states[:-1]], axis=0)
    return tf.transpose(previous, [1, 0, 2])


def _layer_outputs(layer, states_time_major):
    """The layer's return value from the time-major per-step states."""
    sequence = tf.transpose(states_time_major[0], [1, 0, 2])
    output = sequence if layer.return_sequences else states_time_major[0][-1]
    if layer.return_state:
        return [output] + [s[-1] for s in states_time_major]
    return output


class _SequenceKroneckerBlock(KroneckerBlock):
    """A Kronecker block whose captures are `(inputs (B, T, d), grads (B, T, k))`
    per use, with positions handled like `DenseBlock`'s."""

    def __init__(self, name, variables, layer, input_units, output_dim, has_bias,
                 inverse_method):
        self.has_bias = has_bias
        self.input_units = int(input_units)
        super().__init__(name, variables, layer,
                         input_dim=self.input_units + (1 if has_bias else 0),
                         output_dim=output_dim, inverse_method=inverse_method)

    def compute_factors(self, captures, num_examples):
        inputs = tf.concat([location_rows(x, self.input_units) for x, _ in captures], axis=0)
        grads = tf.concat([location_rows(g, self.output_dim) for _, g in captures], axis=0)
        if self.has_bias:
            inputs = append_homogeneous(inputs)
        locations = tf.cast(tf.shape(grads)[0], tf.float32) / num_examples
        input_factor = tf.matmul(inputs, inputs, transpose_a=True) / num_examples
        output_grad_factor = tf.matmul(grads, grads, transpose_a=True) / (
            num_examples * locations)
        return input_factor, output_grad_factor

    def per_example_rows(self, captures):
        """`(examples, steps * uses, d)` rows for EKFAC's per-example gradients."""
        inputs = tf.concat([tf.cast(x, tf.float32) for x, _ in captures], axis=1)
        grads = tf.concat([tf.cast(g, tf.float32) for _, g in captures], axis=1)
        if self.has_bias:
            inputs = tf.concat([inputs, tf.ones_like(inputs[..., :1])], axis=-1)
        return inputs, grads


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
        super().__init__(getattr(layer, "path", layer.name), variables, layer,
                         input_units=self.input_size + self.units,
                         output_dim=gate_units, has_bias=has_bias,
                         inverse_method=inverse_method)
        self.capture_layers = [layer]

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
        sequences, initial_state = _call_arguments(layer, args, kwargs)
        if layer.go_backwards:
            sequences = tf.reverse(sequences, axis=[1])
        dtype = sequences.dtype
        states = _initial_states(layer, sequences, initial_state)
        projection = tf.einsum("btd,dk->btk", sequences, tf.cast(cell.kernel, dtype))
        if self.has_bias:
            projection = projection + tf.cast(cell.bias, dtype)
        recurrent_kernel = tf.cast(cell.recurrent_kernel, dtype)
        is_lstm = isinstance(cell, keras.layers.LSTMCell)

        def step(carry, projection_t):
            preactivation = projection_t + tf.matmul(carry[0], recurrent_kernel)
            if not is_lstm:
                return (cell.activation(preactivation),)
            gate_i, gate_f, gate_c, gate_o = tf.split(preactivation, 4, axis=-1)
            carry_state = (cell.recurrent_activation(gate_f) * carry[1]
                           + cell.recurrent_activation(gate_i) * cell.activation(gate_c))
            return (cell.recurrent_activation(gate_o) * cell.activation(carry_state),
                    carry_state)

        per_step = tf.scan(step, tf.transpose(projection, [1, 0, 2]),
                           initializer=tuple(states))
        previous = _previous_states(states[0], per_step[0])
        recorder.record(layer, tf.stop_gradient(tf.concat([sequences, previous], axis=-1)),
                        projection)
        outputs = _layer_outputs(layer, per_step)
        recorder.record_output(layer, outputs)
        return outputs


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
    needs_capture = True

    def __init__(self, layer, inverse_method="cholesky"):
        cell = layer.cell
        if not cell.reset_after:
            raise UnsupportedLayerError(
                "GRUBlock needs reset_after=True")  # guarded by the reason function
        self.has_bias = cell.bias is not None
        variables = [cell.kernel, cell.recurrent_kernel] + ([cell.bias] if self.has_bias else [])
        name = getattr(layer, "path", layer.name)
        super().__init__(name, variables, layer)
        input_size, gate_units = cell.kernel.shape
        units = int(cell.recurrent_kernel.shape[0])
        self.inverse_method = inverse_method
        self.input_projection = _ProjectionPart(
            f"{name}/input_projection", [cell.kernel], layer, input_size, gate_units,
            self.has_bias, inverse_method)
        self.recurrent_projection = _ProjectionPart(
            f"{name}/recurrent_projection", [cell.recurrent_kernel], layer, units,
            gate_units, self.has_bias, inverse_method)
        self.parts = (self.input_projection, self.recurrent_projection)
        self.capture_layers = [layer]

    def _part_matrices(self, grads):
        if not self.has_bias:
            return [grads[0], grads[1]]
        return [tf.concat([grads[0], grads[2][:1]], axis=0),
                tf.concat([grads[1], grads[2][1:]], axis=0)]

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

    def update_scalings(self, captures, num_examples, factor_decay):
        """EKFAC: see `KroneckerBlock.update_scalings`, for each projection."""
        self.input_projection.update_scalings(captures[0::2], num_examples, factor_decay)
        self.recurrent_projection.update_scalings(captures[1::2], num_examples, factor_decay)

    def update_inverses(self, damping):
        for part in self.parts:
            part.update_inverses(damping)

    def multiply_damped_inverse(self, grads, damping):
        input_matrix, recurrent_matrix = [
            part.multiply_damped_inverse([m], damping)[0]
            for part, m in zip(self.parts, self._part_matrices(grads))]
        if not self.has_bias:
            return [input_matrix, recurrent_matrix]
        bias = tf.concat([input_matrix[-1:], recurrent_matrix[-1:]], axis=0)
        return [input_matrix[:-1], recurrent_matrix[:-1], bias]

    def captured_call(self, original_call, recorder, args, kwargs):
        """Runs the GRU with both projections exposed; records `(x, p)` and
        `(h_{t-1}, e)`; returns what the layer's call returns."""
        del original_call  # the captured forward replaces it
        layer, cell = self.layer, self.layer.cell
        sequences, initial_state = _call_arguments(layer, args, kwargs)
        if layer.go_backwards:
            sequences = tf.reverse(sequences, axis=[1])
        dtype = sequences.dtype
        states = _initial_states(layer, sequences, initial_state)
        projection = tf.einsum("btd,dk->btk", sequences, tf.cast(cell.kernel, dtype))
        recurrent_bias = None
        if self.has_bias:
            bias = tf.cast(cell.bias, dtype)
            projection = projection + bias[0]
            recurrent_bias = bias[1]
        # A zero tensor on the gradient path (so the tape differentiates it):
        # its gradient is dl/dq_t for every step.
        recurrent_slot = 0.0 * projection
        recurrent_kernel = tf.cast(cell.recurrent_kernel, dtype)

        def step(carry, inputs_t):
            projection_t, slot_t = inputs_t
            recurrent = tf.matmul(carry[0], recurrent_kernel) + slot_t
            if recurrent_bias is not None:
                recurrent = recurrent + recurrent_bias
            x_z, x_r, x_h = tf.split(projection_t, 3, axis=-1)
            r_z, r_r, r_h = tf.split(recurrent, 3, axis=-1)
            update = cell.recurrent_activation(x_z + r_z)
            reset = cell.recurrent_activation(x_r + r_r)
            candidate = cell.activation(x_h + reset * r_h)
            return (update * carry[0] + (1.0 - update) * candidate,)

        per_step = tf.scan(
            step, (tf.transpose(projection, [1, 0, 2]), tf.transpose(recurrent_slot, [1, 0, 2])),
            initializer=tuple(states))
        previous = _previous_states(states[0], per_step[0])
        recorder.record(layer, tf.stop_gradient(sequences), projection)
        recorder.record(layer, tf.stop_gradient(previous), recurrent_slot)
        outputs = _layer_outputs(layer, per_step)
        recorder.record_output(layer, outputs)
        return outputs
