"""The small CNN and Transformer encoder train under `model.fit` with K-FAC,
and their registration reports list the expected block for every trainable
variable (expected kinds written out by hand per layer)."""

import keras
import numpy as np
import kfac_keras
from kfac_keras.blocks.conv import ConvBlock
from kfac_keras.blocks.dense import DenseBlock
from kfac_keras.blocks.einsum_dense import EinsumDenseBlock
from kfac_keras.blocks.embedding import EmbeddingBlock
from benchmarks import small_models

SCALE_SHIFT = "scale-shift (2x2 per entry)"


def _kinds_by_variable(model):
    registration = model.optimizer.registration
    notes = {}
    kinds = {}
    for variable in model.trainable_variables:
        block = registration.block_of(variable)
        kinds[variable.path] = block.kind
        notes[variable.path] = getattr(block, "registration_note", "")
    return kinds, notes


def _fit(model, x, y, epochs, **kfac_options):
    options = dict(learning_rate=0.02, damping=0.3, seed=1, adaptive=None, norm_constraint=None)
    options.update(kfac_options)
    model.compile(optimizer=kfac_keras.KFAC(**options),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model.fit(x, y, batch_size=64, epochs=epochs, shuffle=False, verbose=0,
                     callbacks=[kfac_keras.KFACCallback(verbose=0)]).history


def test_small_cnn_trains_with_fit_and_reports_its_blocks():
    model = small_models.small_cnn()
    x, y = small_models.random_image_data(256)
    history = _fit(model, x, y, epochs=4)
    losses = history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses
    kinds, _ = _kinds_by_variable(model)
    expected = {
        "conv1/kernel": ConvBlock.kind, "bn1/gamma": SCALE_SHIFT, "bn1/beta": SCALE_SHIFT,
        "conv2/kernel": ConvBlock.kind, "bn2/gamma": SCALE_SHIFT, "bn2/beta": SCALE_SHIFT,
        "logits/kernel": DenseBlock.kind, "logits/bias": DenseBlock.kind,
    }
    assert kinds == expected
    # Every block received statistics (no factor stayed at its zero init).
    for block in model.optimizer.registration.blocks:
        assert any(np.abs(v.numpy()).max() > 0 for v in block.state_variables()), block.name


def _transformer_expected():
    projections = {f"attention/{name}/{var}": EinsumDenseBlock.kind
                   for name in ("query", "key", "value", "attention_output")
                   for var in ("kernel", "bias")}
    return {
        "token_embedding/embeddings": EmbeddingBlock.kind,
        "position_embedding/position_table": "diagonal",
        **projections,
        "attention_norm/gamma": SCALE_SHIFT, "attention_norm/beta": SCALE_SHIFT,
        "feed_forward_1/kernel": DenseBlock.kind, "feed_forward_1/bias": DenseBlock.kind,
        "feed_forward_2/kernel": DenseBlock.kind, "feed_forward_2/bias": DenseBlock.kind,
        "feed_forward_norm/gamma": SCALE_SHIFT, "feed_forward_norm/beta": SCALE_SHIFT,
        "logits/kernel": DenseBlock.kind, "logits/bias": DenseBlock.kind,
    }


def test_small_transformer_trains_with_fit_and_reports_its_blocks():
    model = small_models.small_transformer()
    x, y = small_models.random_token_data(256)
    history = _fit(model, x, y, epochs=4)
    losses = history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses
    kinds, notes = _kinds_by_variable(model)
    assert kinds == _transformer_expected()
    assert "no structured block for PositionEmbedding" in notes[
        "position_embedding/position_table"]


def test_transformer_step_runs_eagerly_and_updates_every_variable():
    """A custom loop without tf.function (eager): the LayerNorm captures use
    forward-mode differentiation, which must not cut the gradient tape."""
    model = small_models.small_transformer(sequence_length=6, model_dim=8, feed_forward_dim=8)
    x, y = small_models.random_token_data(32, sequence_length=6)
    optimizer = kfac_keras.KFAC(learning_rate=0.02, damping=0.3, seed=1, cov_update_every=1)
    step = kfac_keras.make_train_step(
        model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    assert np.isfinite(float(step(x, y)["loss"]))
    for variable in model.trainable_variables:
        assert not np.array_equal(variable.numpy(), before[variable.path]), variable.path
    norm = model.get_layer("attention_norm")
    block = optimizer.registration.block_of(norm.gamma)
    assert block.scale_moment.numpy().max() > 0 and block.shift_moment.numpy().max() > 0
