"""`KFACCallback`: the one line that makes `model.fit` train with K-FAC."""

import keras

from kfac_keras import distributed
from kfac_keras.optimizer import KFAC
from kfac_keras.training import KFACTrainStep


class KFACCallback(keras.callbacks.Callback):
    """Connects a compiled model's `fit` to its `kfac_keras.KFAC` optimizer.

    At the start of `fit` it registers the model's layers with the optimizer
    (printing the registration report once when `verbose`), and swaps the
    model's train step for `KFACTrainStep`, which captures layer inputs and
    pre-activation gradients in the forward pass. At the end of `fit` it
    restores the model's own train step, so `evaluate`, `predict` and a later
    `fit` without the callback behave as usual (the latter raises the
    optimizer's "add KFACCallback" error).

    `jit_compile`: the model's setting is honoured for the forward/backward
    pass and the update; factor decompositions always run outside XLA on CPU
    (XLA's CPU `eigh` is ~100x slower) and inside it on GPU. To do that the
    callback compiles those parts itself and runs Keras's outer step function
    without XLA during `fit`.

    Mixed precision: under the `"mixed_float16"` policy `model.compile`
    wraps KFAC in a `keras.optimizers.LossScaleOptimizer`; the callback
    trains the wrapped KFAC and keeps the dynamic loss scaling
    (`KFACTrainStep`). Under a `tf.distribute` strategy with more than one
    replica (compile and fit inside `strategy.scope()`), the step all-reduces
    gradients every step and factor statistics every `cov_update_every`
    steps (`kfac_keras.distributed`) and runs without XLA.

    Args:
        verbose: 0 or 1; with 1 (default) print the registration report the
            first time the model is registered.
    """

    def __init__(self, verbose=1):
        super().__init__()
        if verbose not in (0, 1):
            raise ValueError(f"`verbose` must be 0 or 1; received {verbose!r}.")
        self.verbose = verbose
        self._requested_jit = None

    def on_train_begin(self, logs=None):
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # mixed_float16: compile wrapped KFAC; KFACTrainStep keeps the
            # dynamic loss scaling.
            optimizer = optimizer.inner_optimizer
        if not isinstance(optimizer, KFAC):
            raise TypeError(
                "KFACCallback needs a model compiled with "
                "`optimizer=kfac_keras.KFAC(...)`; this model's optimizer is "
                f"{type(optimizer).__name__}.")
        first_time = optimizer.registration is None
        self._requested_jit = bool(model.jit_compile)
        step = KFACTrainStep(
            model, model.optimizer,
            jit_compile=(self._requested_jit and not model.run_eagerly
                         and distributed.multi_replica_strategy(model) is None))
        if self.verbose and first_time:
            print(optimizer.registration.report())
        model.train_step = step.keras_train_step
        model.jit_compile = False
        model.make_train_function(force=True)

    def on_train_end(self, logs=None):
        model = self.model
        model.__dict__.pop("train_step", None)
        if self._requested_jit is not None:
            model.jit_compile = self._requested_jit
        model.train_function = None
