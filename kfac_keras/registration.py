"""Walk a Keras model, pick a Fisher block for every trainable variable, and
install the capture wrappers that record layer inputs and pre-activations.

Registration happens once per (model, optimizer) pair, usually from
`KFACCallback.on_train_begin` or `make_train_step`. It:

1. walks every sub-layer of the model (Sequential, Functional, subclassed and
   nested models alike);
2. gives each trainable layer a block: a Kronecker block for the layer kinds
   in `KRONECKER_BLOCKS`, otherwise a diagonal block (`"diagonal"`), or no
   curvature at all (`"identity"`: the plain gradient, for excluded layers);
3. wraps the `call` of every layer with a Kronecker block. The wrapper is
   inert (it calls the original `call`) except inside
   `Registration.capture()`, where it runs the layer with its activation
   switched off to obtain the pre-activation `s`, records `(inputs, s)`, and
   returns `activation(s)`; so `evaluate`/`predict` are unaffected and the
   captured tensors come from the same forward pass as the loss.

Block choice per layer is controlled by `KFAC(layer_blocks=..., exclude_layers=...)`,
keyed by layer name or class name.
"""

import contextlib

import keras
import tensorflow as tf
from absl import logging

from kfac_keras.blocks.conv import conv_unsupported_reason, make_conv_block
from kfac_keras.blocks.conv_transpose import (conv_transpose_unsupported_reason,
                                              make_conv_transpose_block)
from kfac_keras.blocks.dense import DenseBlock
from kfac_keras.blocks.depthwise import (depthwise_unsupported_reason, make_depthwise_block,
                                         make_separable_block)
from kfac_keras.blocks.diagonal import DiagonalBlock
from kfac_keras.blocks.einsum_dense import einsum_unsupported_reason, make_einsum_dense_block
from kfac_keras.blocks.embedding import embedding_unsupported_reason, make_embedding_block
from kfac_keras.blocks.errors import UnsupportedLayerError
from kfac_keras.blocks import recurrent
from kfac_keras.blocks.scale_shift import make_scale_shift_block, scale_shift_unsupported_reason

#: Block kinds a user may ask for per layer.
BLOCK_KINDS = ("auto", "kronecker", "diagonal", "identity")


def _is_plain(layer, cls):
    """True for `cls` itself or a subclass that does not override `call`."""
    return isinstance(layer, cls) and type(layer).call is cls.call


def _dense_unsupported_reason(layer):
    if getattr(layer, "lora_enabled", False):
        return "LoRA-enabled Dense layers are not Kronecker-factored"
    if getattr(layer, "quantization_mode", None):
        return "quantized Dense layers are not Kronecker-factored"
    return None


def _make_dense_block(layer, inverse_method):
    return DenseBlock(layer, inverse_method=inverse_method)


def _optional_layer_classes(*names):
    return [getattr(keras.layers, n) for n in names if hasattr(keras.layers, n)]


#: (layer class, block factory, reason-it-cannot-be-used) for the structured
#: (non-diagonal) blocks. A factory may also raise `UnsupportedLayerError`
#: (e.g. for an equation or inverse method it cannot handle); either way the
#: layer then gets a diagonal block and the report gives the reason.
KRONECKER_BLOCKS = [
    (keras.layers.Dense, _make_dense_block, _dense_unsupported_reason),
    (keras.layers.EinsumDense, make_einsum_dense_block, einsum_unsupported_reason),
    (keras.layers.Conv1D, make_conv_block, conv_unsupported_reason),
    (keras.layers.Conv2D, make_conv_block, conv_unsupported_reason),
    (keras.layers.Conv3D, make_conv_block, conv_unsupported_reason),
    (keras.layers.Conv1DTranspose, make_conv_transpose_block, conv_transpose_unsupported_reason),
    (keras.layers.Conv2DTranspose, make_conv_transpose_block, conv_transpose_unsupported_reason),
    (keras.layers.Conv3DTranspose, make_conv_transpose_block, conv_transpose_unsupported_reason),
    (keras.layers.DepthwiseConv1D, make_depthwise_block, depthwise_unsupported_reason),
    (keras.layers.DepthwiseConv2D, make_depthwise_block, depthwise_unsupported_reason),
    (keras.layers.SeparableConv1D, make_separable_block, depthwise_unsupported_reason),
    (keras.layers.SeparableConv2D, make_separable_block, depthwise_unsupported_reason),
    (keras.layers.Embedding, make_embedding_block, embedding_unsupported_reason),
] + [
    (cls, recurrent.make_recurrent_block, recurrent.recurrent_unsupported_reason)
    for cls in recurrent.RECURRENT_CELLS
] + [
    (cls, make_scale_shift_block, scale_shift_unsupported_reason)
    for cls in _optional_layer_classes("BatchNormalization", "LayerNormalization",
                                       "GroupNormalization", "RMSNormalization")
]


