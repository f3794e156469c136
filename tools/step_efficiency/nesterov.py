"""Nesterov momentum for `kfac_keras.KFAC` (issue 12; RESULTS.md S8-nesterov).

`NesterovKFAC(nesterov=True, **KFAC options)` is `kfac_keras.KFAC` whose
`update_step` (the momentum applied after the step rule, e.g. after the
orthogonal rule's Newton-Schulz) is Nesterov's, as Keras's SGD/Muon do it:

    v <- mu v - lr g
    w <- w + mu v - lr g          (the library: w <- w + v)

with `mu = self.current_momentum()`, `g` the step rule's direction and the
velocity slot the library's own (`keras_internals.optimizer_slot(self,
self.velocities, variable)`). `nesterov=False` is the library's heavy ball,
bit for bit. Nothing else changes; note that the library's `apply` still
hands the velocity `v` (not the Nesterov displacement) to the damping
adaptation's `after_update` and to the `update_norm` diagnostic.

Self-check (`python tools/step_efficiency/nesterov.py`): one variable, three
fixed gradients fed to `update_step`, against a NumPy Nesterov recurrence
(and the heavy-ball one for `nesterov=False`).
"""

import os
import sys

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import tensorflow as tf  # noqa: E402

import kfac_keras  # noqa: E402
from kfac_keras import keras_internals  # noqa: E402


class NesterovKFAC(kfac_keras.KFAC):
    """`kfac_keras.KFAC` with Nesterov momentum in `update_step`.

    Args:
        nesterov: bool; Nesterov (`w += mu v - lr g` after `v <- mu v - lr g`)
            or the library's heavy ball (`w += v`).
        **kwargs: `kfac_keras.KFAC` options.
    """

    def __init__(self, nesterov=True, **kwargs):
        super().__init__(**kwargs)
        self.nesterov = bool(nesterov)

    def update_step(self, gradient, variable, learning_rate):
        """Momentum update with the already preconditioned gradient."""
        learning_rate = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        momentum = tf.cast(self.current_momentum(), variable.dtype)
        velocity = keras_internals.optimizer_slot(self, self.velocities, variable)
        self.assign(velocity, momentum * velocity - learning_rate * gradient)
        if self.nesterov:
            self.assign_add(variable, momentum * velocity - learning_rate * gradient)
        else:
            self.assign_add(variable, velocity)

    def get_config(self):
        config = super().get_config()
        config["nesterov"] = self.nesterov
        return config


def check_recurrence(steps=3, learning_rate=0.1, momentum=0.9, seed=0):
    """Max abs error of `update_step` against NumPy (Nesterov and heavy ball)
    on one 3x2 variable fed `steps` fixed gradients."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((3, 2)).astype(np.float32)
    grads = [rng.standard_normal((3, 2)).astype(np.float32) for _ in range(steps)]
    errors = {}
    for nesterov in (True, False):
        variable = tf.Variable(w0)
        opt = NesterovKFAC(nesterov=nesterov, learning_rate=learning_rate, momentum=momentum)
        opt.build([variable])
        w, v = w0.astype(np.float64), np.zeros_like(w0, dtype=np.float64)
        err = 0.0
        for g in grads:
            opt.update_step(tf.constant(g), variable, learning_rate)
            v = momentum * v - learning_rate * g
            w = w + (momentum * v - learning_rate * g if nesterov else v)
            err = max(err, float(np.max(np.abs(variable.numpy() - w))))
        errors["nesterov" if nesterov else "heavy_ball"] = err
        config = opt.get_config()
        assert config["nesterov"] is nesterov, config
        assert NesterovKFAC.from_config(config).nesterov is nesterov
    return errors


if __name__ == "__main__":
    errors = check_recurrence()
    print("max |update_step - NumPy| over 3 steps:", errors)
    ok = all(e < 1e-6 for e in errors.values())
    print("OK" if ok else "FAIL")
    sys.exit(0 if ok else 1)
