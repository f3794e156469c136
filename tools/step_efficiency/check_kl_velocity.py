"""Dense check of the `"kl_velocity"` rule's carried quadratic `v^T C v`.

On a tiny Dense model with the curvature frozen after step 0 (statistics and
inverses due only at step 0), `C^{-1}` is built column by column by calling
`precondition` on basis vectors, inverted densely with NumPy, and
`v^T C v` of the velocity actually taken is compared with the rule's carried
`velocity_quadratic` after every step; the applied scale is checked against
`min(1, lr sqrt(c / (u^T C u)))` computed densely from `u = mu v - lr P`.
Prints the largest relative errors; exits 1 if one exceeds 1e-3.

    PYTHONPATH=. python tools/step_efficiency/check_kl_velocity.py
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kfac_keras  # noqa: E402
from step_rules import StepRuleKFAC  # noqa: E402


def flat(tensors):
    return np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in tensors])


def main():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.integers(0, 3, size=64)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    lr, bound = 0.5, 1e-3
    optimizer = StepRuleKFAC(step_rule="kl_velocity", kl_bound=bound, learning_rate=lr,
                             momentum=0.9, adaptive=None, cov_update_every=10**6,
                             inv_update_every=10**6, seed=0)
    step = tf.function(kfac_keras.make_train_step(model, optimizer, loss=loss))
    variables = model.trainable_variables
    shapes = [v.shape for v in variables]
    sizes = [int(np.prod(s)) for s in shapes]

    def unflat(vector):
        parts, start = [], 0
        for shape, size in zip(shapes, sizes):
            parts.append(tf.constant(vector[start:start + size].reshape(shape), tf.float32))
            start += size
        return parts

    step(x, y)  # step 0: statistics and inverses, then frozen
    n = sum(sizes)
    inverse = np.stack([flat(optimizer.precondition(unflat(np.eye(n)[i]), variables))
                        for i in range(n)], axis=1)
    curvature = np.linalg.inv(0.5 * (inverse + inverse.T))
    worst_carried = worst_scale = 0.0
    for k in range(12):
        batch = rng.choice(64, 32, replace=False)
        xb, yb = x[batch], y[batch]
        previous = flat([optimizer.velocities[optimizer._get_variable_index(v)] for v in variables])
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb))
        grads = flat(tape.gradient(value, variables))
        precond = inverse @ grads
        raw = 0.9 * previous - lr * precond
        expected_scale = min(1.0, lr * np.sqrt(bound / (raw @ curvature @ raw)))
        step(xb, yb)
        taken = flat([optimizer.velocities[optimizer._get_variable_index(v)] for v in variables])
        dense = taken @ curvature @ taken
        carried = float(optimizer.velocity_quadratic.numpy())
        scale = float(optimizer.effective_step.numpy()) / lr
        worst_carried = max(worst_carried, abs(carried - dense) / dense)
        worst_scale = max(worst_scale, abs(scale - expected_scale) / expected_scale)
        print(f"step {k + 1}: v^T C v dense {dense:.6g} carried {carried:.6g}; "
              f"scale dense {expected_scale:.6g} rule {scale:.6g}")
    print(f"largest relative error: carried {worst_carried:.2e}, scale {worst_scale:.2e}")
    return 0 if max(worst_carried, worst_scale) < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
