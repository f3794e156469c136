"""Cheaper orthogonalisations for the orthogonal step rule (issue 12's 2x budget; RESULTS.md S7-polar).

`CheapPolarKFAC(polar={...}, **KFAC options)` is `kfac_keras.KFAC` whose
orthogonal step replaces `step_rules.orthogonal_direction` (Muon's quintic
Newton-Schulz on every Kronecker matrix `P`, every step) by a variant; the
rest of the rule (which blocks are orthogonalised, the Newton bound, the
KL-clipped step of the others, the Embedding factor, momentum after) is the
library's, because the library's own `OrthogonalStep.directions` runs with
only that one function swapped for the duration of the call.

Variants (`polar["kind"]`):

* `"cached"`: the exact polar factor from a right factor refreshed every
  `refresh_every` steps. Each matrix is taken on its tall side `T` (rows >=
  cols = n, the smaller dimension). On a refresh step (the optimizer's
  iteration count a multiple of `refresh_every`, the first step included):
  `T^T T = V diag(s) V^T` (`tf.linalg.eigh`; the step runs without XLA on
  CPU, where XLA's eigh is ~100x slower, KFAC_NOTES section 9),
  `R = V diag(1 / sqrt(s + eps)) V^T` with `eps = relative_eps * max(s)`,
  kept in a variable, and the direction is `T R` (the polar factor `U V^T`
  where `s >> eps`; directions with `s` below `eps` are damped instead of
  blown up). Its Frobenius norm (`sqrt` of the number of singular values
  well above `sqrt(eps)`: the polar factor's norm, `sqrt(n)` at full rank) is
  kept too. On the other steps the direction is `T_t R_cached`, rescaled to
  that kept norm (the polar factor's length; `T_t R_cached` is not
  orthogonal once `P` has moved). With `polish=True` one cubic Newton-Schulz
  iteration `X <- X (3 I - X^T X) / 2` follows on non-refresh steps (two
  `m n^2` products; it converges to the polar factor from near-orthogonal
  `X`, unlike Muon's quintic, whose fixed point is not 1). Cost per non-refresh
  step: one `m n^2` product (`T R`), against `3 (2 m n^2 + n^3)` for the
  default's three quintic iterations (the code iterates on the short side).
* `"ema"`: the right factor of an exponential moving average of the
  normalised Gram matrices, `Gbar <- beta Gbar + (1 - beta) T^T T / ||T||_F^2`
  (the first accumulation counts fully), accumulated every `gram_every`
  steps, eigendecomposed every `refresh_every` steps into
  `R = V diag(1 / sqrt(s + eps)) V^T`; every step's direction is `T_t R`,
  rescaled to the Frobenius norm `sqrt(sum s / (s + eps))` (the polar
  factor's norm, `sqrt(n)` at full rank). Why: a right factor of one batch's
  `P` goes stale at once (`"cached"` diverges, as session 4's reused
  Newton-Schulz scaling did, RESULTS.md section 7: it multiplies the new
  `P`'s components along the old batch's small singular directions by up to
  `1 / sqrt(eps)`), while an average over batches changes slowly, so a
  factor of it stays valid between refreshes. This is one-sided Shampoo
  (exponent -1/2) on the preconditioned gradient rather than a polar factor
  per step. Cost per step: `T R` plus, every `gram_every` steps, `T^T T`.
* `"split"`: Muon's quintic Newton-Schulz as the library does it, with
  `large_iterations` iterations for matrices whose smaller dimension is
  `>= large_min_dim` (the four big matrices of the autoencoder carry 96% of
  the Newton-Schulz flops, RESULTS.md S5-cost) and the optimizer's
  `orthogonal_iterations` for the rest.

Either way the direction is then `0.2 sqrt(max(rows, cols))` times the
(near-)orthogonal matrix, the library's scale (Keras Muon's RMS 0.2).
"""

import math

import tensorflow as tf

import kfac_keras
from kfac_keras import orthogonal_step, step_rules

POLAR_KINDS = ("cached", "split", "ema")


def _tall(matrix):
    """`(matrix on its tall side, whether it was transposed)`."""
    if matrix.shape[-2] < matrix.shape[-1]:
        return tf.linalg.matrix_transpose(matrix), True
    return matrix, False


def inverse_square_root(gram, relative_eps):
    """`V diag(1 / sqrt(s + eps)) V^T` of a symmetric PSD `gram` (`..., n, n`),
    `eps = relative_eps * max(s)` per matrix (the smallest float32 normal
    number when `gram` is zero, so a zero matrix gives a zero direction)."""
    values, vectors = tf.linalg.eigh(gram)
    values = tf.maximum(values, 0.0)  # rounding gives tiny negatives
    eps = tf.maximum(relative_eps * tf.reduce_max(values, axis=-1, keepdims=True), 1.2e-38)
    scaled = vectors * tf.math.rsqrt(values + eps)[..., None, :]
    return tf.matmul(scaled, vectors, transpose_b=True)


def cubic_newton_schulz(x):
    """One iteration `X (3 I - X^T X) / 2` on a tall `X` (`..., m, n`)."""
    gram = tf.matmul(x, x, transpose_a=True)
    return 1.5 * x - 0.5 * tf.matmul(x, gram)


