"""Registration: the block for every trainable variable, per-layer choices,
exclusions, name checking, shared and frozen layers, the diagonal fallback.

Oracles: the expected block kind of each layer written out by hand; for the
diagonal fallback, the squared gradient of the empirical objective from a
separate tape; for exclusions, the raw gradient.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_keras
from kfac_keras.blocks.conv import ConvBlock, GroupedConvBlock
from kfac_keras.blocks.dense import DenseBlock
from kfac_keras.blocks.depthwise import DepthwiseConvBlock, SeparableConvBlock
from kfac_keras.blocks.einsum_dense import EinsumDenseBlock
from kfac_keras.blocks.embedding import EmbeddingBlock

SCALE_SHIFT_FULL = "scale-shift (2x2 per entry)"
SCALE_SHIFT_DIAGONAL = "scale-shift (diagonal)"


class BiasOnly(keras.layers.Layer):
    """A custom layer with one trainable vector (no structured block)."""

    def build(self, input_shape):
        self.offset = self.add_weight(shape=(input_shape[-1],), initializer="zeros",
                                      name="offset")

    def call(self, inputs):
        return inputs + self.offset


def _zoo():
    """A three-input model with one of every supported layer kind."""
    images = keras.Input((8, 8, 2), name="images")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(images)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", groups=2, name="grouped")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.SeparableConv2D(4, 3, strides=2, name="sep")(x)
    x = keras.layers.GroupNormalization(groups=2, name="gn")(x)
    x = keras.layers.PReLU(name="prelu")(x)
    frozen = keras.layers.Conv2D(4, 1, name="frozen_conv")
    x = frozen(x)
    image_features = keras.layers.GlobalAveragePooling2D()(x)

    tokens = keras.Input((6,), dtype="int32", name="tokens")
    s = keras.layers.Embedding(11, 4, name="embedding")(tokens)
    s = keras.layers.Conv1D(4, 3, padding="causal", name="conv1d")(s)
    s = keras.layers.DepthwiseConv1D(2, name="dw1d")(s)
    s = keras.layers.SeparableConv1D(4, 2, name="sep1d")(s)
    s = keras.layers.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de", name="einsum")(s)
    s = keras.layers.Reshape((4, 6))(s)
    s = keras.layers.RMSNormalization(name="rms")(s)
    s = keras.layers.LayerNormalization(center=False, name="ln")(s)
    sequence_features = keras.layers.GlobalAveragePooling1D()(s)

    volumes = keras.Input((4, 4, 4, 1), name="volumes")
    v = keras.layers.Conv3D(2, 2, name="conv3d")(volumes)
    volume_features = keras.layers.GlobalAveragePooling3D()(v)

    h = keras.layers.Concatenate()([image_features, sequence_features, volume_features])
    h = keras.layers.Dense(5, name="dense")(h)
    h = BiasOnly(name="bias_only")(h)
    out = keras.layers.Dense(3, name="head")(h)
    model = keras.Model([images, tokens, volumes], out)
    frozen.trainable = False
    return model


def _zoo_data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return ([rng.normal(size=(n, 8, 8, 2)).astype("float32"),
             rng.integers(0, 11, size=(n, 6)).astype("int32"),
             rng.normal(size=(n, 4, 4, 4, 1)).astype("float32")],
            rng.integers(0, 3, size=(n,)).astype("int32"))


EXPECTED_KINDS = {
    "conv": ConvBlock.kind, "bn": SCALE_SHIFT_FULL, "grouped": GroupedConvBlock.kind,
    "dw": DepthwiseConvBlock.kind, "sep": SeparableConvBlock.kind, "gn": SCALE_SHIFT_FULL,
    "prelu": "diagonal", "embedding": EmbeddingBlock.kind, "conv1d": ConvBlock.kind,
    "dw1d": DepthwiseConvBlock.kind, "sep1d": SeparableConvBlock.kind,
    "einsum": EinsumDenseBlock.kind, "rms": SCALE_SHIFT_DIAGONAL, "ln": SCALE_SHIFT_DIAGONAL,
    "conv3d": ConvBlock.kind, "dense": DenseBlock.kind, "bias_only": "diagonal",
    "head": DenseBlock.kind,
}


def _kind_by_layer(model, registration):
    """Layer name -> kinds of the blocks covering its trainable variables."""
    kinds = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for variable in layer._trainable_variables:
            if not variable.trainable:
                continue
            block = registration.block_of(variable)
            kinds.setdefault(layer.name, set()).add(None if block is None else block.kind)
    return {name: k.pop() if len(k) == 1 else k for name, k in kinds.items()}


def test_every_trainable_variable_gets_the_expected_block():
    model = _zoo()
    registration = kfac_keras.register(model)
    assert _kind_by_layer(model, registration) == EXPECTED_KINDS
    covered = [v.path for block in registration.blocks for v in block.variables]
    assert sorted(covered) == sorted(v.path for v in model.trainable_variables)
    assert len(covered) == len(set(covered))
    frozen = model.get_layer("frozen_conv")
    assert all(registration.block_of(v) is None for v in frozen.weights)
    report = registration.report()
    notes = {info["block"]: info["note"] for info in registration.describe()}
    assert "no structured block for PReLU" in notes[model.get_layer("prelu").path]
    assert "no structured block for BiasOnly" in notes[model.get_layer("bias_only").path]
    assert "frozen_conv" not in report and "diagonal fallback" in report


def test_zoo_trains_and_frozen_layer_stays_fixed():
    model = _zoo()
    x, y = _zoo_data()
    optimizer = kfac_keras.KFAC(learning_rate=0.01, damping=0.1, seed=0, cov_update_every=1)
    step = kfac_keras.make_train_step(
        model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    frozen = [w.numpy().copy() for w in model.get_layer("frozen_conv").weights]
    before = [v.numpy().copy() for v in model.trainable_variables]
    losses = [float(step(x, y)["loss"]) for _ in range(3)]
    assert np.all(np.isfinite(losses))
    for w, value in zip(model.get_layer("frozen_conv").weights, frozen):
        np.testing.assert_array_equal(w.numpy(), value)
    for v, value in zip(model.trainable_variables, before):
        assert not np.array_equal(v.numpy(), value), v.path


def test_diagonal_fallback_is_estimated_from_the_objective_gradient():
    """With `estimation_mode="empirical"` the statistics objective is
    `sum_n NLL_n(labels)` (sparse categorical: c_n = 1), so the fallback's
    first estimate is `(d/dalpha sum_n NLL_n)^2 / m`, computed here from a
    separate tape before the step."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4)).astype("float32")
    y = rng.integers(0, 3, size=(6,)).astype("int32")
    prelu = keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.3), name="prelu")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), prelu,
                              keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    with tf.GradientTape() as tape:
        total = loss(y, model(x))
    expected = tape.gradient(total, prelu.alpha).numpy() ** 2 / 6
    optimizer = kfac_keras.KFAC(learning_rate=0.01, seed=0, cov_update_every=1,
                                estimation_mode="empirical")
    step = kfac_keras.make_train_step(
        model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    step(x, y)
    block = optimizer.registration.block_of(prelu.alpha)
    assert block.kind == "diagonal"
    np.testing.assert_allclose(block.diagonal_factors[0].numpy(), expected, rtol=1e-4)
    assert np.abs(expected).max() > 0


def _choice_model():
    inputs = keras.Input((4, 6))
    attention = keras.layers.MultiHeadAttention(2, 3, name="attention")(inputs, inputs)
    x = keras.layers.LayerNormalization(name="norm")(attention)
    x = keras.layers.Dense(5, name="hidden")(keras.layers.Flatten()(x))
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def _kinds(model, **options):
    return _kind_by_layer(model, kfac_keras.register(model, **options))


def test_per_layer_choices_and_exclusions_take_effect():
    model = _choice_model()
    base = _kinds(model)
    assert base["hidden"] == DenseBlock.kind and base["query"] == EinsumDenseBlock.kind
    assert base["norm"] == SCALE_SHIFT_FULL

    kinds = _kinds(model, layer_blocks={"hidden": "diagonal"})
    assert kinds["hidden"] == "diagonal" and kinds["head"] == DenseBlock.kind

    kinds = _kinds(model, layer_blocks={"Dense": "diagonal", "head": "kronecker"})
    assert kinds["hidden"] == "diagonal" and kinds["head"] == DenseBlock.kind  # name beats class

    kinds = _kinds(model, layer_blocks={"attention": "diagonal"})  # a container: its sublayers
    assert {kinds[n] for n in ("query", "key", "value", "attention_output")} == {"diagonal"}

    kinds = _kinds(model, layer_blocks={"attention": "diagonal", "value": "auto"})
    assert kinds["value"] == EinsumDenseBlock.kind and kinds["key"] == "diagonal"

    kinds = _kinds(model, exclude_layers=["LayerNormalization", "head"])
    assert kinds["norm"] == "identity" and kinds["head"] == "identity"
    assert kinds["hidden"] == DenseBlock.kind


def test_excluded_layer_gets_the_plain_gradient():
    model = _choice_model()
    optimizer = kfac_keras.KFAC(learning_rate=0.01, seed=0, exclude_layers=["head"],
                                layer_blocks={"hidden": "diagonal"}, damping_mode="absolute")
    step = kfac_keras.make_train_step(model, optimizer, "mse")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 4, 6)).astype("float32")
    step(x, rng.normal(size=(4, 2)).astype("float32"))
    head = model.get_layer("head")
    grads = [tf.constant(rng.normal(size=v.shape).astype("float32"))
             for v in (head.kernel, head.bias)]
    out = optimizer.precondition(grads, [head.kernel, head.bias])
    for g, o in zip(grads, out):
        np.testing.assert_array_equal(g.numpy(), o.numpy())
    hidden = model.get_layer("hidden")
    block = optimizer.registration.block_of(hidden.kernel)
    g = tf.ones(hidden.kernel.shape)
    out, = optimizer.precondition([g], [hidden.kernel])
    np.testing.assert_allclose(
        out.numpy(), 1.0 / (block.diagonal_factors[0].numpy() + optimizer.total_damping().numpy()),
        rtol=1e-5)


