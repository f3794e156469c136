"""Dense NumPy check of the `"ortho_len"` rule's `"trust_mu"` length (S5-convex).

Runs a few eager steps of `StepRuleKFAC(step_rule="ortho_len",
length_rule="trust_mu")` on a tiny least-squares Dense layer (MSE, whose
Fisher is exactly the Gauss-Newton matrix `2/(n k) sum_n x~_n x~_n^T (x) I`),
records each step's inputs (preconditioned gradient `P`, gradient, previous
update, damping, learning rate, trust multiplier) and recomputes in NumPy:
the direction `u = -0.2 sqrt(max(rows, cols)) NS_3(P)` (own quintic
Newton-Schulz), the 2x2 system on `[u, 0.9 v]` with the dense Fisher, the
trust-region cut and the `lr / length_lr_ref` factor, the update, and the
next multiplier from the reduction ratio. Exits 1 on a relative error of
the direction or the multiplier above 1e-3, or of the update above
`max(1e-3, 1e-6 cond(C))` (the 2x2 system is solved in float32: when the new
direction is nearly parallel to the previous update, `C` is ill-conditioned)::

    python tools/step_efficiency/check_ortho_len.py
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

QUINTIC = (3.4445, -4.7750, 2.0315)


def numpy_newton_schulz(matrix, steps):
    a, b, c = QUINTIC
    x = matrix.T if matrix.shape[0] > matrix.shape[1] else matrix
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if matrix.shape[0] > matrix.shape[1] else x


def main():
    import keras
    import tensorflow as tf

    import kfac_keras
    from step_rules import StepRuleKFAC

    tf.config.run_functions_eagerly(True)
    rng = np.random.default_rng(3)
    n, d, k = 64, 4, 3
    x = (rng.standard_normal((n, d)) * np.logspace(0, 1, d)).astype("float32")
    y = (x @ rng.standard_normal((d, k)) + 0.1 * rng.standard_normal((n, k))).astype("float32")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((d,))
    model = keras.Model(inputs, keras.layers.Dense(k)(inputs))
    optimizer = StepRuleKFAC(step_rule="ortho_len", length_rule="trust_mu", ns_steps=3,
                             trust_init=10.0, learning_rate=0.02, seed=0)
    records = []
    original_direction = optimizer._ortho_direction
    original_length = optimizer._length_deltas

    def direction(block, members, precond):
        out = original_direction(block, members, precond)
        records.append({"P": block.grads_to_matrix([precond[i] for i in members]).numpy(),
                        "D": block.grads_to_matrix(out).numpy()})
        return out

    def length(u, p, grads, variables, batch, lr):
        out = original_length(u, p, grads, variables, batch, lr)
        block = optimizer._registration.blocks[0]
        records[-1].update(
            g=block.grads_to_matrix(grads).numpy().astype(np.float64),
            p=block.grads_to_matrix(p).numpy().astype(np.float64),
            delta=block.grads_to_matrix(out[0]).numpy().astype(np.float64),
            w=block.grads_to_matrix([v.numpy() for v in variables]).numpy().astype(np.float64),
            m=float(optimizer.trust_multiplier.numpy()), lr=float(lr.numpy()),
            damping=float(optimizer.total_damping().numpy()))
        return out

    optimizer._ortho_direction = direction
    optimizer._length_deltas = length
    step = kfac_keras.make_train_step(model, optimizer, loss=keras.losses.MeanSquaredError())
    for _ in range(4):
        step(tf.constant(x), tf.constant(y))
        records[-1]["m_after"] = float(optimizer.trust_multiplier.numpy())
    xb = np.concatenate([x.astype(np.float64), np.ones((n, 1))], axis=1)

    def fisher(a, b):  # u^T F v of the MSE loss (mean over n and k)
        return 2.0 / (n * k) * np.sum((xb @ a) * (xb @ b))

    def loss(w):
        return np.mean((xb @ w - y) ** 2)

    worst = 0.0
    for i, r in enumerate(records):
        rows, cols = r["P"].shape
        u = -0.2 * np.sqrt(max(rows, cols)) * numpy_newton_schulz(r["P"].astype(np.float64), 3)
        p, g, lam = r["p"], r["g"], r["damping"]
        c = np.array([[fisher(u, u) + lam * np.sum(u * u), fisher(u, p) + lam * np.sum(u * p)],
                      [fisher(u, p) + lam * np.sum(u * p), fisher(p, p) + lam * np.sum(p * p)]])
        b = np.array([np.sum(g * u), np.sum(g * p)])
        ts = np.linalg.solve(c, -b) if np.sum(p * p) > 0 else np.array([-b[0] / c[0, 0], 0.0])
        best = ts[0] * u + ts[1] * p
        radius = 0.2 * r["m"] * 1e-2
        cut = min(1.0, radius / np.sqrt(np.mean(best ** 2)))
        delta = (r["lr"] / 1e-2) * cut * best
        error = np.linalg.norm(delta - r["delta"]) / np.linalg.norm(delta)
        predicted = np.sum(g * delta) + 0.5 * fisher(delta, delta)
        rho = (loss(r["w"] + delta) - loss(r["w"])) / predicted
        m = r["m"]
        m_next = m * 2.0 if (rho > 0.75 and cut < 1.0) else m
        m_next = m / 2.0 if rho < 0.25 else m_next
        m_next = min(max(m_next, 1.0), 1e6)
        direction_error = np.linalg.norm(u + r["D"]) / np.linalg.norm(u)
        condition = np.linalg.cond(c) if np.sum(p * p) > 0 else 1.0
        tolerance = max(1e-3, 1e-6 * condition)
        print(f"step {i + 1}: direction rel. error {direction_error:.2e}, update rel. error "
              f"{error:.2e} (cond(C) {condition:.3g}, tolerance {tolerance:.2g}), cut {cut:.3g}, rho {rho:.4f}, m {m:g} -> {r['m_after']:g} "
              f"(NumPy {m_next:g})")
        worst = max(worst, error / tolerance * 1e-3, direction_error,
                    abs(m_next - r["m_after"]) / m_next)
    print(f"worst relative error (update errors in units of their tolerance x 1e-3) {worst:.2e}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
