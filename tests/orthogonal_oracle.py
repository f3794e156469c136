"""NumPy oracles of the orthogonal step rule (float64), shared by its tests.

Independent of kfac_keras: Muon's quintic Newton-Schulz written out, and a
dense K-FAC of a two-layer tanh network (empirical Fisher from the batch,
factored Tikhonov damping) giving each layer's preconditioned `[K; b]`.
"""

import keras
import numpy as np

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's quintic, written out independently


def numpy_newton_schulz(matrix, iterations):
    """`NS_k(P)` from `P / ||P||_F`, float64."""
    a, b, c = COEFFICIENTS
    x = np.asarray(matrix, np.float64)
    x = x / np.linalg.norm(x)
    for _ in range(iterations):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def numpy_direction(matrix, iterations=3):
    """`0.2 sqrt(max(rows, cols)) NS_k(P)`: Keras Muon's scale."""
    return 0.2 * np.sqrt(max(np.shape(matrix))) * numpy_newton_schulz(matrix, iterations)


def two_layer_model(seed=0):
    """Dense(5, tanh) -> Dense(3) on 4 inputs, seeded."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(hidden))


def numpy_preconditioned(weights, x, y, damping):
    """Each layer's `(A + pi gamma I)^-1 [dK; db] (G + gamma/pi I)^-1` for the
    softmax cross-entropy of `two_layer_model` with `weights = [K1, b1, K2, b2]`
    on the batch `(x, y)`: factors from this batch's inputs and per-example
    output gradients (the empirical Fisher), `gamma = sqrt(damping)`."""
    k1, b1, k2, b2 = weights
    n = len(x)
    hidden = np.tanh(x @ k1 + b1)
    logits = hidden @ k2 + b2
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    g2 = probs - np.eye(3)[y]                   # d l_n / d s2, per example
    g1 = (g2 @ k2.T) * (1.0 - hidden ** 2)      # d l_n / d s1
    matrices = []
    for inputs, grads in ((x, g1), (hidden, g2)):
        abar = np.concatenate([inputs, np.ones((n, 1))], axis=1)
        a_factor = abar.T @ abar / n
        g_factor = grads.T @ grads / n
        gradient = abar.T @ grads / n            # the batch-mean loss's [dK; db]
        pi = np.sqrt((np.trace(a_factor) / len(a_factor)) / (np.trace(g_factor) / len(g_factor)))
        gamma = np.sqrt(damping)
        matrices.append(np.linalg.inv(a_factor + pi * gamma * np.eye(len(a_factor)))
                        @ gradient @ np.linalg.inv(g_factor + gamma / pi * np.eye(len(g_factor))))
    return matrices


def augmented(weights):
    """`[K1; b1], [K2; b2]` from `[K1, b1, K2, b2]`."""
    return [np.concatenate([weights[0], weights[1][None]], 0),
            np.concatenate([weights[2], weights[3][None]], 0)]
