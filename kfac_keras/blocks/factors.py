"""Kronecker factors: the state, moving average and decomposition of one side
of a Kronecker block `A (x) G`.

A block's input-side factor acts on the rows (axis -2) of its gradient
matrices `V` (shape `(..., input_dim, output_dim)`), its output-side factor on
the columns (axis -1). Two kinds:

* `DenseFactor`: a symmetric PSD matrix `(dim, dim)`, or `num_groups` of them
  stacked `(num_groups, dim, dim)` for block-diagonal (grouped) layers, with
  its decomposition: damped inverses `(F + d I)^{-1}` for `"cholesky"` /
  `"inverse"`, or eigenvalues and eigenvectors for `"eigh"` / `"ekfac"`.
* `DiagonalFactor`: a diagonal factor stored as a vector (Embedding's token
  frequencies). Its eigenbasis is the identity, so it needs no decomposition;
  it can act on a subset of rows (sparse gradients).

Variable names are `{prefix}_{role}_factor`, `{prefix}_{role}_factor_inverse`,
`{prefix}_{role}_eigenvalues` and `{prefix}_{role}_eigenvectors` (role
`"input"` or `"output_grad"`).
"""

import tensorflow as tf

from kfac_keras import linalg
from kfac_keras.blocks.base import ema_assign

#: Inverse methods whose decomposition is an eigendecomposition.
EIGEN_METHODS = ("eigh", "ekfac")

INPUT_SIDE = "input"
OUTPUT_SIDE = "output"


def batched_identity(shape, dtype=None):
    """Initializer: identity matrices stacked along the leading axes."""
    return tf.eye(shape[-1], batch_shape=shape[:-2], dtype=dtype or "float32")


def location_factors(input_rows, grad_rows, num_examples, row_weights=None):
    """`A` and `G` from per-location rows, in the KFC/Dense convention.

    Args:
        input_rows: `(..., R, input_dim)` float32 rows `abar_{n,t}` (all
            locations of all examples of the statistics subset).
        grad_rows: `(..., R, output_dim)` float32 rows `g_{n,t}`, the same
            locations in the same order.
        num_examples: float32 scalar `m`, the number of examples.
        row_weights: `(R,)` float32 weights `r_{n,t}` of the rows, or None
            (default: every row weighs 1).

    Returns:
        `(A, G)` with `A = (1/m_w) sum_{n,t} r_{n,t} abar abar^T` and
        `G = (1/(m |T|)) sum_{n,t} g g^T`, where `|T| = R / m` and
        `m_w = sum r / |T|` (`= m` when every weight is 1; `weighted_count`).
        `G` needs no weights: its rows carry the objective's weights already
        (`kfac_keras.losses`).
    """
    rows = tf.cast(tf.shape(grad_rows)[-2], tf.float32)
    grad_factor = tf.matmul(grad_rows, grad_rows, transpose_a=True) / rows
    if row_weights is None:
        input_factor = tf.matmul(input_rows, input_rows, transpose_a=True) / num_examples
        return input_factor, grad_factor
    weighted_rows = input_rows * row_weights[:, None]
    input_factor = tf.math.divide_no_nan(
        tf.matmul(weighted_rows, input_rows, transpose_a=True),
        weighted_count(row_weights, num_examples))
    return input_factor, grad_factor


def weighted_count(row_weights, num_examples):
    """`m_w = sum r / |T|`, the weighted number of examples of `R` rows
    (`|T| = R / m` locations per example).

    Args:
        row_weights: `(R,)` float32 row weights, or None (the count is `m`).
        num_examples: float32 scalar `m`.
    """
    if row_weights is None:
        return num_examples
    rows = tf.cast(tf.shape(row_weights)[0], tf.float32)
    return tf.reduce_sum(row_weights) * num_examples / rows


