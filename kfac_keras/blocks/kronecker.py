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
* `inverse_method="ekfac"` (George et al. 2018, "Fast Approximate Natural
  Gradient Descent in a Kronecker-factored Eigenbasis"): the eigenbases
  `Q_A`, `Q_G` of `"eigh"`, but the Kronecker eigenvalues `outer(d_A, d_G)`
  are replaced by the *corrected diagonal*
  `S = E_n[(Q_A^T dW_n Q_G)^2]`, the second moment of the per-example
  gradients `dW_n = sum_t abar_{n,t} g_{n,t}^T` rotated into the eigenbasis
  (`update_scalings`, every `scale_update_every` steps, an EMA that restarts
  when the eigenbasis changes; until the first estimate in a new basis `S`
  is `outer(d_A, d_G)`, i.e. plain `"eigh"`). Then
  `(F + damping I)^{-1} vec(V) = vec(Q_A [(Q_A^T V Q_G) / (S + damping)] Q_G^T)`.
  `S` is the best diagonal in that basis (in Frobenius norm), so EKFAC is at
  least as accurate as K-FAC there. Subclasses provide per-example rows
  through `per_example_rows`; those that do not are not eligible (they
  raise `UnsupportedLayerError`). Memory: one extra `(input_dim, output_dim)`
  matrix.
"""

import tensorflow as tf

from kfac_keras import linalg
from kfac_keras.blocks.base import FisherBlock, ema_assign
from kfac_keras.blocks.errors import UnsupportedLayerError


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
        if (inverse_method == "ekfac"
                and type(self).per_example_rows is KroneckerBlock.per_example_rows):
            raise UnsupportedLayerError(
                f"inverse_method='ekfac' needs per-example gradients, which "
                f"{type(self).__name__} does not provide (no `per_example_rows`)")
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

    def per_example_rows(self, captures):
        """Per-example rows, for EKFAC (optional hook).

        Returns `(inputs, grads)`, float32 tensors of shapes
        `(examples, locations, input_dim)` and `(examples, locations,
        output_dim)`, such that example `n`'s gradient matrix is
        `sum_t inputs[n, t] grads[n, t]^T` (its rows carry the same
        `sqrt(c_n)` scale as the factor statistics).
        """
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
        if self.inverse_method in ("eigh", "ekfac"):
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
            if self.inverse_method == "ekfac":
                self.eigenbasis_scalings = optimizer.add_variable(
                    (self.input_dim, self.output_dim), initializer="ones",
                    dtype="float32", name=f"{prefix}_eigenbasis_scalings")
                self.scaling_estimates = optimizer.add_variable(
                    (), initializer="zeros", dtype="float32",
                    name=f"{prefix}_scaling_estimates")
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
        if self.inverse_method in ("eigh", "ekfac"):
            names += ["input_eigenvalues", "input_eigenvectors",
                      "output_grad_eigenvalues", "output_grad_eigenvectors"]
            if self.inverse_method == "ekfac":
                names += ["eigenbasis_scalings", "scaling_estimates"]
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
        if self.inverse_method in ("eigh", "ekfac"):
            input_values, vectors = linalg.clipped_eigh(input_factor)
            self.input_eigenvalues.assign(input_values)
            self.input_eigenvectors.assign(vectors)
            output_values, vectors = linalg.clipped_eigh(output_grad_factor)
            self.output_grad_eigenvalues.assign(output_values)
            self.output_grad_eigenvectors.assign(vectors)
            if self.inverse_method == "ekfac":
                # A new basis: the old scalings no longer apply. Start from the
                # Kronecker eigenvalues and let the next estimate replace them.
                self.eigenbasis_scalings.assign(
                    input_values[:, None] * output_values[None, :])
                self.scaling_estimates.assign(0.0)
            return
        pi = linalg.pi_adjustment(input_factor, output_grad_factor)
        gamma = tf.sqrt(tf.cast(damping, tf.float32))
        self.input_factor_inverse.assign(linalg.damped_inverse(
            input_factor, pi * gamma, self.inverse_method))
        self.output_grad_factor_inverse.assign(linalg.damped_inverse(
            output_grad_factor, gamma / pi, self.inverse_method))

    def update_scalings(self, captures, num_examples, factor_decay):
        """EKFAC: folds one estimate of the corrected diagonal into `S`.

        The estimate is `mean_n (Q_A^T dW_n Q_G)^2` over the statistics
        subset, with `dW_n = sum_t abar_{n,t} g_{n,t}^T` from
        `per_example_rows`, in the current eigenbasis. The moving average
        weight is `min(1 - 1/k, factor_decay)` with `k` counting estimates
        since the last eigenbasis change, so the first estimate in a new
        basis replaces the initial `outer(d_A, d_G)`.

        Args:
            captures: as in `update_statistics`.
            num_examples: float32 scalar, the size of the statistics subset.
            factor_decay: float, the largest weight of the old value.
        """
        if self.inverse_method != "ekfac":
            raise ValueError(
                f"update_scalings is only defined for inverse_method='ekfac'; "
                f"block {self.name!r} uses {self.inverse_method!r}.")
        inputs, grads = self.per_example_rows(captures)
        rotated_inputs = tf.einsum("nti,ij->ntj", inputs, self.input_eigenvectors)
        rotated_grads = tf.einsum("nti,ij->ntj", grads, self.output_grad_eigenvectors)
        if rotated_inputs.shape[1] == 1:
            # One location: the rotated gradient is an outer product, and the
            # square of an outer product is the outer product of the squares.
            estimate = tf.matmul(tf.square(rotated_inputs[:, 0]),
                                 tf.square(rotated_grads[:, 0]),
                                 transpose_a=True) / num_examples
        else:
            per_example = tf.einsum("nti,ntj->nij", rotated_inputs, rotated_grads)
            estimate = tf.reduce_sum(tf.square(per_example), axis=0) / num_examples
        self.scaling_estimates.assign_add(1.0)
        count = tf.convert_to_tensor(self.scaling_estimates)
        decay = tf.minimum(1.0 - 1.0 / count, factor_decay)
        ema_assign(self.eigenbasis_scalings, estimate, decay)

    def multiply_damped_inverse(self, grads, damping):
        matrix = tf.cast(self.grads_to_matrix(grads), tf.float32)
        if self.inverse_method in ("eigh", "ekfac"):
            q_in = tf.convert_to_tensor(self.input_eigenvectors)
            q_out = tf.convert_to_tensor(self.output_grad_eigenvectors)
            rotated = tf.matmul(tf.matmul(q_in, matrix, transpose_a=True), q_out)
            if self.inverse_method == "ekfac":
                diagonal = tf.convert_to_tensor(self.eigenbasis_scalings)
            else:
                diagonal = (self.input_eigenvalues[:, None]
                            * self.output_grad_eigenvalues[None, :])
            scale = diagonal + tf.cast(damping, tf.float32)
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