class IdentityBlock:
    """Marks variables trained with the plain (un-preconditioned) gradient."""

    kind = "identity"
    needs_capture = False
    built = True

    def __init__(self, name, variables, layer=None):
        self.name = name
        self.variables = list(variables)
        self.layer = layer

    def build(self, optimizer):
        """No state."""
        return None

    def state_variables(self):
        return []

    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        """No statistics."""
        return None

    def update_inverses(self, damping):
        """Nothing to decompose."""
        return None

    def multiply_damped_inverse(self, grads, damping):
        # New tensors, not the incoming ones: the caller may run this inside a
        # tf.cond branch, where Keras's apply needs branch-local tensors.
        return [tf.identity(g) for g in grads]

    def describe(self):
        return {
            "block": self.name, "kind": self.kind,
            "layer_class": type(self.layer).__name__ if self.layer is not None else "-",
            "variables": [v.path for v in self.variables],
            "factor_shapes": {}, "bytes": 0,
        }


class _Recorder:
    """Collects `(inputs, pre-activation)` pairs during one forward pass."""

    def __init__(self):
        self.records = {}
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

    def record(self, layer, inputs, preactivation):
        self.records.setdefault(id(layer), []).append((inputs, preactivation))

    def record_output(self, layer, output):
        self.outputs.setdefault(id(layer), []).append(output)

    def outputs_for(self, layer):
        """The tensors `layer` returned in this pass, one per call."""
        return self.outputs.get(id(layer), [])

    def for_layer(self, layer):
        records = self.records.get(id(layer))
        if not records:
            raise RuntimeError(
                f"K-FAC registered layer {layer.name!r} but it was not called in "
                "the forward pass; a model whose layers are used conditionally "
                "needs those layers excluded (exclude_layers=[...])."
            )
        return records


#: What a capture wrapper records (a block's `capture_mode`, default
#: "preactivation"); the second element of each record is the tensor the
#: sampled objective is differentiated against.
#: * "preactivation": `(inputs, s)` with the layer's activation switched off.
#: * "output": `(inputs, output)`, the layer run unchanged (e.g. Embedding:
#:   token ids and looked-up vectors).
#: * "output_tangent": `(d output / d v, output)`, the forward-mode derivative
#:   of the output w.r.t. the block's `capture_tangent_variable` `v` in the
#:   direction of ones (normalization layers: `x_hat`); `(output, output)`
#:   when the block has no such variable.
CAPTURE_MODES = ("preactivation", "output", "output_tangent")


def _backend_variable(variable):
    """The `tf.Variable` behind a Keras variable (what the layer reads)."""
    inner = getattr(variable, "_value", None)
    if isinstance(inner, tf.Variable):
        return inner
    if isinstance(variable, tf.Variable):
        return variable
    raise TypeError(f"Cannot find the TensorFlow variable behind {variable!r}.")


