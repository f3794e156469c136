"""Device-aware linear algebra for K-FAC factors.

Decompositions of the Kronecker factors (inverse, Cholesky, symmetric
eigendecomposition) are the expensive, infrequent part of K-FAC. Where they run
matters: on CPU, XLA's `eigh` is about 100x slower than TensorFlow's own kernel
(and Cholesky/inverse 2-3x slower), so on CPU they must run outside any XLA
cluster; on GPU, XLA calls cuSOLVER and should be used. `decomposition_jit`
makes that decision from the visible devices, and every function here works
both inside and outside XLA.
"""

import tensorflow as tf

#: `"ekfac"` (George et al. 2018) is the `"eigh"` eigenbasis with a re-estimated
#: diagonal; see `kfac_keras.blocks.kronecker`.
INVERSE_METHODS = ("cholesky", "inverse", "eigh", "ekfac")


def gpu_available():
    """Returns True if TensorFlow sees at least one GPU."""
    return bool(tf.config.list_logical_devices("GPU"))


def decomposition_jit(setting="auto"):
    """Whether factor decompositions should be XLA-compiled.

    Args:
        setting: `"auto"` (default) compiles on GPU and not on CPU; `True` or
            `False` force the choice (used by tests to exercise both paths).
            Validated by the optimizer's options.

    Returns:
        A Python bool.
    """
    if setting == "auto":
        return gpu_available()
    return bool(setting)


def symmetrize(matrix):
    """Returns `(M + M^T) / 2`, removing round-off asymmetry."""
    return 0.5 * (matrix + tf.linalg.matrix_transpose(matrix))


def mean_diagonal(matrix):
    """Mean of the diagonal entries, `tr(M) / dim(M)` (per matrix of a batch)."""
    return tf.reduce_mean(tf.linalg.diag_part(matrix), axis=-1)


def trace_ratio_pi(input_mean_trace, output_mean_trace, min_value=1e-12):
    """`pi = sqrt(input_mean_trace / output_mean_trace)`, both floored at
    `min_value` so a factor that is exactly zero (dead units, an output that
    receives no gradient) gives a finite `pi`."""
    return tf.sqrt(tf.maximum(input_mean_trace, min_value)
                   / tf.maximum(output_mean_trace, min_value))


def pi_adjustment(input_factor, output_grad_factor, min_value=1e-12):
    """The factored-Tikhonov split `pi = sqrt((tr(A)/dim A) / (tr(G)/dim G))`.

    Martens & Grosse 2015, section 6.3; one value per matrix of a batch. See
    `trace_ratio_pi` for the floor.
    """
    return trace_ratio_pi(mean_diagonal(input_factor), mean_diagonal(output_grad_factor),
                          min_value)


def damped_inverse(matrix, damping, method="cholesky"):
    """Returns `(M + damping * I)^{-1}` for a symmetric PSD matrix `M`.

    Args:
        matrix: square symmetric positive semi-definite float32 matrix.
        damping: positive scalar added to the diagonal before inverting, so
            the matrix is positive definite and no singular matrix is ever
            inverted.
        method: `"cholesky"` (default; Cholesky factorization then two
            triangular solves) or `"inverse"` (LU-based `tf.linalg.inv`).

    Returns:
        The inverse, symmetrized.
    """
    dim = tf.shape(matrix)[-1]
    damped = symmetrize(matrix) + damping * tf.eye(dim, dtype=matrix.dtype)
    if method == "cholesky":
        chol = tf.linalg.cholesky(damped)
        inverse = tf.linalg.cholesky_solve(chol, tf.eye(dim, dtype=matrix.dtype))
    elif method == "inverse":
        inverse = tf.linalg.inv(damped)
    else:
        raise ValueError(
            f"`method` must be 'cholesky' or 'inverse'; received {method!r}."
        )
    return symmetrize(inverse)


def clipped_eigh(matrix):
    """Eigendecomposition of a symmetric PSD matrix with eigenvalues >= 0.

    Returns:
        `(eigenvalues, eigenvectors)`, with negative round-off eigenvalues set
        to zero, so `M ~= Q diag(d) Q^T` with `d >= 0`.
    """
    eigenvalues, eigenvectors = tf.linalg.eigh(symmetrize(matrix))
    return tf.maximum(eigenvalues, 0.0), eigenvectors

