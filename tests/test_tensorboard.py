"""K-FAC's logged values reach TensorBoard (installed by the `test` and `examples` extras)."""

import os

import keras
import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import kfac_keras


def _scalar_tags(log_dir):
    tags = {}
    for root, _, files in os.walk(log_dir):
        for name in files:
            events = event_accumulator.EventAccumulator(
                os.path.join(root, name), size_guidance={"tensors": 0})
            events.Reload()
            for tag in events.Tags()["tensors"]:
                if not tag.startswith("epoch_"):
                    continue
                tags[tag] = [float(tf.make_ndarray(event.tensor_proto))
                             for event in events.Tensors(tag)]
    return tags


def test_kfac_values_are_written_for_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(2)])
    model.compile(optimizer=kfac_keras.KFAC(),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0,
                        callbacks=[kfac_keras.KFACCallback(),
                                   keras.callbacks.TensorBoard(str(tmp_path))])
    tags = _scalar_tags(tmp_path)
    for name in ("damping", "step_size", "update_norm", "rho", "kfac_skipped_steps"):
        assert f"epoch_{name}" in tags, sorted(tags)
        assert len(tags[f"epoch_{name}"]) == 2
    # What TensorBoard shows is what History holds (the epoch means).
    np.testing.assert_allclose(tags["epoch_damping"], history.history["damping"], rtol=1e-6)
    np.testing.assert_allclose(tags["epoch_step_size"], history.history["step_size"], rtol=1e-6)