class _CaptureWrapper:
    """Replaces a layer's `call`; records only while a recorder is active."""

    def __init__(self, layer):
        self.layer = layer
        self.original_call = layer.call
        self.recorder = None
        self.mode = "preactivation"
        self.tangent_variable = None
        self.block = None

    def configure(self, mode="preactivation", tangent_variable=None):
        """Sets what the wrapper records (see `CAPTURE_MODES`)."""
        if mode not in CAPTURE_MODES:
            raise ValueError(f"capture mode must be one of {CAPTURE_MODES}; "
                             f"received {mode!r}.")
        self.mode = mode
        self.tangent_variable = (None if tangent_variable is None
                                 else _backend_variable(tangent_variable))

    def _record_output(self, recorder, inputs, args, kwargs):
        layer = self.layer
        if self.mode == "output" or self.tangent_variable is None:
            output = recorder.watch(layer, self.original_call(*args, **kwargs))
            recorder.record(layer, output if self.mode == "output_tangent" else inputs,
                            output)
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

    def __call__(self, *args, **kwargs):
        recorder = self.recorder
        if recorder is None:
            return self.original_call(*args, **kwargs)
        inputs = args[0] if args else kwargs["inputs"]
        if hasattr(self.block, "captured_call"):
            return self.block.captured_call(self.original_call, recorder, args, kwargs)
        if self.mode != "preactivation":
            return self._record_output(recorder, inputs, args, kwargs)
        layer = self.layer
        activation = layer.activation
        layer.activation = keras.activations.linear
        try:
            preactivation = self.original_call(*args, **kwargs)
        finally:
            layer.activation = activation
        preactivation = recorder.watch(layer, preactivation)
        recorder.record(layer, inputs, preactivation)
        output = preactivation if activation is None else activation(preactivation)
        recorder.record_output(layer, output)
        return output


def _capture_wrapper(layer, block=None):
    """The layer's capture wrapper (installed once), set up for `block` (a
    new wrapper records pre-activations; without `block` the current setup
    is kept)."""
    wrapper = layer.__dict__.get("_kfac_capture_wrapper")
    if wrapper is None:
        wrapper = _CaptureWrapper(layer)
        layer._kfac_capture_wrapper = wrapper
        layer.call = wrapper
    if block is not None:
        wrapper.block = block
        wrapper.configure(getattr(block, "capture_mode", "preactivation"),
                          getattr(block, "capture_tangent_variable", None))
    return wrapper


def _layer_name(layer):
    return getattr(layer, "path", None) or layer.name


def capture_layers(block):
    """The layers whose calls a capture block reads, in the order its
    `update_statistics` expects them (`block.capture_layers` for multi-layer
    blocks such as Dense chains, else `[block.layer]`)."""
    layers = getattr(block, "capture_layers", None)
    return list(layers) if layers else [block.layer]


def block_captures(block, recorder):
    """A capture block's `(inputs, pre-activation)` records of one pass: all
    calls of each of its `capture_layers`, concatenated in layer order."""
    return [record for layer in capture_layers(block)
            for record in recorder.for_layer(layer)]


