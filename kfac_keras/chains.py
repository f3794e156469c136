"""Detection of Dense chains for the block-tridiagonal approximation.

A *chain* (paper section 4.3; the block is
`kfac_keras.blocks.tridiagonal.DenseChainBlock`) is found by tracing the
model's forward pass once with the capture wrappers on
(`kfac_keras.capture`): a link `i -> j` exists when the tensor layer `j`
receives is the very tensor layer `i` returned, both layers are called once
on rank-2 inputs, and layer `i`'s output feeds no other Dense layer. This works
for Functional, Sequential and subclassed models (the latter need a known
input shape). Anything between two Dense layers (Dropout, an Activation layer,
a residual add) ends the chain.
"""

import keras
import tensorflow as tf
from absl import logging

from kfac_keras import capture
from kfac_keras import keras_internals
from kfac_keras.blocks.base import layer_name
from kfac_keras.blocks.dense import DenseBlock
from kfac_keras.blocks.tridiagonal import DenseChainBlock


def _input_specs(model):
    """TensorSpecs for tracing `model`, or None (with the reason) if unknown."""
    try:
        symbolic = model.inputs
    except (AttributeError, ValueError):
        symbolic = None
    if symbolic:
        # Functional (and built Sequential) models: the nested input structure.
        structure = getattr(model, "_inputs_struct", None)
        if structure is None:  # e.g. Sequential: a list of one input
            structure = symbolic[0] if len(symbolic) == 1 else symbolic
        return tf.nest.map_structure(
            lambda t: tf.TensorSpec(t.shape, t.dtype), structure), None
    shapes = getattr(model, "_build_shapes_dict", None)
    if not shapes or len(shapes) != 1:
        return None, "the model's input shape is unknown (build or call it first)"
    shape = next(iter(shapes.values()))

    def to_spec(item):
        return tf.TensorSpec([None] + list(item)[1:], keras.backend.floatx())

    def is_shape(item):
        return isinstance(item, (tuple, list)) and all(
            d is None or isinstance(d, int) for d in item)

    def convert(item):
        if is_shape(item):
            return to_spec(item)
        if isinstance(item, dict):
            return {k: convert(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(convert(v) for v in item)
        raise ValueError(f"unrecognised input shape {item!r}")

    try:
        return convert(shape), None
    except ValueError as error:
        return None, str(error)


def _keras_name_scopes():
    """Keras's global name-scope stack (a list)."""
    return keras_internals.name_scope_stack()


def _trace_links(model, layers):
    """Traces one training-mode forward pass; returns `{id(layer): next layer}`."""
    specs, reason = _input_specs(model)
    if specs is None:
        return None, reason
    wrappers = [capture.capture_wrapper(layer) for layer in layers]
    recorder = capture.Recorder()
    for wrapper in wrappers:
        wrapper.recorder = recorder

    def forward(inputs):
        return model(inputs, training=True)

    depth = len(_keras_name_scopes())
    try:
        tf.function(forward, autograph=False).get_concrete_function(specs)
    except Exception as error:  # noqa: BLE001 -- any failure means "no chains"
        # A failure inside a Keras name scope can leave it on Keras's stack
        # (and prefix every later layer path); drop what the trace pushed.
        del _keras_name_scopes()[depth:]
        return None, f"tracing the model failed ({type(error).__name__}: {error})"
    finally:
        for wrapper in wrappers:
            wrapper.recorder = None

    producers = {}
    single_use = []
    for layer in layers:
        uses = recorder.uses_of(layer)
        outputs = recorder.outputs_for(layer)
        if len(uses) == 1 and len(outputs) == 1 and uses[0][0].shape.rank == 2:
            single_use.append(layer)
            producers[id(outputs[0])] = layer
    successors = {}
    for layer in single_use:
        inputs = recorder.records[id(layer)][0][0]
        previous = producers.get(id(inputs))
        if previous is not None and previous is not layer:
            successors.setdefault(id(previous), []).append(layer)
    links = {key: value[0] for key, value in successors.items() if len(value) == 1}
    return links, None


def group_dense_chains(model, blocks, inverse_method="cholesky"):
    """Replaces the Dense blocks of each chain by one `DenseChainBlock`.

    Args:
        model: the built Keras model.
        blocks: the block-diagonal blocks chosen by registration, in model
            order. Only plain `DenseBlock`s can join a chain.
        inverse_method: passed to the chain blocks (`"cholesky"` or
            `"inverse"`). Defaults to `"cholesky"`.

    Returns:
        `(blocks, chains)`: the new block list (each chain block at the
        position of its first layer's block) and the list of chains (each a
        list of layer names). When no chain search is possible the blocks are
        returned unchanged and a warning says why.
    """
    dense_blocks = [b for b in blocks if type(b) is DenseBlock]
    if len(dense_blocks) < 2:
        return list(blocks), []
    links, reason = _trace_links(model, [b.layer for b in dense_blocks])
    if links is None:
        logging.warning("K-FAC approximation='tridiagonal': no chain search: %s; "
                        "all layers keep block-diagonal blocks.", reason)
        return list(blocks), []
    block_of_layer = {id(b.layer): b for b in dense_blocks}
    has_predecessor = {id(layer) for layer in links.values()}
    chains = []
    for block in dense_blocks:
        layer = block.layer
        if id(layer) in has_predecessor or id(layer) not in links:
            continue
        chain = [layer]
        while id(chain[-1]) in links:
            chain.append(links[id(chain[-1])])
        chains.append(chain)
    chain_of_block = {}
    for chain in chains:
        chain_block = DenseChainBlock(chain, inverse_method=inverse_method)
        for layer in chain:
            chain_of_block[id(block_of_layer[id(layer)])] = chain_block
    result, placed = [], set()
    for block in blocks:
        chain_block = chain_of_block.get(id(block))
        if chain_block is None:
            result.append(block)
        elif id(chain_block) not in placed:
            result.append(chain_block)
            placed.add(id(chain_block))
    names = [[layer_name(layer) for layer in chain] for chain in chains]
    if not chains:
        logging.info("K-FAC approximation='tridiagonal': no chain of Dense layers "
                     "found; all layers keep block-diagonal blocks.")
    return result, names