def test_bad_names_and_kinds_raise():
    model = _choice_model()
    with pytest.raises(ValueError, match=r"match no layer name.*valid names: .*'Dense'.*'hidden'"):
        kfac_keras.register(model, layer_blocks={"hiden": "diagonal"})
    with pytest.raises(ValueError, match=r"`exclude_layers` names \['Conv2D'\]"):
        kfac_keras.register(model, exclude_layers=["Conv2D"])
    # Block kinds are validated once, by the optimizer's options.
    with pytest.raises(ValueError, match="must be one of"):
        kfac_keras.KFAC(layer_blocks={"hidden": "kfac"})
    with pytest.raises(ValueError, match="must be one of"):
        kfac_keras.KFAC(layer_blocks={"hidden": "full"})
    with pytest.raises(TypeError):
        kfac_keras.KFAC(layer_blocks=["hidden"])
    with pytest.raises(TypeError):
        kfac_keras.KFAC(exclude_layers="hidden")
    with pytest.raises(ValueError, match="both `layer_blocks` and `exclude_layers`"):
        kfac_keras.register(model, layer_blocks={"head": "diagonal"}, exclude_layers=["head"])


def test_public_register_validates_block_kinds_like_the_optimizer():
    """`kfac_keras.register` is public: a bad kind or type raises the error
    `KFAC(layer_blocks=...)` raises (the same validator), before any block
    is made."""
    model = _choice_model()
    for bad, error in (({"hidden": "kfac"}, ValueError), ({"hidden": None}, ValueError),
                       (["hidden"], TypeError), ({3: "diagonal"}, TypeError)):
        with pytest.raises(error) as from_optimizer:
            kfac_keras.KFAC(layer_blocks=bad)
        with pytest.raises(error) as from_register:
            kfac_keras.register(model, layer_blocks=bad)
        assert str(from_register.value) == str(from_optimizer.value)
    for bad in ("hidden", ["hidden", 3]):
        with pytest.raises(TypeError) as from_optimizer:
            kfac_keras.KFAC(exclude_layers=bad)
        with pytest.raises(TypeError) as from_register:
            kfac_keras.register(model, exclude_layers=bad)
        assert str(from_register.value) == str(from_optimizer.value)


