"""Walk a Keras model, pick a Fisher block for every trainable variable, and
install the capture wrappers that record layer inputs and pre-activations.

Registration happens once per (model, optimizer) pair, usually from
`KFACCallback.on_train_begin` or `make_train_step`. It:

1. walks every sub-layer of the model (Sequential, Functional, subclassed and
   nested models alike);
2. gives each trainable layer a block: a Kronecker block for the layer kinds
   in `KRONECKER_BLOCKS`, otherwise a diagonal block (`"diagonal"`), or no
   curvature at all (`"identity"`: the plain gradient, for excluded layers);
3. with `approximation="tridiagonal"`, replaces the blocks of Dense chains
   by chain blocks (`kfac_keras.chains`);
4. wraps the `call` of every layer whose block reads captured activations
   (`kfac_keras.capture`). The wrapper is inert except inside
   `Registration.capture()`, where it records what the block declares (e.g.
   `(inputs, s)` with `s` the pre-activation) and returns the layer's usual
   output; so `evaluate`/`predict` are unaffected and the captured tensors
   come from the same forward pass as the loss.

`register` is public: it checks `layer_blocks` and `exclude_layers` with the
validators `KFAC(...)` uses (`kfac_keras.validation`), so both raise the same
errors; `inverse_method` and `approximation` come validated from the
optimizer's options.

Block choice per layer is controlled by `KFAC(layer_blocks=..., exclude_layers=...)`,
keyed by layer name or class name.
"""

import contextlib

import keras
from absl import logging

from kfac_keras import capture, chains
from kfac_keras import keras_internals
from kfac_keras.validation import check_string_keyed_dict, check_string_list
from kfac_keras.blocks.base import StatisticsSource, layer_name
from kfac_keras.blocks.conv import conv_unsupported_reason, make_conv_block
from kfac_keras.blocks.conv_transpose import (conv_transpose_unsupported_reason,
                                              make_conv_transpose_block)
from kfac_keras.blocks.dense import dense_unsupported_reason, make_dense_block
from kfac_keras.blocks.depthwise import make_depthwise_block, make_separable_block
from kfac_keras.blocks.diagonal import DiagonalBlock
from kfac_keras.blocks.einsum_dense import einsum_unsupported_reason, make_einsum_dense_block
from kfac_keras.blocks.embedding import embedding_unsupported_reason, make_embedding_block
from kfac_keras.blocks.errors import UnsupportedLayerError
from kfac_keras.blocks import recurrent
from kfac_keras.blocks.identity import IdentityBlock
from kfac_keras.blocks.scale_shift import make_scale_shift_block, scale_shift_unsupported_reason

#: A capture block's records of one forward pass (see `kfac_keras.capture`).
block_captures = capture.block_captures

#: Block kinds a user may ask for per layer.
BLOCK_KINDS = ("auto", "kronecker", "diagonal", "identity")


def check_layer_blocks(layer_blocks):
    """The `layer_blocks` option checked (`BLOCK_KINDS` values), as a dict."""
    return check_string_keyed_dict("layer_blocks", layer_blocks, BLOCK_KINDS,
                                   "layer name or class name")


def check_exclude_layers(exclude_layers):
    """The `exclude_layers` option checked (strings), as a list."""
    return check_string_list("exclude_layers", exclude_layers, "layer names or class names")


def _is_plain(layer, cls):
    """True for `cls` itself or a subclass that does not override `call`."""
    return isinstance(layer, cls) and type(layer).call is cls.call


def _optional_layer_classes(*names):
    return [getattr(keras.layers, n) for n in names if hasattr(keras.layers, n)]


#: (layer class, block factory, reason-it-cannot-be-used) for the structured
#: (non-diagonal) blocks. A factory may also raise `UnsupportedLayerError`
#: (e.g. for an equation or inverse method it cannot handle); either way the
#: layer then gets a diagonal block and the report gives the reason.
KRONECKER_BLOCKS = [
    (keras.layers.Dense, make_dense_block, dense_unsupported_reason),
    (keras.layers.EinsumDense, make_einsum_dense_block, einsum_unsupported_reason),
    (keras.layers.Conv1D, make_conv_block, conv_unsupported_reason),
    (keras.layers.Conv2D, make_conv_block, conv_unsupported_reason),
    (keras.layers.Conv3D, make_conv_block, conv_unsupported_reason),
    (keras.layers.Conv1DTranspose, make_conv_transpose_block, conv_transpose_unsupported_reason),
    (keras.layers.Conv2DTranspose, make_conv_transpose_block, conv_transpose_unsupported_reason),
    (keras.layers.Conv3DTranspose, make_conv_transpose_block, conv_transpose_unsupported_reason),
    (keras.layers.DepthwiseConv1D, make_depthwise_block, conv_unsupported_reason),
    (keras.layers.DepthwiseConv2D, make_depthwise_block, conv_unsupported_reason),
    (keras.layers.SeparableConv1D, make_separable_block, conv_unsupported_reason),
    (keras.layers.SeparableConv2D, make_separable_block, conv_unsupported_reason),
    (keras.layers.Embedding, make_embedding_block, embedding_unsupported_reason),
] + [
    (cls, recurrent.make_recurrent_block, recurrent.recurrent_unsupported_reason)
    for cls in recurrent.RECURRENT_CELLS
] + [
    (cls, make_scale_shift_block, scale_shift_unsupported_reason)
    for cls in _optional_layer_classes("BatchNormalization", "LayerNormalization",
                                       "GroupNormalization", "RMSNormalization")
]


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
        self.capture_blocks = [b for b in self.blocks
                               if b.statistics_source is StatisticsSource.CAPTURES]
        self._wrappers = [capture.capture_wrapper(layer, b) for b in self.capture_blocks
                          for layer in b.capture_layers()]
        capture.install_attention_mask_scopes(model, self._wrappers)  # masks of projections
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
        recorder = capture.Recorder() if recorder is None else recorder
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
            info["note"] = block.registration_note
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
        for child in keras_internals.child_layers(layer, recursive=False):
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
        TypeError: `layer_blocks` is not a dict from strings, or
            `exclude_layers` not a list of strings.
        ValueError: for a block kind not in `BLOCK_KINDS`, names that match
            no layer (the message lists the valid names), a name in both
            options, a `"kronecker"` request on a layer without a Kronecker
            block, or an unbuilt model.
    """
    layer_blocks = check_layer_blocks(layer_blocks)
    exclude_layers = check_exclude_layers(exclude_layers)
    sublayers = keras_internals.child_layers(model)
    if not model.built and not (sublayers and all(l.built for l in sublayers)):
        # (A model without `call`, e.g. a custom train_step's container of
        # built sub-models, is never marked built itself.)
        raise ValueError(
            "K-FAC needs a built model to register its layers; call the model "
            "on data (or `model.build(input_shape)`) first."
        )
    layers = keras_internals.child_layers(model)
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
        fallback = cls(layer_name(layer), own, layer)
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
    chain_names = []
    if approximation == "tridiagonal":
        blocks, chain_names = chains.group_dense_chains(
            model, blocks, inverse_method=inverse_method)
    registration = Registration(model, blocks)
    registration.chains = chain_names
    return registration
