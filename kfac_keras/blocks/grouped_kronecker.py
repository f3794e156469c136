"""Block-diagonal Kronecker blocks: one `A_g (x) G_g` per independent group.

Grouped convolutions (`groups > 1`) and depthwise convolutions are several
independent convolutions side by side: group `g` reads only its own input
channels and writes only its own output channels, so its weights form their
own matrix `W_g` of shape `(input_dim, output_dim)`. KFC applies to each group
exactly as to an ungrouped convolution (Grosse & Martens 2016), and the block
is `blockdiag_g(A_g (x) G_g)`; the groups are stored stacked, so the factors
have shapes `(groups, input_dim, input_dim)` and `(groups, output_dim,
output_dim)` and every decomposition and product is one batched op.

Inverse methods (`inverse_method`), per group and with the same meaning as in
`KroneckerBlock` (KFAC_NOTES section 3):

* `"cholesky"` / `"inverse"`: factored Tikhonov damping
  `(A_g + pi_g gamma I)^{-1} V_g (G_g + gamma/pi_g I)^{-1}`, with
  `pi_g = sqrt((tr A_g / dim A_g) / (tr G_g / dim G_g))` per group and
  `gamma = sqrt(damping)`.
* `"eigh"`: exact damping `(A_g (x) G_g + damping I)^{-1} vec(V_g)` in the
  eigenbases of `A_g` and `G_g`.

Other methods are not implemented for grouped blocks; asking for one raises
`UnsupportedLayerError` (registration then falls back to a diagonal block and
says so in the report).
"""

import tensorflow as tf

from kfac_keras import linalg
from kfac_keras.blocks.base import FisherBlock, ema_assign
from kfac_keras.blocks.errors import UnsupportedLayerError

#: Inverse methods grouped Kronecker blocks implement.
GROUPED_INVERSE_METHODS = ("cholesky", "inverse", "eigh")


def batched_identity(shape, dtype=None):
    """Initializer: identity matrices stacked along the leading axes."""
    return tf.eye(shape[-1], batch_shape=shape[:-2], dtype=dtype or "float32")


def location_factors(input_rows, grad_rows, num_examples):
    """`A` and `G` from per-location rows, in the KFC/Dense convention.

    Args:
        input_rows: `(..., R, input_dim)` float32 rows `abar_{n,t}` (all
            locations of all examples of the statistics subset).
        grad_rows: `(..., R, output_dim)` float32 rows `g_{n,t}`, the same
            locations in the same order.
        num_examples: float32 scalar `m`, the number of examples.

    Returns:
        `(A, G)` with `A = (1/m) sum_{n,t} abar abar^T` and
        `G = (1/(m |T|)) sum_{n,t} g g^T`, where `|T| = R / m`.
    """
    rows = tf.cast(tf.shape(grad_rows)[-2], tf.float32)
    input_factor = tf.matmul(input_rows, input_rows, transpose_a=True) / num_examples
    grad_factor = tf.matmul(grad_rows, grad_rows, transpose_a=True) / rows
    return input_factor, grad_factor