def test_kronecker_request_without_a_kronecker_block_raises():
    inputs = keras.Input((4, 5))
    per_position = keras.layers.EinsumDense("abc,bcd->abd", (4, 3), name="per_position")(inputs)
    x = keras.layers.PReLU(name="prelu")(per_position)
    model = keras.Model(inputs, x)
    with pytest.raises(ValueError, match="PReLU.*Kronecker blocks exist for"):
        kfac_keras.register(model, layer_blocks={"prelu": "kronecker"})
    with pytest.raises(ValueError, match="per-location weights"):
        kfac_keras.register(model, layer_blocks={"per_position": "kronecker"})
    registration = kfac_keras.register(model)  # auto: both fall back
    assert {info["kind"] for info in registration.describe()} == {"diagonal"}


def test_subclass_overriding_call_falls_back_with_reason():
    class ScaledDense(keras.layers.Dense):
        def call(self, inputs):
            return 2.0 * super().call(inputs)

    model = keras.Sequential([keras.Input((3,)), ScaledDense(2, name="scaled")])
    registration = kfac_keras.register(model)
    info, = registration.describe()
    assert info["kind"] == "diagonal"
    assert "overrides `call`" in info["note"]


def test_every_kronecker_kind_keeps_its_block_under_ekfac():
    """EKFAC needs per-example rows; every Kronecker kind (embedding, conv,
    depthwise, Dense) provides them, so none falls back to a diagonal block."""
    tokens = keras.Input((5,), dtype="int32")
    s = keras.layers.Embedding(9, 4, name="embedding")(tokens)
    s = keras.layers.Reshape((5, 4, 1))(s)
    s = keras.layers.Conv2D(2, 2, name="conv")(s)
    s = keras.layers.DepthwiseConv2D(2, name="dw")(s)
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(s))
    model = keras.Model(tokens, out)
    registration = kfac_keras.register(model, inverse_method="ekfac")
    kinds = _kind_by_layer(model, registration)
    assert kinds == {"embedding": EmbeddingBlock.kind, "conv": ConvBlock.kind,
                     "dw": DepthwiseConvBlock.kind, "head": DenseBlock.kind}
    assert all(b.uses_eigenbasis_scalings for b in registration.blocks)
    optimizer = kfac_keras.KFAC(learning_rate=0.01, seed=0, inverse_method="ekfac",
                                cov_update_every=1)
    step = kfac_keras.make_train_step(model, optimizer, "mse")
    rng = np.random.default_rng(0)
    loss = step(rng.integers(0, 9, size=(4, 5)).astype("int32"),
                rng.normal(size=(4, 2)).astype("float32"))["loss"]
    assert np.isfinite(float(loss))


