"""K-FAC under `tf.distribute.MirroredStrategy` with two replicas.

Multi-replica training is not supported yet: K-FAC's periodic work and its
non-finite guards run inside `tf.cond`, where MirroredStrategy (CPU and
multi-GPU without XLA) cannot `merge_call` (all-reduce the factor statistics,
or update mirrored variables through the Keras optimizer). These tests pin
the current contract: both entry points (`fit` with `KFACCallback`, and
`make_train_step` for custom loops) refuse a 2-replica strategy with a
`NotImplementedError` that says so, before the optimizer creates any K-FAC
state, instead of failing inside the first step.

The two logical CPU devices must be configured before TensorFlow initialises
its devices, so the scenario runs in a fresh Python subprocess (pytest-xdist
workers import other test modules, which touch TensorFlow first).
"""

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(r'''
    import os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    import keras
    import kfac_keras

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")

    def build():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer=kfac_keras.KFAC(seed=0),
                      loss="sparse_categorical_crossentropy")
        return model

    def expect_refusal(run, where):
        try:
            run()
        except NotImplementedError as error:
            message = str(error)
            assert "MirroredStrategy with 2 replicas" in message, message
            print("REFUSED", where)
            return
        raise AssertionError(f"{where}: no NotImplementedError")

    with strategy.scope():
        model = build()
        expect_refusal(lambda: kfac_keras.make_train_step(model), "custom_loop_in_scope")
        assert model.optimizer.registration is None  # refused before attach
    # Outside the scope, the model still belongs to the strategy.
    expect_refusal(lambda: kfac_keras.make_train_step(model), "custom_loop_outside_scope")
    assert model.optimizer.registration is None

    with strategy.scope():
        model = build()
    expect_refusal(lambda: model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                                     callbacks=[kfac_keras.KFACCallback(verbose=0)]), "fit")
    assert model.optimizer.registration is None
    print("ALL DONE")
''')


def test_two_replica_mirrored_strategy_is_refused_clearly():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for where in ("custom_loop_in_scope", "custom_loop_outside_scope", "fit"):
        assert f"REFUSED {where}" in result.stdout, result.stdout
    assert "ALL DONE" in result.stdout