def orthogonalised_matrix_shapes(blocks):
    """The shape of each Kronecker matrix the orthogonal rule orthogonalises, in the
    order `OrthogonalStep.directions` meets them (blocks in order; Embedding tables
    and blocks without Kronecker matrices are skipped, as the library does)."""
    shapes = []
    for block in blocks:
        if block.lookup_table:
            continue
        matrices = block.kronecker_matrices([tf.zeros(v.shape, tf.float32)
                                             for v in block.variables])
        shapes.extend(tuple(m.shape) for m in matrices or ())
    return shapes


class MatrixDirectionStep(orthogonal_step.OrthogonalStep):
    """The library's `OrthogonalStep` with only the per-matrix direction swapped:
    during `directions`, `step_rules.orthogonal_direction` is `self._matrix_direction`
    (called once per orthogonalised matrix, in `orthogonalised_matrix_shapes` order,
    `self._position` counting them), so blocks, bound, KL-clipped rest, Embedding
    factor and momentum stay the library's."""

    def _matrix_direction(self, matrix, iterations, dtype="float32"):
        raise NotImplementedError

    def directions(self, *args, **kwargs):
        self._position = 0
        original = step_rules.orthogonal_direction
        step_rules.orthogonal_direction = self._matrix_direction
        try:
            return super().directions(*args, **kwargs)
        finally:
            step_rules.orthogonal_direction = original