def test_shared_encoder_records_every_use_in_one_block():
    """A siamese model: one encoder (Conv2D + BatchNorm + Dense) applied to
    two inputs. Each layer has one block and the capture records two uses."""
    encoder = keras.Sequential([
        keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"), keras.layers.Flatten(),
        keras.layers.Dense(4, name="embed")], name="encoder")
    left, right = keras.Input((6, 6, 1)), keras.Input((6, 6, 1))
    out = keras.layers.Dense(1, name="head")(
        keras.layers.Concatenate()([encoder(left), encoder(right)]))
    model = keras.Model([left, right], out)
    registration = kfac_keras.register(model)
    kinds = _kind_by_layer(model, registration)
    assert kinds == {"conv": ConvBlock.kind, "bn": SCALE_SHIFT_FULL, "embed": DenseBlock.kind,
                     "head": DenseBlock.kind}
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(3, 6, 6, 1)).astype("float32") for _ in range(2)]
    with registration.capture() as recorder:
        model(x, training=True)
    for name in ("conv", "bn", "embed"):
        assert len(recorder.for_layer(encoder.get_layer(name))) == 2
    assert len(recorder.for_layer(model.get_layer("head"))) == 1
    optimizer = kfac_keras.KFAC(learning_rate=0.01, seed=0, cov_update_every=1)
    step = kfac_keras.make_train_step(model, optimizer, "mse")
    assert np.isfinite(float(step(x, rng.normal(size=(3, 1)).astype("float32"))["loss"]))