class Registration:
    """The blocks chosen for a model, and the capture of their statistics.

    Create with `register`. Attributes:
        model: the registered model.
        blocks: every block, in model order; each trainable variable of the
            model appears in exactly one block.
        capture_blocks: the blocks that need captured activations.
    """

    def __init__(self, model, blocks):
        self.model = model
        self.blocks = list(blocks)
        self.capture_blocks = [b for b in self.blocks if b.needs_capture]
        self.statistics_blocks = [
            b for b in self.blocks if not b.needs_capture and b.kind != "identity"]
        self._wrappers = [_capture_wrapper(layer, b) for b in self.capture_blocks
                          for layer in capture_layers(b)]
        #: Chains of Dense layers given block-tridiagonal blocks (layer names).
        self.chains = []
        self._block_of_variable = {}
        for block in self.blocks:
            for variable in block.variables:
                self._block_of_variable[id(variable)] = block

    def block_of(self, variable):
        """The block covering `variable`, or None."""
        return self._block_of_variable.get(id(variable))

    @contextlib.contextmanager
    def capture(self, recorder=None):
        """Within this context, registered layers record their activations.

        Args:
            recorder: the recorder to fill; defaults to a new one that only
                records (`kfac_keras.custom_step` passes one that also
                collects the gradients flowing back to the records).

        Yields:
            A recorder; `recorder.for_layer(layer)` lists the `(inputs,
            pre-activation)` pairs of each call of `layer`.
        """
        recorder = _Recorder() if recorder is None else recorder
        for wrapper in self._wrappers:
            if wrapper.recorder is not None:
                raise RuntimeError("K-FAC captures cannot be nested.")
            wrapper.recorder = recorder
        try:
            yield recorder
        finally:
            for wrapper in self._wrappers:
                wrapper.recorder = None

    def describe(self):
        """The registration report as a list of dicts (one per block).

        Each dict has the block's `describe()` keys plus `"note"`: why a layer
        got a fallback (diagonal) block, or `""`.
        """
        infos = []
        for block in self.blocks:
            info = dict(block.describe())
            info["note"] = getattr(block, "registration_note", "")
            infos.append(info)
        return infos

    def report(self):
        """The registration report as a printable table."""
        rows = [("layer / block", "class", "kind", "factor shapes", "bytes", "note")]
        total = 0
        for info in self.describe():
            shapes = ", ".join(
                f"{k}={v}" for k, v in sorted(info["factor_shapes"].items()))
            nbytes = info["bytes"] or 0
            total += nbytes
            rows.append((info["block"], info["layer_class"], info["kind"],
                         shapes or "-", f"{nbytes:,}", info["note"]))
        rows.append(("total", "", "", "", f"{total:,}", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = ["K-FAC registration:"]
        for index, row in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
            if index == 0 or index == len(rows) - 2:
                lines.append("  " + "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _parents(layers):
    """Maps `id(sublayer)` to its enclosing layer (None at the top level)."""
    parents = {}
    for layer in layers:
        for child in layer._flatten_layers(include_self=False, recursive=False):
            parents.setdefault(id(child), layer)
    return parents


def _resolve_choice(layer, parents, layer_blocks, excluded):
    """The block kind asked for `layer`: the nearest of the layer itself and
    its enclosing layers that is named (by name, else by class) in
    `exclude_layers` (-> "identity") or `layer_blocks` decides; else "auto"."""
    node = layer
    while node is not None:
        for key in (node.name, type(node).__name__):
            if key in excluded:
                return "identity"
            if key in layer_blocks:
                return layer_blocks[key]
        node = parents.get(id(node))
    return "auto"


def _check_names(model_layers, layer_blocks, exclude_layers):
    known = set()
    for layer in model_layers:
        known.add(layer.name)
        known.add(type(layer).__name__)
    for option, names in (("layer_blocks", list(layer_blocks)),
                          ("exclude_layers", list(exclude_layers))):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"`{option}` names {unknown} that match no layer name or layer "
                f"class in the model; valid names: {sorted(known)}."
            )
    both = sorted(set(layer_blocks) & set(exclude_layers))
    if both:
        raise ValueError(
            f"{both} appear in both `layer_blocks` and `exclude_layers`; name "
            "each layer or class in one of them only.")


def _structured_block(layer, choice, inverse_method):
    """`(block, note)`: the layer's structured block, or None and the reason.

    Raises:
        ValueError: when `choice == "kronecker"` and there is no such block.
    """
    for cls, factory, reason_fn in KRONECKER_BLOCKS:
        if not isinstance(layer, cls):
            continue
        if not _is_plain(layer, cls):
            reason = (f"{type(layer).__name__} overrides `call` of "
                      f"{cls.__name__}, so its computation is unknown")
        else:
            reason = reason_fn(layer)
            if reason is None:
                try:
                    return factory(layer, inverse_method), ""
                except UnsupportedLayerError as error:
                    reason = str(error)
        if choice == "kronecker":
            raise ValueError(
                f"`layer_blocks` asks for a Kronecker block on layer "
                f"{layer.name!r}, but {reason}.")
        logging.info("K-FAC: layer %s gets a diagonal block: %s.", layer.name, reason)
        return None, f"diagonal fallback: {reason}"
    if choice == "kronecker":
        supported = sorted({c.__name__ for c, _, _ in KRONECKER_BLOCKS})
        raise ValueError(
            f"`layer_blocks` asks for a Kronecker block on layer "
            f"{layer.name!r} of class {type(layer).__name__}; "
            f"Kronecker blocks exist for {supported}.")
    return None, (f"diagonal fallback: no structured block for "
                  f"{type(layer).__name__}")


def register(model, inverse_method="cholesky", layer_blocks=None,
             exclude_layers=None, approximation="block_diagonal"):
    """Chooses a Fisher block for every trainable variable of `model`.

    Args:
        model: a built Keras model.
        inverse_method: passed to the Kronecker blocks; see
            `kfac_keras.KFAC`. Defaults to `"cholesky"`.
        layer_blocks: optional dict from layer name or layer class name to
            one of `BLOCK_KINDS`. `"kronecker"` asks for the layer's
            structured block (Kronecker factors; per-entry 2x2 blocks for
            normalization layers) and raises if it has none. A name beats a
            class, and a layer's own entry beats its enclosing layers' (an
            entry for a model or a `MultiHeadAttention` applies to the layers
            inside it). Defaults to None (`"auto"` everywhere: the structured
            block where one exists, else diagonal).
        exclude_layers: optional list of layer names or class names whose
            variables (and those of the layers inside them) get the plain
            gradient (`"identity"`). Defaults to None.
        approximation: `"block_diagonal"` (default) or `"tridiagonal"`: chains
            of Dense layers get one block-tridiagonal block each
            (`kfac_keras.blocks.tridiagonal`, paper section 4.3); the
            registration's `chains` lists them.

    Returns:
        A `Registration`.

    Raises:
        ValueError: for unknown names or block kinds (the message lists the
            valid names), a name in both options, a `"kronecker"` request on
            a layer without a Kronecker block, or an unbuilt model.
    """
    layer_blocks = dict(layer_blocks or {})
    exclude_layers = list(exclude_layers or [])
    for name, kind in layer_blocks.items():
        if kind not in BLOCK_KINDS:
            raise ValueError(
                f"`layer_blocks[{name!r}]` must be one of {BLOCK_KINDS}; "
                f"received {kind!r}."
            )
    sublayers = model._flatten_layers(include_self=False, recursive=True)
    if not model.built and not (sublayers and all(l.built for l in sublayers)):
        # (A model without `call`, e.g. a custom train_step's container of
        # built sub-models, is never marked built itself.)
        raise ValueError(
            "K-FAC needs a built model to register its layers; call the model "
            "on data (or `model.build(input_shape)`) first."
        )
    layers = model._flatten_layers(include_self=False, recursive=True)
    _check_names(layers, layer_blocks, exclude_layers)
    excluded = set(exclude_layers)
    parents = _parents(layers)

    blocks = []
    covered = set()
    trainable_ids = {id(v) for v in model.trainable_variables}
    for layer in layers:
        if not layer.trainable:
            continue  # frozen: its variables are not trained
        own = [v for v in recurrent.layer_variables(layer)
               if id(v) in trainable_ids and id(v) not in covered]
        if not own:
            continue
        choice = _resolve_choice(recurrent.choice_layer(layer), parents, layer_blocks, excluded)
        note = ""
        if choice in ("auto", "kronecker"):
            block, note = _structured_block(layer, choice, inverse_method)
            if block is not None and all(
                    id(v) in trainable_ids and id(v) not in covered for v in block.variables):
                blocks.append(block)
                covered.update(id(v) for v in block.variables)
                own = [v for v in own if id(v) not in covered]
                note = f"not covered by the {block.kind} block"
            elif block is not None:
                note = "diagonal fallback: some of the block's variables are frozen or shared"
        if not own:
            continue
        cls = IdentityBlock if choice == "identity" else DiagonalBlock
        fallback = cls(_layer_name(layer), own, layer)
        if cls is DiagonalBlock:
            fallback.registration_note = note or "diagonal (requested)"
        else:
            fallback.registration_note = "plain gradient (excluded)"
        blocks.append(fallback)
        covered.update(id(v) for v in own)

    leftovers = [v for v in model.trainable_variables if id(v) not in covered]
    if leftovers:
        block = DiagonalBlock("unowned variables", leftovers, None)
        block.registration_note = "diagonal fallback: variables owned by no sub-layer"
        blocks.append(block)
    chains = []
    if approximation == "tridiagonal":
        from kfac_keras.blocks import tridiagonal

        blocks, chains, _ = tridiagonal.group_dense_chains(
            model, blocks, inverse_method=inverse_method)
    elif approximation != "block_diagonal":
        raise ValueError(
            "`approximation` must be 'block_diagonal' or 'tridiagonal'; "
            f"received {approximation!r}.")
    registration = Registration(model, blocks)
    registration.chains = chains
    return registration