class CheapPolarStep(MatrixDirectionStep):
    """`OrthogonalStep` with the per-matrix direction of a `polar` variant.

    Args:
        iterations, dtype, bound: `OrthogonalStep`'s.
        polar: dict, the variant (module docstring): `{"kind": "cached",
            "refresh_every": k, "relative_eps": 1e-6, "polish": False}` or
            `{"kind": "split", "large_min_dim": 500, "large_iterations": 2}`.
        step_counter: the optimizer's `iterations` variable (completed steps).
    """

    def __init__(self, iterations, dtype, bound, polar, step_counter):
        super().__init__(iterations, dtype, bound)
        polar = dict(polar)
        self.kind = polar.pop("kind")
        if self.kind not in POLAR_KINDS:
            raise ValueError(f"polar kind must be one of {POLAR_KINDS}; got {self.kind!r}")
        defaults = {
            "cached": {"refresh_every": 10, "relative_eps": 1e-6, "polish": False},
            "ema": {"refresh_every": 10, "gram_every": 1, "beta": 0.9, "relative_eps": 1e-6},
            "split": {"large_min_dim": 500, "large_iterations": 2}}[self.kind]
        unknown = set(polar) - set(defaults)
        if unknown:
            raise ValueError(f"unknown polar keys for {self.kind!r}: {sorted(unknown)}")
        self.settings = {**defaults, **polar}
        self.step_counter = step_counter
        self._caches = None  # per matrix: (R variable, kept-norm variable, shape)
        self._position = 0

    def build_caches(self, blocks):
        """Creates the cached right factors, one per Kronecker matrix, in the order
        `directions` meets them (blocks in order; Embedding tables and blocks
        without Kronecker matrices are not orthogonalised)."""
        if self._caches is not None or self.kind == "split":
            return
        self._caches = []
        for shape in orthogonalised_matrix_shapes(blocks):
            n = min(shape[-2:])
            factor = tf.Variable(tf.zeros(shape[:-2] + (n, n)), trainable=False,
                                 name=f"polar_right_factor_{len(self._caches)}")
            norm = tf.Variable(tf.zeros(shape[:-2] + (1, 1)), trainable=False,
                               name=f"polar_norm_{len(self._caches)}")
            gram = (tf.Variable(tf.zeros(shape[:-2] + (n, n)), trainable=False,
                                name=f"polar_gram_average_{len(self._caches)}")
                    if self.kind == "ema" else None)
            self._caches.append((factor, norm, shape, gram))

    # ------------------------------------------------------------ per matrix
    def _matrix_direction(self, matrix, iterations, dtype="float32"):
        rows, cols = matrix.shape[-2], matrix.shape[-1]
        scale = step_rules.ORTHOGONAL_STEP_RMS * float(max(rows, cols)) ** 0.5
        if self.kind == "split":
            if min(rows, cols) >= self.settings["large_min_dim"]:
                iterations = self.settings["large_iterations"]
            return scale * step_rules.newton_schulz(matrix, iterations, dtype)
        factor, norm, shape, gram = self._caches[self._position]
        self._position += 1
        if tuple(matrix.shape) != shape:
            raise ValueError(f"cache order mismatch: matrix {matrix.shape}, cache {shape}")
        if self.kind == "ema":
            return scale * self._averaged_polar(matrix, factor, norm, gram)
        return scale * self._cached_polar(matrix, factor, norm)

    def _averaged_polar(self, matrix, factor, norm, gram_average):
        tall, transposed = _tall(step_rules.power_of_two_rescaled(tf.cast(matrix, tf.float32)))
        step = tf.cast(self.step_counter, tf.int64)
        accumulate = tf.equal(tf.math.floormod(step, int(self.settings["gram_every"])), 0)
        refresh = tf.equal(tf.math.floormod(step, int(self.settings["refresh_every"])), 0)
        # Accumulations so far (this one included), for `min(1 - 1/k, beta)`.
        count = tf.cast(step // int(self.settings["gram_every"]) + 1, tf.float32)
        beta = tf.minimum(1.0 - 1.0 / count, float(self.settings["beta"]))
        eps = float(self.settings["relative_eps"])

        def accumulated():
            unit = tf.math.divide_no_nan(tall, tf.norm(tall, axis=[-2, -1], keepdims=True))
            gram_average.assign(beta * gram_average
                                + (1.0 - beta) * tf.matmul(unit, unit, transpose_a=True))
            return tf.constant(True)

        done = tf.cond(accumulate, accumulated, lambda: tf.constant(False))

        def refreshed():
            with tf.control_dependencies([done]):
                values, vectors = tf.linalg.eigh(tf.identity(gram_average))
            values = tf.maximum(values, 0.0)
            floor = tf.maximum(eps * tf.reduce_max(values, axis=-1, keepdims=True), 1.2e-38)
            scaled = vectors * tf.math.rsqrt(values + floor)[..., None, :]
            factor.assign(tf.matmul(scaled, vectors, transpose_b=True))
            norm.assign(tf.sqrt(tf.reduce_sum(values / (values + floor), axis=-1))[..., None, None])
            return tf.constant(True)

        fresh = tf.cond(refresh, refreshed, lambda: tf.constant(False))
        with tf.control_dependencies([fresh]):
            polar = tf.matmul(tall, tf.identity(factor))
        polar = polar * tf.math.divide_no_nan(norm, tf.norm(polar, axis=[-2, -1], keepdims=True))
        return tf.linalg.matrix_transpose(polar) if transposed else polar

    def _cached_polar(self, matrix, factor, norm):
        # Rescaled by an exact power of two first (the polar factor does not
        # depend on the scale), so tiny P do not flush their Gram to zero.
        tall, transposed = _tall(step_rules.power_of_two_rescaled(tf.cast(matrix, tf.float32)))
        every = int(self.settings["refresh_every"])
        refresh = tf.equal(tf.math.floormod(tf.cast(self.step_counter, tf.int64), every), 0)

        def exact():
            right = inverse_square_root(tf.matmul(tall, tall, transpose_a=True),
                                        float(self.settings["relative_eps"]))
            polar = tf.matmul(tall, right)
            factor.assign(right)
            norm.assign(tf.norm(polar, axis=[-2, -1], keepdims=True))
            return polar

        def cached():
            polar = tf.matmul(tall, factor)
            polar = polar * tf.math.divide_no_nan(norm, tf.norm(polar, axis=[-2, -1],
                                                                keepdims=True))
            if self.settings["polish"]:
                polar = cubic_newton_schulz(polar)
            return polar

        polar = tf.cond(refresh, exact, cached)
        return tf.linalg.matrix_transpose(polar) if transposed else polar


class CheapPolarKFAC(kfac_keras.KFAC):
    """`kfac_keras.KFAC` with a `CheapPolarStep` (only with the orthogonal rule).

    Args:
        polar: dict, the variant (`CheapPolarStep`), or None for the library's step.
        **kwargs: `kfac_keras.KFAC` options.
    """

    def __init__(self, polar=None, **kwargs):
        super().__init__(**kwargs)
        self.polar = polar
        if polar is not None:
            library = self._orthogonal_step
            if library is None:
                raise ValueError("polar variants need step_rule='orthogonal'")
            self._orthogonal_step = CheapPolarStep(library.iterations, library.dtype,
                                                   library.bound, polar, self.iterations)

    def attach(self, model):
        registration = super().attach(model)
        if isinstance(self._orthogonal_step, CheapPolarStep):
            self._orthogonal_step.build_caches(registration.blocks)
        return registration


def check_polar_factor(seed=0):
    """Self-check against NumPy's SVD: the refresh step's direction is the polar
    factor, a cached step on the same matrix too; returns the max errors."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p = rng.standard_normal((40, 25)).astype(np.float32) * np.logspace(0, -2, 25)[None, :]
    u, _, vt = np.linalg.svd(p.astype(np.float64), full_matrices=False)
    want = u @ vt
    counter = tf.Variable(0, dtype=tf.int64)
    step = CheapPolarStep(3, "float32", None, {"kind": "cached", "refresh_every": 2}, counter)
    factor = tf.Variable(tf.zeros((25, 25)))
    norm = tf.Variable(tf.zeros((1, 1)))
    first = step._cached_polar(tf.constant(p), factor, norm).numpy()
    counter.assign(1)  # not a refresh step: the kept factor, applied to the same P
    again = step._cached_polar(tf.constant(p), factor, norm).numpy()
    return (float(np.abs(first - want).max()), float(np.abs(again - want).max()),
            float(abs(norm.numpy().item() - math.sqrt(25))))


if __name__ == "__main__":
    print("max |refresh - UV^T|, max |cached - UV^T|, |norm - 5|:", check_polar_factor())
