"""Capture of layer activations in the forward pass.

Registration wraps the `call` of every layer whose block reads captured
activations. The wrapper is inert (it calls the original `call`) except while
a `Recorder` is attached (`Registration.capture()`), where it records, per
call of the layer, a pair `(inputs, tensor)`: the second element is the
tensor the sampled objective is differentiated against. What is recorded is
the block's `capture_mode` (`CAPTURE_MODES`), unless the block runs the
layer's forward pass itself (`FisherBlock.captured_call`, e.g. recurrent
layers whose pre-activations live inside a loop).

This module imports nothing from the rest of the package: blocks declare
their capture needs (`kfac_keras.blocks.base.FisherBlock`), registration
installs the wrappers, and chain detection (`kfac_keras.chains`) reuses them.

Keras masks: next to each record the recorder keeps the mask of the rows it
covers (`Recorder.masks_for`): the mask passed to the layer's call, else the
one Keras attached to its inputs (`Masking`, `Embedding(mask_zero=True)` and
every layer that propagates them), and for `"output"` captures the mask the
layer computes itself (an Embedding's padding ids). The training step turns
masks and sample weights into the row weights of the factors
(`row_weights`, `docs/weighted_factors.md`).
"""

import keras
import tensorflow as tf

from kfac_keras import keras_internals

#: What `KFAC.apply`/`apply_gradients` raise outside a K-FAC training step.
MISSING_CAPTURE = (
    "KFAC was applied outside a K-FAC training step: it needs the layer inputs "
    "and pre-activation gradients of each step, which Keras's default train "
    "step, a later `fit` without the callback and a plain "
    "`optimizer.apply_gradients(...)` do not provide (the curvature would stay "
    "frozen). Add the K-FAC callback to fit:\n\n"
    "    model.fit(x, y, ..., callbacks=[kfac_keras.KFACCallback()])\n\n"
    "(a model with its own `train_step` keeps it: the callback runs it with "
    "K-FAC capture on), or, in a custom training loop, build the step with "
    "`step = kfac_keras.make_train_step(model, optimizer, loss)` and call "
    "`step(x, y)` instead of `optimizer.apply_gradients(...)`."
)

#: What a capture wrapper records (a block's `capture_mode`):
#: * "preactivation": `(inputs, s)` with the layer's activation switched off.
#: * "output": `(inputs, output)`, the layer run unchanged (e.g. Embedding:
#:   token ids and looked-up vectors).
#: * "output_tangent": `(d output / d v, output)`, the forward-mode derivative
#:   of the output w.r.t. the block's `capture_tangent_variable` `v` in the
#:   direction of ones (normalization layers: `x_hat`); `(output, output)`
#:   when the block has no such variable.
CAPTURE_MODES = ("preactivation", "output", "output_tangent")


class Recorder:
    """Collects `(inputs, tensor)` pairs and outputs during one forward pass."""

    def __init__(self):
        self.records = {}
        self.masks = {}
        self.outputs = {}
        # Forward accumulators of "output_tangent" captures. In eager mode a
        # gradient tape loses the ops run under an accumulator once the
        # accumulator is garbage-collected, so they live as long as the
        # recorder (i.e. through the training step's backward passes).
        self.forward_accumulators = []

    def watch(self, layer, tensor):
        """The tensor the layer passes on in place of `tensor`, the one its
        record differentiates against; a recorder that also collects incoming
        gradients (`kfac_keras.custom_step`) wraps it here."""
        return tensor

    def record(self, layer, inputs, tensor, mask=None):
        """Records one call of `layer`: its inputs, the differentiated tensor
        and the Keras mask of the inputs' rows (None: every row is valid)."""
        self.records.setdefault(id(layer), []).append((inputs, tensor))
        self.masks.setdefault(id(layer), []).append(mask)

    def masks_for(self, layer):
        """The masks of `layer`'s records in this pass, one per call."""
        return self.masks.get(id(layer), [])

    def record_output(self, layer, output):
        """Records the tensor `layer` returned (chain detection and checks)."""
        self.outputs.setdefault(id(layer), []).append(output)

    def outputs_for(self, layer):
        """The tensors `layer` returned in this pass, one per call."""
        return self.outputs.get(id(layer), [])

    def uses_of(self, layer):
        """The records of `layer` in this pass (possibly none)."""
        return self.records.get(id(layer), [])

    def for_layer(self, layer):
        """The records of `layer`; raises if the layer was not called."""
        records = self.records.get(id(layer))
        if not records:
            raise RuntimeError(
                f"K-FAC registered layer {layer.name!r} but it was not called in "
                "the forward pass; a model whose layers are used conditionally "
                "needs those layers excluded (exclude_layers=[...])."
            )
        return records