def test_block_contract_is_abstract_and_identity_is_a_block():
    """`FisherBlock` declares the pipeline abstractly; `IdentityBlock` is a
    real block (no state, plain gradient, no statistics)."""
    from kfac_keras.blocks.base import FisherBlock, StatisticsSource
    from kfac_keras.blocks.identity import IdentityBlock

    with pytest.raises(TypeError):
        FisherBlock("x", [])
    variable = keras.Variable(np.ones((2,), "float32"))
    block = IdentityBlock("x", [variable])
    assert isinstance(block, FisherBlock)
    assert block.statistics_source is StatisticsSource.NONE
    assert block.state_variables() == [] and not block.uses_eigenbasis_scalings
    grad = tf.constant([1.5, -2.0])
    np.testing.assert_array_equal(block.multiply_damped_inverse([grad], 0.1)[0].numpy(),
                                  grad.numpy())


def test_captured_call_hook_runs_the_layer_for_its_block():
    """A block that defines `captured_call` runs the layer's forward pass
    itself during capture; its records and output are what the wrapper uses."""
    from kfac_keras import capture

    layer = keras.layers.Dense(3, activation="relu", name="looped")
    layer.build((None, 2))

    class SelfCapturingDense(DenseBlock):
        def captured_call(self, original_call, recorder, args, kwargs):
            inputs = args[0]
            preactivation = tf.matmul(inputs, self.layer.kernel) + self.layer.bias
            recorder.record(self.layer, inputs, preactivation)
            return 10.0 * tf.nn.relu(preactivation)

    block = SelfCapturingDense(layer)
    wrapper = capture.capture_wrapper(layer, block)
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 2)).astype("float32"))
    expected_pre = x.numpy() @ layer.kernel.numpy() + layer.bias.numpy()
    wrapper.recorder = recorder = capture.Recorder()
    try:
        output = layer(x)
    finally:
        wrapper.recorder = None
    np.testing.assert_allclose(output.numpy(), 10.0 * np.maximum(expected_pre, 0), rtol=1e-6,
                               atol=1e-5)
    (inputs, pre), = recorder.for_layer(layer)
    np.testing.assert_allclose(pre.numpy(), expected_pre, rtol=1e-6, atol=1e-6)
    recorded, = recorder.outputs_for(layer)
    np.testing.assert_array_equal(recorded.numpy(), output.numpy())
    # Outside a capture the layer runs unchanged.
    np.testing.assert_allclose(layer(x).numpy(), np.maximum(expected_pre, 0), rtol=1e-6,
                               atol=1e-6)


def test_layering_has_no_import_cycle():
    """optimizer -> registration -> {chains -> capture, blocks}: blocks import
    only blocks, linalg and keras_internals (a leaf over Keras), capture
    imports no package module but that leaf, and the package's module graph
    has no cycle."""
    import ast
    import pathlib

    root = pathlib.Path(kfac_keras.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        if "examples" in path.parts:
            continue
        module = ".".join(("kfac_keras",) + path.relative_to(root).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    "kfac_keras"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    imports.add(full if (root / (full.replace(".", "/")[11:] + ".py")).exists()
                                else node.module)
            elif isinstance(node, ast.Import):
                imports.update(a.name for a in node.names if a.name.startswith("kfac_keras"))
        graph[module] = imports - {module}
    for module, imports in graph.items():
        if module.startswith("kfac_keras.blocks"):
            assert all(i.startswith("kfac_keras.blocks")
                       or i in ("kfac_keras.linalg", "kfac_keras.keras_internals")
                       for i in imports), (module, imports)
    assert graph["kfac_keras.keras_internals"] == set()
    assert graph["kfac_keras.capture"] <= {"kfac_keras.keras_internals"}
    assert "kfac_keras.registration" not in graph["kfac_keras.chains"]

    state = {}

    def visit(module, stack):
        state[module] = "open"
        for target in graph.get(module, ()):
            if target == "kfac_keras" or target not in graph:
                continue
            assert state.get(target) != "open", f"import cycle: {stack + [target]}"
            if target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in graph:
        if module != "kfac_keras" and module not in state:
            visit(module, [module])