class DenseFactor:
    """A dense Kronecker factor, optionally with a leading group axis.

    Args:
        role: `"input"` or `"output_grad"`, used in variable names.
        dim: the factor's size.
        num_groups: number of stacked independent factors, or None (default)
            for a single `(dim, dim)` factor.
    """

    def __init__(self, role, dim, num_groups=None):
        self.role = role
        self.dim = int(dim)
        self.num_groups = None if num_groups is None else int(num_groups)
        self.batch_shape = () if num_groups is None else (self.num_groups,)

    @property
    def shape(self):
        """Shape of the factor variable."""
        return self.batch_shape + (self.dim, self.dim)

    def build(self, optimizer, prefix, inverse_method):
        """Creates the factor and its decomposition's variables."""
        def add(shape, initializer, suffix):
            return optimizer.add_variable(shape, initializer=initializer, dtype="float32",
                                          name=f"{prefix}_{self.role}_{suffix}")

        identity = batched_identity if self.batch_shape else "identity"
        self.factor = add(self.shape, "zeros", "factor")
        if inverse_method in EIGEN_METHODS:
            self.eigenvalues = add(self.batch_shape + (self.dim,), "ones", "eigenvalues")
            self.eigenvectors = add(self.shape, identity, "eigenvectors")
            self._decomposition = [self.eigenvalues, self.eigenvectors]
        else:
            self.inverse = add(self.shape, identity, "factor_inverse")
            self._decomposition = [self.inverse]

    def state_variables(self):
        return [self.factor] + self._decomposition

    def fold(self, estimate, decay, count=None):
        """Moving average of the factor (see `ema_assign`; `count` is the
        weighted number of examples `estimate` averages, or None)."""
        ema_assign(self.factor, estimate, decay, count)

    def mean_trace(self):
        """`tr(F) / dim`, one value per group (shape `batch_shape`)."""
        return linalg.mean_diagonal(tf.convert_to_tensor(self.factor))

    def decompose_damped(self, damping, method):
        """Stores `(F + damping I)^{-1}`; `damping` has shape `batch_shape`."""
        damping = tf.reshape(damping, self.batch_shape + (1, 1))
        self.inverse.assign(linalg.damped_inverse(
            tf.convert_to_tensor(self.factor), damping, method))

    def decompose_eigen(self):
        """Stores the eigendecomposition (eigenvalues clipped at zero)."""
        values, vectors = linalg.clipped_eigh(tf.convert_to_tensor(self.factor))
        self.eigenvalues.assign(values)
        self.eigenvectors.assign(vectors)

    def spectrum(self, indices=None):
        """The eigenvalues, `batch_shape + (dim,)`."""
        if indices is not None:
            raise ValueError("A dense factor cannot act on a subset of rows.")
        return tf.convert_to_tensor(self.eigenvalues)

    def multiply_inverse(self, matrix, side, indices=None):
        """The stored damped inverse applied on `side` of `matrix`."""
        if indices is not None:
            raise ValueError("A dense factor cannot act on a subset of rows.")
        if side == INPUT_SIDE:
            return tf.matmul(self.inverse, matrix)
        return tf.matmul(matrix, self.inverse)

    def to_eigenbasis(self, matrix, side, indices=None):
        """`Q^T V` (input side) or `V Q` (output side)."""
        if indices is not None:
            raise ValueError("A dense factor cannot act on a subset of rows.")
        if side == INPUT_SIDE:
            return tf.matmul(self.eigenvectors, matrix, transpose_a=True)
        return tf.matmul(matrix, self.eigenvectors)

    def from_eigenbasis(self, matrix, side, indices=None):
        """`Q V` (input side) or `V Q^T` (output side)."""
        if indices is not None:
            raise ValueError("A dense factor cannot act on a subset of rows.")
        if side == INPUT_SIDE:
            return tf.matmul(self.eigenvectors, matrix)
        return tf.matmul(matrix, self.eigenvectors, transpose_b=True)

    def rotate_rows(self, rows):
        """Rows `(..., m, T, dim)` expressed in the eigenbasis: `rows Q`."""
        return tf.einsum("...nti,...ij->...ntj", rows, self.eigenvectors)


class DiagonalFactor:
    """A diagonal input-side factor stored as a vector (no group axis).

    Its eigenvectors are the identity and its eigenvalues the vector itself,
    so `"eigh"`/`"ekfac"` need no decomposition; `"cholesky"`/`"inverse"`
    store only the damping added to it.

    Args:
        role: used in variable names (`{prefix}_{role}` for the vector).
        dim: the vector's length.
    """

    batch_shape = ()
    num_groups = None

    def __init__(self, role, dim):
        self.role = role
        self.dim = int(dim)

    @property
    def shape(self):
        return (self.dim,)

    def build(self, optimizer, prefix, inverse_method):
        self.factor = optimizer.add_variable((self.dim,), initializer="zeros",
                                             dtype="float32", name=f"{prefix}_{self.role}")
        self._decomposition = []
        if inverse_method not in EIGEN_METHODS:
            self.damping = optimizer.add_variable((), initializer="ones", dtype="float32",
                                                  name=f"{prefix}_{self.role}_damping")
            self._decomposition = [self.damping]

    def state_variables(self):
        return [self.factor] + self._decomposition

    def fold(self, estimate, decay, count=None):
        ema_assign(self.factor, estimate, decay, count)

    def mean_trace(self):
        return tf.reduce_mean(self.factor)

    def decompose_damped(self, damping, method):
        del method  # a diagonal is inverted entrywise
        self.damping.assign(tf.reshape(damping, []))

    def decompose_eigen(self):
        """Nothing to decompose: the factor is its own spectrum."""

    def _diagonal(self, indices):
        values = tf.convert_to_tensor(self.factor)
        return values if indices is None else tf.gather(values, indices)

    def spectrum(self, indices=None):
        return tf.maximum(self._diagonal(indices), 0.0)

    def multiply_inverse(self, matrix, side, indices=None):
        if side != INPUT_SIDE:
            raise ValueError("A diagonal factor acts on the input side only.")
        return matrix / (self._diagonal(indices)[:, None] + self.damping)

    def to_eigenbasis(self, matrix, side, indices=None):
        del side, indices
        return matrix

    def from_eigenbasis(self, matrix, side, indices=None):
        del side, indices
        return matrix

    def rotate_rows(self, rows):
        return rows