def input_mask(inputs, kwargs):
    """The Keras mask of a layer call's inputs: the `mask` argument, else
    the mask Keras attached to the input tensor, else None."""
    mask = kwargs.get("mask")
    if isinstance(mask, (list, tuple)):
        mask = mask[0] if mask else None
    if mask is None:
        mask = getattr(inputs, "_keras_mask", None)
    return mask


def row_weights(sample_weight, mask):
    """The row weights of one capture: sample weights times the rows' mask.

    Args:
        sample_weight: float32 `(batch,)` or `(batch, T)` weights, or None.
        mask: the rows' Keras mask, `(batch, T)` (or `(batch,)`) bool, or None.

    Returns:
        A float32 `(batch,)` or `(batch, T)` tensor, or None when both are
        None (every row weighs 1).
    """
    if mask is None:
        return sample_weight
    mask = tf.cast(mask, tf.float32)
    if mask.shape.rank is not None and mask.shape.rank > 2:
        mask = tf.reshape(mask, [tf.shape(mask)[0], -1])
    if sample_weight is None:
        return mask
    if sample_weight.shape.rank == 1 and mask.shape.rank == 2:
        return sample_weight[:, None] * mask
    if sample_weight.shape.rank == 2 and mask.shape.rank == 1:
        return sample_weight * mask[:, None]
    if (sample_weight.shape.rank == 2 and sample_weight.shape[1] is not None
            and mask.shape[1] is not None and sample_weight.shape[1] != mask.shape[1]):
        # The weights' positions are not these rows' (e.g. a downsampling
        # layer): weigh each example by its mean position weight.
        return tf.reduce_mean(sample_weight, axis=1, keepdims=True) * mask
    return sample_weight * mask


def _backend_variable(variable):
    """The `tf.Variable` behind a Keras variable (what the layer reads)."""
    inner = getattr(variable, "_value", None)
    if isinstance(inner, tf.Variable):
        return inner
    if isinstance(variable, tf.Variable):
        return variable
    raise TypeError(f"Cannot find the TensorFlow variable behind {variable!r}.")


class CaptureWrapper:
    """Replaces a layer's `call`; records only while a recorder is attached.

    Args:
        layer: the Keras layer whose `call` it replaces.
    """

    def __init__(self, layer):
        self.layer = layer
        self.original_call = layer.call
        self.recorder = None
        self.block = None
        self.mode = "preactivation"
        self.tangent_variable = None
        #: The rows' mask set by an enclosing layer that strips its inputs'
        #: masks before calling this one (`AttentionMaskScope`), or None.
        self.mask_override = None

    def configure(self, block):
        """Records what `block` declares (`capture_mode`, tangent variable,
        `captured_call`)."""
        if block.capture_mode not in CAPTURE_MODES:
            raise ValueError(f"capture mode must be one of {CAPTURE_MODES}; "
                             f"received {block.capture_mode!r} from {block.name!r}.")
        self.block = block
        self.mode = block.capture_mode
        variable = block.capture_tangent_variable
        self.tangent_variable = None if variable is None else _backend_variable(variable)

    def _record_output(self, recorder, inputs, args, kwargs):
        layer = self.layer
        if self.mode == "output" or self.tangent_variable is None:
            output = recorder.watch(layer, self.original_call(*args, **kwargs))
            mask = None
            if self.mode == "output":  # e.g. an Embedding's padding ids
                mask = layer.compute_mask(inputs, input_mask(inputs, kwargs))
            recorder.record(layer, output if self.mode == "output_tangent" else inputs,
                            output, mask)
        else:
            variable = self.tangent_variable
            with tf.autodiff.ForwardAccumulator(
                    primals=[variable],
                    tangents=[tf.ones(variable.shape, variable.dtype)]) as accumulator:
                output = self.original_call(*args, **kwargs)
            recorder.forward_accumulators.append(accumulator)
            tangent = accumulator.jvp(output)
            output = recorder.watch(layer, output)
            if tangent is None:
                raise RuntimeError(
                    f"K-FAC could not differentiate the output of layer "
                    f"{layer.name!r} w.r.t. {variable.name}: the layer does not "
                    "read that variable in its call.")
            recorder.record(layer, tf.stop_gradient(tangent), output)
        recorder.record_output(layer, output)
        return output

    def _record_preactivation(self, recorder, inputs, args, kwargs):
        layer = self.layer
        activation = layer.activation
        layer.activation = keras.activations.linear
        try:
            preactivation = self.original_call(*args, **kwargs)
        finally:
            layer.activation = activation
        preactivation = recorder.watch(layer, preactivation)
        mask = self.mask_override
        recorder.record(layer, inputs, preactivation,
                        input_mask(inputs, kwargs) if mask is None else mask)
        output = preactivation if activation is None else activation(preactivation)
        recorder.record_output(layer, output)
        return output

    def __call__(self, *args, **kwargs):
        recorder = self.recorder
        if recorder is None:
            return self.original_call(*args, **kwargs)
        if self.block is not None:
            output = self.block.captured_call(self.original_call, recorder, args, kwargs)
            if output is not None:
                recorder.record_output(self.layer, output)
                return output
        inputs = args[0] if args else kwargs["inputs"]
        if self.mode == "preactivation":
            return self._record_preactivation(recorder, inputs, args, kwargs)
        return self._record_output(recorder, inputs, args, kwargs)


