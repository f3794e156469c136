"""Shared machinery of Kronecker-factored blocks `F ~= A (x) G`.

A subclass says how its layer's gradients map to one matrix `V` of shape
`(input_dim, output_dim)` (so that the per-example gradient is
`sum_t abar_t g_t^T`) and how to estimate `A` (`input_factor`) and `G`
(`output_grad_factor`) from captured activations; this class handles the
moving averages, the decompositions and the damped-inverse product
(KFAC_NOTES section 3):

* `inverse_method="cholesky"` or `"inverse"`: factored Tikhonov damping,
  `(A + pi*gamma I)^{-1} V (G + gamma/pi I)^{-1}` with `gamma = sqrt(damping)`
  and `pi = sqrt((tr A / dim A) / (tr G / dim G))`. The damping is baked into
  the stored inverses, so a new damping value takes effect at the next
  inverse update. Preconditioning costs two matrix products.
* `inverse_method="eigh"`: exact damping of the Kronecker product,
  `(A (x) G + damping I)^{-1} vec(V)` computed in the eigenbases of `A` and `G`.
  Damping may change every step without a new decomposition; preconditioning
  costs four matrix products.
"""

import tensorflow as tf

from kfac_keras import linalg
from kfac_keras.blocks.base import FisherBlock, ema_assign


class KroneckerBlock(FisherBlock):
    """Base class of blocks `A (x) G`.

    Args:
        name: readable name.
        variables: covered model variables.
        layer: the Keras layer.
        input_dim: size of `A` (including the homogeneous coordinate for the
            bias, when there is one).
        output_dim: size of `G`.
        inverse_method: one of `linalg.INVERSE_METHODS`.
    """

    kind = "kronecker"
    needs_capture = True

    def __init__(self, name, variables, layer, input_dim, output_dim,
                 inverse_method="cholesky"):
        super().__init__(name, variables, layer)
        if inverse_method not in linalg.INVERSE_METHODS:
            raise ValueError(
                f"`inverse_method` must be one of {linalg.INVERSE_METHODS}; "
                f"received {inverse_method!r}."
            )
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.inverse_method = inverse_method

    # -- subclass hooks -------------------------------------------------------
    def grads_to_matrix(self, grads):
        """Gradients of `self.variables` -> matrix of shape (input_dim, output_dim)."""
        raise NotImplementedError

    def matrix_to_grads(self, matrix):
        """Inverse of `grads_to_matrix`."""
        raise NotImplementedError

    def compute_factors(self, captures, num_examples):
        """Returns this estimate's `(A, G)` from the captured tensors."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------
    def build(self, optimizer):
        if self.built:
            return
        prefix = self.name.replace("/", "_")
        self.input_factor = optimizer.add_variable(
            (self.input_dim, self.input_dim), initializer="zeros",
            dtype="float32", name=f"{prefix}_input_factor")
        self.output_grad_factor = optimizer.add_variable(
            (self.output_dim, self.output_dim), initializer="zeros",
            dtype="float32", name=f"{prefix}_output_grad_factor")
        if self.inverse_method == "eigh":
            self.input_eigenvalues = optimizer.add_variable(
                (self.input_dim,), initializer="ones", dtype="float32",
                name=f"{prefix}_input_eigenvalues")
            self.input_eigenvectors = optimizer.add_variable(
                (self.input_dim, self.input_dim), initializer="identity",
                dtype="float32", name=f"{prefix}_input_eigenvectors")
            self.output_grad_eigenvalues = optimizer.add_variable(
                (self.output_dim,), initializer="ones", dtype="float32",
                name=f"{prefix}_output_grad_eigenvalues")
            self.output_grad_eigenvectors = optimizer.add_variable(
                (self.output_dim, self.output_dim), initializer="identity",
                dtype="float32", name=f"{prefix}_output_grad_eigenvectors")
        else:
            self.input_factor_inverse = optimizer.add_variable(
                (self.input_dim, self.input_dim), initializer="identity",
                dtype="float32", name=f"{prefix}_input_factor_inverse")
            self.output_grad_factor_inverse = optimizer.add_variable(
                (self.output_dim, self.output_dim), initializer="identity",
                dtype="float32", name=f"{prefix}_output_grad_factor_inverse")
        self.built = True

    def state_variables(self):
        names = ["input_factor", "output_grad_factor"]
        if self.inverse_method == "eigh":
            names += ["input_eigenvalues", "input_eigenvectors",
                      "output_grad_eigenvalues", "output_grad_eigenvectors"]
        else:
            names += ["input_factor_inverse", "output_grad_factor_inverse"]
        return [getattr(self, n) for n in names]

    def factor_shapes(self):
        return {"input_factor": (self.input_dim, self.input_dim),
                "output_grad_factor": (self.output_dim, self.output_dim)}

    # -- pipeline ------------------------------------------------------------
    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        input_factor, output_grad_factor = self.compute_factors(captures, num_examples)
        ema_assign(self.input_factor, input_factor, decay)
        ema_assign(self.output_grad_factor, output_grad_factor, decay)

    def update_inverses(self, damping):
        input_factor = tf.convert_to_tensor(self.input_factor)
        output_grad_factor = tf.convert_to_tensor(self.output_grad_factor)
        if self.inverse_method == "eigh":
            values, vectors = linalg.clipped_eigh(input_factor)
            self.input_eigenvalues.assign(values)
            self.input_eigenvectors.assign(vectors)
            values, vectors = linalg.clipped_eigh(output_grad_factor)
            self.output_grad_eigenvalues.assign(values)
            self.output_grad_eigenvectors.assign(vectors)
            return
        pi = linalg.pi_adjustment(input_factor, output_grad_factor)
        gamma = tf.sqrt(tf.cast(damping, tf.float32))
        self.input_factor_inverse.assign(linalg.damped_inverse(
            input_factor, pi * gamma, self.inverse_method))
        self.output_grad_factor_inverse.assign(linalg.damped_inverse(
            output_grad_factor, gamma / pi, self.inverse_method))

    def multiply_damped_inverse(self, grads, damping):
        matrix = tf.cast(self.grads_to_matrix(grads), tf.float32)
        if self.inverse_method == "eigh":
            q_in = tf.convert_to_tensor(self.input_eigenvectors)
            q_out = tf.convert_to_tensor(self.output_grad_eigenvectors)
            rotated = tf.matmul(tf.matmul(q_in, matrix, transpose_a=True), q_out)
            scale = (self.input_eigenvalues[:, None] * self.output_grad_eigenvalues[None, :]
                     + tf.cast(damping, tf.float32))
            result = tf.matmul(tf.matmul(q_in, rotated / scale), q_out, transpose_b=True)
        else:
            result = tf.matmul(tf.matmul(self.input_factor_inverse, matrix),
                               self.output_grad_factor_inverse)
        return self.matrix_to_grads(result)


def location_rows(tensor, width):
    """Reshapes `(batch, ..., width)` to `(batch * locations, width)`, float32."""
    return tf.reshape(tf.cast(tensor, tf.float32), [-1, width])


def append_homogeneous(rows):
    """Appends a column of ones: `[a, 1]`."""
    return tf.concat([rows, tf.ones_like(rows[:, :1])], axis=1)
