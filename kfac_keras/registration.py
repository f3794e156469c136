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
from absl import logging

from kfac_keras.blocks.dense import DenseBlock
from kfac_keras.blocks.diagonal import DiagonalBlock

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


#: (layer class, block factory, reason-it-cannot-be-used) for Kronecker blocks.
KRONECKER_BLOCKS = [
    (keras.layers.Dense, _make_dense_block, _dense_unsupported_reason),
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

    def state_variables(self):
        return []

    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        """No statistics."""

    def update_inverses(self, damping):
        """Nothing to decompose."""

    def multiply_damped_inverse(self, grads, damping):
        return list(grads)

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

    def record(self, layer, inputs, preactivation):
        self.records.setdefault(id(layer), []).append((inputs, preactivation))

    def for_layer(self, layer):
        records = self.records.get(id(layer))
        if not records:
            raise RuntimeError(
                f"K-FAC registered layer {layer.name!r} but it was not called in "
                "the forward pass; a model whose layers are used conditionally "
                "needs those layers excluded (exclude_layers=[...])."
            )
        return records


class _CaptureWrapper:
    """Replaces a layer's `call`; records only while a recorder is active."""

    def __init__(self, layer):
        self.layer = layer
        self.original_call = layer.call
        self.recorder = None

    def __call__(self, *args, **kwargs):
        recorder = self.recorder
        if recorder is None:
            return self.original_call(*args, **kwargs)
        inputs = args[0] if args else kwargs["inputs"]
        layer = self.layer
        activation = layer.activation
        layer.activation = keras.activations.linear
        try:
            preactivation = self.original_call(*args, **kwargs)
        finally:
            layer.activation = activation
        recorder.record(layer, inputs, preactivation)
        if activation is None:
            return preactivation
        return activation(preactivation)


def _capture_wrapper(layer):
    wrapper = layer.__dict__.get("_kfac_capture_wrapper")
    if wrapper is None:
        wrapper = _CaptureWrapper(layer)
        layer._kfac_capture_wrapper = wrapper
        layer.call = wrapper
    return wrapper


def _layer_name(layer):
    return getattr(layer, "path", None) or layer.name


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
        self._wrappers = [_capture_wrapper(b.layer) for b in self.capture_blocks]
        self._block_of_variable = {}
        for block in self.blocks:
            for variable in block.variables:
                self._block_of_variable[id(variable)] = block

    def block_of(self, variable):
        """The block covering `variable`, or None."""
        return self._block_of_variable.get(id(variable))

    @contextlib.contextmanager
    def capture(self):
        """Within this context, registered layers record their activations.

        Yields:
            A recorder; `recorder.for_layer(layer)` lists the `(inputs,
            pre-activation)` pairs of each call of `layer`.
        """
        recorder = _Recorder()
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
        """The registration report as a list of dicts (one per block)."""
        return [block.describe() for block in self.blocks]

    def report(self):
        """The registration report as a printable table."""
        rows = [("layer / block", "class", "kind", "factor shapes", "bytes")]
        total = 0
        for info in self.describe():
            shapes = ", ".join(
                f"{k}={v}" for k, v in sorted(info["factor_shapes"].items()))
            nbytes = info["bytes"] or 0
            total += nbytes
            rows.append((info["block"], info["layer_class"], info["kind"],
                         shapes or "-", f"{nbytes:,}"))
        rows.append(("total", "", "", "", f"{total:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["K-FAC registration:"]
        for index, row in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
            if index == 0 or index == len(rows) - 2:
                lines.append("  " + "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _resolve_choice(layer, layer_blocks, excluded):
    if layer.name in excluded or type(layer).__name__ in excluded:
        return "identity"
    if layer.name in layer_blocks:
        return layer_blocks[layer.name]
    return layer_blocks.get(type(layer).__name__, "auto")


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


def register(model, inverse_method="cholesky", layer_blocks=None,
             exclude_layers=None):
    """Chooses a Fisher block for every trainable variable of `model`.

    Args:
        model: a built Keras model.
        inverse_method: passed to the Kronecker blocks; see
            `kfac_keras.KFAC`. Defaults to `"cholesky"`.
        layer_blocks: optional dict from layer name or layer class name to
            one of `BLOCK_KINDS`; a name beats a class. Defaults to None
            (`"auto"` everywhere: Kronecker where supported, else diagonal).
        exclude_layers: optional list of layer names or class names whose
            variables get the plain gradient (`"identity"`). Defaults to None.

    Returns:
        A `Registration`.

    Raises:
        ValueError: for unknown names or block kinds, a `"kronecker"` request
            on a layer without a Kronecker block, or an unbuilt model.
    """
    layer_blocks = dict(layer_blocks or {})
    exclude_layers = list(exclude_layers or [])
    for name, kind in layer_blocks.items():
        if kind not in BLOCK_KINDS:
            raise ValueError(
                f"`layer_blocks[{name!r}]` must be one of {BLOCK_KINDS}; "
                f"received {kind!r}."
            )
    if not model.built:
        raise ValueError(
            "K-FAC needs a built model to register its layers; call the model "
            "on data (or `model.build(input_shape)`) first."
        )
    layers = model._flatten_layers(include_self=False, recursive=True)
    _check_names(layers, layer_blocks, exclude_layers)
    excluded = set(exclude_layers)

    blocks = []
    covered = set()
    trainable_ids = {id(v) for v in model.trainable_variables}
    for layer in layers:
        if not layer.trainable:
            continue
        choice = _resolve_choice(layer, layer_blocks, excluded)
        if choice in ("auto", "kronecker"):
            block = None
            for cls, factory, reason_fn in KRONECKER_BLOCKS:
                if _is_plain(layer, cls):
                    reason = reason_fn(layer)
                    if reason is None:
                        block = factory(layer, inverse_method)
                    elif choice == "kronecker":
                        raise ValueError(
                            f"`layer_blocks` asks for a Kronecker block on layer "
                            f"{layer.name!r}, but {reason}.")
                    else:
                        logging.info("K-FAC: layer %s gets a diagonal block: %s.",
                                     layer.name, reason)
                    break
            else:
                if choice == "kronecker":
                    supported = [c.__name__ for c, _, _ in KRONECKER_BLOCKS]
                    raise ValueError(
                        f"`layer_blocks` asks for a Kronecker block on layer "
                        f"{layer.name!r} of class {type(layer).__name__}; "
                        f"Kronecker blocks exist for {supported}.")
            if block is not None and all(id(v) in trainable_ids for v in block.variables):
                blocks.append(block)
                covered.update(id(v) for v in block.variables)
                continue
        own = [v for v in layer._trainable_variables
               if id(v) in trainable_ids and id(v) not in covered]
        if not own:
            continue
        cls = IdentityBlock if choice == "identity" else DiagonalBlock
        blocks.append(cls(_layer_name(layer), own, layer))
        covered.update(id(v) for v in own)

    leftovers = [v for v in model.trainable_variables if id(v) not in covered]
    if leftovers:
        blocks.append(DiagonalBlock("unowned variables", leftovers, None))
    return Registration(model, blocks)