class AttentionMaskScope:
    """Replaces a `MultiHeadAttention`'s `call` to hand its masks to the
    capture wrappers of its projections.

    The layer reads the masks of its query, value and key and removes them
    from the tensors before calling its `EinsumDense` projections, so their
    records would see no mask. While a recorder is attached, this scope
    sets each projection wrapper's `mask_override` for the call: the query
    mask for the query (and gate) projection and for the output projection
    (whose rows are the query positions), the key mask (else the value
    mask) for the key projection, the value mask for the value projection.

    Args:
        layer: the `keras.layers.MultiHeadAttention`.
        wrappers: `{sublayer attribute: CaptureWrapper}` of its registered
            projections.
    """

    _QUERY_SIDE = ("_query_dense", "_output_dense", "_gate_dense")

    def __init__(self, layer, wrappers):
        self.layer = layer
        self.original_call = layer.call
        self.wrappers = wrappers

    def __call__(self, query, value, key=None, *args, **kwargs):
        if all(w.recorder is None for w in self.wrappers.values()):
            return self.original_call(query, value, key, *args, **kwargs)
        query_mask = getattr(query, "_keras_mask", None)
        value_mask = kwargs.get("value_mask")
        if value_mask is None:
            value_mask = getattr(value, "_keras_mask", None)
        key_mask = kwargs.get("key_mask")
        if key_mask is None:
            key_mask = getattr(key, "_keras_mask", None) if key is not None else value_mask
        masks = {"_key_dense": key_mask, "_value_dense": value_mask}
        masks.update({name: query_mask for name in self._QUERY_SIDE})
        for name, wrapper in self.wrappers.items():
            wrapper.mask_override = masks.get(name)
        try:
            return self.original_call(query, value, key, *args, **kwargs)
        finally:
            for wrapper in self.wrappers.values():
                wrapper.mask_override = None


def install_attention_mask_scopes(model, wrappers):
    """Installs an `AttentionMaskScope` (once) on every plain
    `MultiHeadAttention` of `model` with a registered projection.

    Args:
        model: the Keras model.
        wrappers: the registration's `CaptureWrapper`s.
    """
    by_layer = {id(w.layer): w for w in wrappers}
    for layer in keras_internals.child_layers(model):
        if not isinstance(layer, keras.layers.MultiHeadAttention) or isinstance(
                layer.__dict__.get("call"), AttentionMaskScope):
            continue
        if type(layer).call is not keras.layers.MultiHeadAttention.call:
            continue  # a subclass may call its projections differently
        projections = {name: by_layer[id(getattr(layer, name))]
                       for name in ("_query_dense", "_key_dense", "_value_dense",
                                    "_output_dense", "_gate_dense")
                       if getattr(layer, name, None) is not None
                       and id(getattr(layer, name)) in by_layer}
        if projections:
            layer.call = AttentionMaskScope(layer, projections)


def capture_wrapper(layer, block=None):
    """The layer's capture wrapper (installed once), configured for `block`.

    Args:
        layer: the Keras layer.
        block: the block reading the layer's captures, or None (default) to
            keep the wrapper's current setup (a new wrapper records
            pre-activations).

    Returns:
        The `CaptureWrapper`.
    """
    wrapper = layer.__dict__.get("_kfac_capture_wrapper")
    if wrapper is None:
        wrapper = CaptureWrapper(layer)
        layer._kfac_capture_wrapper = wrapper
        layer.call = wrapper
    if block is not None:
        wrapper.configure(block)
    return wrapper


def block_captures(block, recorder):
    """A capture block's records of one pass: all calls of each of its
    `capture_layers()`, concatenated in layer order."""
    return [record for layer in block.capture_layers()
            for record in recorder.for_layer(layer)]


def block_capture_masks(block, recorder):
    """The masks of `block_captures(block, recorder)`, aligned with them."""
    masks = []
    for layer in block.capture_layers():
        layer_masks = recorder.masks_for(layer)
        records = recorder.for_layer(layer)
        masks.extend(layer_masks if len(layer_masks) == len(records) else [None] * len(records))
    return masks