class GroupedKroneckerBlock(FisherBlock):
    """Base class of blocks `blockdiag_g(A_g (x) G_g)`.

    Subclasses implement `grads_to_matrices` (gradients -> `(groups,
    input_dim, output_dim)`), `matrices_to_grads` and `compute_factors`.

    Args:
        name: readable name.
        variables: covered model variables.
        layer: the Keras layer.
        num_groups: number of groups.
        input_dim: size of each `A_g` (with the homogeneous coordinate when
            there is a bias).
        output_dim: size of each `G_g`.
        inverse_method: one of `GROUPED_INVERSE_METHODS`. Defaults to
            `"cholesky"`.

    Raises:
        UnsupportedLayerError: for an inverse method grouped blocks do not
            implement.
    """

    kind = "kronecker (grouped)"
    needs_capture = True

    def __init__(self, name, variables, layer, num_groups, input_dim, output_dim,
                 inverse_method="cholesky"):
        super().__init__(name, variables, layer)
        if inverse_method not in GROUPED_INVERSE_METHODS:
            raise UnsupportedLayerError(
                f"inverse_method={inverse_method!r} is not implemented for "
                f"grouped Kronecker blocks (available: {GROUPED_INVERSE_METHODS})")
        self.num_groups = int(num_groups)
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.inverse_method = inverse_method

    # -- subclass hooks -------------------------------------------------------
    def grads_to_matrices(self, grads):
        """Gradients -> `(groups, input_dim, output_dim)`."""
        raise NotImplementedError

    def matrices_to_grads(self, matrices):
        """Inverse of `grads_to_matrices`."""
        raise NotImplementedError

    def compute_factors(self, captures, num_examples):
        """This estimate's `(A, G)`, shapes `(groups, i, i)`, `(groups, o, o)`."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------
    def build(self, optimizer):
        if self.built:
            return
        prefix = self.name.replace("/", "_")
        groups, i, o = self.num_groups, self.input_dim, self.output_dim

        def add(shape, initializer, suffix):
            return optimizer.add_variable(shape, initializer=initializer,
                                          dtype="float32", name=f"{prefix}_{suffix}")

        self.input_factor = add((groups, i, i), "zeros", "input_factor")
        self.output_grad_factor = add((groups, o, o), "zeros", "output_grad_factor")
        if self.inverse_method == "eigh":
            self.input_eigenvalues = add((groups, i), "ones", "input_eigenvalues")
            self.input_eigenvectors = add((groups, i, i), batched_identity,
                                          "input_eigenvectors")
            self.output_grad_eigenvalues = add((groups, o), "ones",
                                               "output_grad_eigenvalues")
            self.output_grad_eigenvectors = add((groups, o, o), batched_identity,
                                                "output_grad_eigenvectors")
        else:
            self.input_factor_inverse = add((groups, i, i), batched_identity,
                                            "input_factor_inverse")
            self.output_grad_factor_inverse = add((groups, o, o), batched_identity,
                                                  "output_grad_factor_inverse")
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
        return {"input_factor": (self.num_groups, self.input_dim, self.input_dim),
                "output_grad_factor": (self.num_groups, self.output_dim, self.output_dim)}

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
        floor = 1e-12
        input_trace = tf.maximum(tf.reduce_mean(
            tf.linalg.diag_part(input_factor), axis=-1), floor)
        grad_trace = tf.maximum(tf.reduce_mean(
            tf.linalg.diag_part(output_grad_factor), axis=-1), floor)
        pi = tf.sqrt(input_trace / grad_trace)[:, None, None]
        gamma = tf.sqrt(tf.cast(damping, tf.float32))
        self.input_factor_inverse.assign(linalg.damped_inverse(
            input_factor, pi * gamma, self.inverse_method))
        self.output_grad_factor_inverse.assign(linalg.damped_inverse(
            output_grad_factor, gamma / pi, self.inverse_method))

    def multiply_damped_inverse(self, grads, damping):
        matrices = tf.cast(self.grads_to_matrices(grads), tf.float32)
        if self.inverse_method == "eigh":
            q_in = tf.convert_to_tensor(self.input_eigenvectors)
            q_out = tf.convert_to_tensor(self.output_grad_eigenvectors)
            rotated = tf.matmul(tf.matmul(q_in, matrices, transpose_a=True), q_out)
            scale = (self.input_eigenvalues[:, :, None]
                     * self.output_grad_eigenvalues[:, None, :]
                     + tf.cast(damping, tf.float32))
            result = tf.matmul(tf.matmul(q_in, rotated / scale), q_out, transpose_b=True)
        else:
            result = tf.matmul(tf.matmul(self.input_factor_inverse, matrices),
                               self.output_grad_factor_inverse)
        return self.matrices_to_grads(result)
