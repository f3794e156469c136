"""One Kronecker-factored block `F ~= A (x) G` for every layer kind.

A layer's block says only how its layout maps to this class (the *layout
hooks*): `grads_to_matrix` turns its gradients into matrices `V` of shape
`(..., input_dim, output_dim)` (a leading group axis for grouped layers, so
that the per-example gradient is `sum_t abar_t g_t^T`), `matrix_to_grads`
turns them back, and `per_example_rows` gives the rows `abar_{n,t}`, `g_{n,t}`
from the captured tensors. From those rows this class computes the factor
statistics (`compute_factors`, which a layer may override, e.g. Embedding's
diagonal `A`) and EKFAC's per-example second moments. The factors themselves
(`kfac_keras.blocks.factors`) own their state, moving average and
decomposition. Preconditioning (KFAC_NOTES section 3):

* `inverse_method="cholesky"` or `"inverse"`: factored Tikhonov damping,
  `(A + pi*gamma I)^{-1} V (G + gamma/pi I)^{-1}` with `gamma = sqrt(damping)`
  and `pi = sqrt((tr A / dim A) / (tr G / dim G))` (per group). The damping is
  baked into the stored inverses, so a new damping value takes effect at the
  next inverse update. Preconditioning costs two matrix products.
* `inverse_method="eigh"`: exact damping of the Kronecker product,
  `(A (x) G + damping I)^{-1} vec(V)` computed in the eigenbases of `A` and `G`.
  Damping may change every step without a new decomposition; preconditioning
  costs four matrix products.
* `inverse_method="ekfac"` (George et al. 2018, "Fast Approximate Natural
  Gradient Descent in a Kronecker-factored Eigenbasis"): the eigenbases
  `Q_A`, `Q_G` of `"eigh"`, but the Kronecker eigenvalues `outer(d_A, d_G)`
  are replaced by the *corrected diagonal* `S = E_n[(Q_A^T dW_n Q_G)^2]`, the
  second moment of the per-example gradients `dW_n = sum_t abar_{n,t}
  g_{n,t}^T` rotated into the eigenbasis (`update_scalings`, every
  `scale_update_every` steps). `S` is a moving average that restarts when the
  eigenbasis changes; on a step that both decomposes and re-estimates, the
  optimizer decomposes first, so the estimate is made in the new basis and
  used by that step's update. A decomposition with no estimate after it sets
  `S = outer(d_A, d_G)` (plain `"eigh"`) until the next estimate. Then
  `(F + damping I)^{-1} vec(V) = vec(Q_A [(Q_A^T V Q_G) / (S + damping)] Q_G^T)`.
  `S` is the best diagonal in that basis (in Frobenius norm), so EKFAC is at
  least as accurate as K-FAC there. Memory: one extra matrix of the gradient's
  shape.

Row weights (sample weights and Keras masks, docs/weighted_factors.md):
each capture may carry a row weight `r` (`split_capture`); the layout hook
`per_example_weights` spreads it over the block's locations, like
`per_example_rows`. Then `A = (1/m_w) sum_{n,t} r_{n,t} abar abar^T` with
`m_w = sum r / |T|` (`location_factors`), `G` is unchanged (its rows carry
the objective's weights already), and EKFAC's per-example gradients are
those weighted gradients; zero-weight rows enter no factor. Under
`tf.distribute` the input factor's replica mean is weighted by `m_w`.

Sparse gradients: a block whose input factor is diagonal (Embedding) sets
`accepts_indexed_slices`; `multiply_damped_inverse` then preconditions only
the rows of a `tf.IndexedSlices` gradient and returns `tf.IndexedSlices`.
"""

import tensorflow as tf

from kfac_keras import linalg
from kfac_keras.blocks.base import (EstimateRecorder, FisherBlock, StatisticsSource, ema_assign,
                                   split_capture)
from kfac_keras.blocks.errors import UnsupportedLayerError
from kfac_keras.blocks.factors import (EIGEN_METHODS, INPUT_SIDE, OUTPUT_SIDE, DenseFactor,
                                       location_factors, weighted_count)

__all__ = ["KroneckerBlock", "append_homogeneous", "example_rows", "location_factors",
           "location_rows", "location_weights", "join_location_weights", "split_capture"]


class KroneckerBlock(FisherBlock):
    """A block `A (x) G` (or `blockdiag_g(A_g (x) G_g)` with a group axis).

    Args:
        name: readable name.
        variables: covered model variables.
        layer: the Keras layer.
        input_dim: size of `A` (including the homogeneous coordinate for the
            bias, when there is one).
        output_dim: size of `G`.
        inverse_method: one of `linalg.INVERSE_METHODS`. Defaults to
            `"cholesky"`.
        num_groups: number of independent groups (a leading axis on the
            factors and the gradient matrices), or None (default) for none.
        input_side: the input-side factor object, or None (default) for a
            `DenseFactor("input", input_dim, num_groups)`.

    Raises:
        UnsupportedLayerError: for `"ekfac"` when the subclass has no
            `per_example_rows` and does not override `scaling_estimate`.
    """

    kind = "kronecker"
    statistics_source = StatisticsSource.CAPTURES

    def __init__(self, name, variables, layer, input_dim, output_dim,
                 inverse_method="cholesky", num_groups=None, input_side=None):
        super().__init__(name, variables, layer)
        cls = type(self)
        if (inverse_method == "ekfac"
                and cls.per_example_rows is KroneckerBlock.per_example_rows
                and cls.scaling_estimate is KroneckerBlock.scaling_estimate):
            raise UnsupportedLayerError(
                f"inverse_method='ekfac' needs per-example gradients, which "
                f"{cls.__name__} does not provide (no `per_example_rows`)")
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.inverse_method = inverse_method
        self.num_groups = None if num_groups is None else int(num_groups)
        self.input_side = (input_side if input_side is not None
                           else DenseFactor("input", input_dim, num_groups))
        self.output_side = DenseFactor("output_grad", output_dim, num_groups)

    # -- layout hooks ---------------------------------------------------------
    def grads_to_matrix(self, grads):
        """Gradients of `self.variables` -> matrix `(..., input_dim, output_dim)`."""
        raise NotImplementedError(f"{type(self).__name__} must implement grads_to_matrix")

    def matrix_to_grads(self, matrix):
        """Inverse of `grads_to_matrix`."""
        raise NotImplementedError(f"{type(self).__name__} must implement matrix_to_grads")

    def kronecker_matrices(self, grads):
        """One pair (or one per group): `[grads_to_matrix(grads)]`."""
        return [self.grads_to_matrix(grads)]

    def grads_from_kronecker_matrices(self, matrices):
        """Inverse of `kronecker_matrices`."""
        return self.matrix_to_grads(matrices[0])

    def per_example_rows(self, captures):
        """Per-example rows of the captured tensors.

        Returns `(inputs, grads)`, float32 tensors of shapes
        `(..., examples, locations, input_dim)` and `(..., examples,
        locations, output_dim)` (the leading axis is the group axis of a
        grouped block), such that example `n`'s gradient matrix is
        `sum_t inputs[..., n, t] grads[..., n, t]^T` (its rows carry the same
        `sqrt(c_n)` scale as the factor statistics).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement per_example_rows")

    def per_example_weights(self, captures):
        """Row weights aligned with `per_example_rows`: `(examples,
        locations)` float32, or None when no capture carries weights.

        The default accepts only unweighted captures; a block whose layout
        supports weights overrides it (with `location_weights`).

        Raises:
            NotImplementedError: a capture carries row weights.
        """
        if any(split_capture(c)[2] is not None for c in captures):
            raise NotImplementedError(
                f"{type(self).__name__} ({self.name!r}) cannot weigh its rows: it has "
                "no `per_example_weights`, so sample weights and masks cannot enter "
                "its factors.")
        return None

    def _flat_weights(self, captures):
        weights = self.per_example_weights(captures)
        return None if weights is None else tf.reshape(weights, [-1])

    def compute_factors(self, captures, num_examples):
        """This estimate's `(A, G)` from the captured tensors (default: the
        KFC convention of `location_factors` over `per_example_rows`,
        weighted by `per_example_weights`)."""
        inputs, grads = self.per_example_rows(captures)
        lead = [] if self.num_groups is None else [self.num_groups]
        return location_factors(tf.reshape(inputs, lead + [-1, self.input_dim]),
                                tf.reshape(grads, lead + [-1, self.output_dim]),
                                num_examples, self._flat_weights(captures))

    def input_count(self, captures, num_examples):
        """`m_w`, the weighted number of examples the input factor of
        `compute_factors` averages (`num_examples` without row weights)."""
        return weighted_count(self._flat_weights(captures), num_examples)

    def scaling_estimate(self, captures, num_examples):
        """EKFAC's estimate `mean_n (Q_A^T dW_n Q_G)^2` in the current basis."""
        inputs, grads = self.per_example_rows(captures)
        rotated_inputs = self.input_side.rotate_rows(inputs)
        rotated_grads = self.output_side.rotate_rows(grads)
        if rotated_inputs.shape[-2] == 1:
            # One location: the rotated gradient is an outer product, and the
            # square of an outer product is the outer product of the squares.
            return tf.matmul(tf.square(rotated_inputs[..., 0, :]),
                             tf.square(rotated_grads[..., 0, :]),
                             transpose_a=True) / num_examples
        per_example = tf.einsum("...nti,...ntj->...nij", rotated_inputs, rotated_grads)
        return tf.reduce_sum(tf.square(per_example), axis=-3) / num_examples

    # -- state ---------------------------------------------------------------
    @property
    def uses_eigenbasis_scalings(self):
        return self.inverse_method == "ekfac"

    @property
    def matrix_shape(self):
        """Shape of the gradient matrices `(..., input_dim, output_dim)`."""
        return self.output_side.batch_shape + (self.input_dim, self.output_dim)

    def build(self, optimizer):
        if self.built:
            return
        prefix = self.name.replace("/", "_")
        self.input_side.build(optimizer, prefix, self.inverse_method)
        self.output_side.build(optimizer, prefix, self.inverse_method)
        self._scaling_state = []
        if self.uses_eigenbasis_scalings:
            self.eigenbasis_scalings = optimizer.add_variable(
                self.matrix_shape, initializer="ones", dtype="float32",
                name=f"{prefix}_eigenbasis_scalings")
            self.scaling_estimates = optimizer.add_variable(
                (), initializer="zeros", dtype="float32", name=f"{prefix}_scaling_estimates")
            self._scaling_state = [self.eigenbasis_scalings, self.scaling_estimates]
        self.built = True

    def state_variables(self):
        return (self.input_side.state_variables() + self.output_side.state_variables()
                + self._scaling_state)

    def factor_shapes(self):
        return {"input_factor": self.input_side.shape,
                "output_grad_factor": self.output_side.shape}

    # The factors' variables, under the names the optimizer state uses.
    input_factor = property(lambda self: self.input_side.factor)
    output_grad_factor = property(lambda self: self.output_side.factor)
    input_factor_inverse = property(lambda self: self.input_side.inverse)
    output_grad_factor_inverse = property(lambda self: self.output_side.inverse)
    input_eigenvalues = property(lambda self: self.input_side.eigenvalues)
    input_eigenvectors = property(lambda self: self.input_side.eigenvectors)
    output_grad_eigenvalues = property(lambda self: self.output_side.eigenvalues)
    output_grad_eigenvectors = property(lambda self: self.output_side.eigenvectors)

    # -- pipeline ------------------------------------------------------------
    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        input_factor, output_grad_factor = self.compute_factors(captures, num_examples)
        self.input_side.fold(input_factor, decay, self.input_count(captures, num_examples))
        self.output_side.fold(output_grad_factor, decay)

    def curvature_scale(self):
        """`(tr A / dim A) (tr G / dim G)`, the mean eigenvalue of `A (x) G`
        (one per group)."""
        return self.input_side.mean_trace() * self.output_side.mean_trace()

    def update_inverses(self, damping):
        if self.inverse_method in EIGEN_METHODS:
            self.input_side.decompose_eigen()
            self.output_side.decompose_eigen()
            if self.uses_eigenbasis_scalings:
                # A new basis: the old scalings no longer apply. Start from the
                # Kronecker eigenvalues; the next estimate replaces them.
                self.eigenbasis_scalings.assign(self._kronecker_spectrum())
                self.scaling_estimates.assign(0.0)
            return
        pi = linalg.trace_ratio_pi(self.input_side.mean_trace(),
                                   self.output_side.mean_trace())
        # Relative mode: lambda tr(A)/dim tr(G)/dim, so pi gamma = sqrt(lambda) tr(A)/dim
        # and gamma / pi = sqrt(lambda) tr(G)/dim: each factor by its own mean eigenvalue.
        gamma = tf.sqrt(tf.cast(self.block_damping(damping), tf.float32))
        self.input_side.decompose_damped(pi * gamma, self.inverse_method)
        self.output_side.decompose_damped(gamma / pi, self.inverse_method)

    def _kronecker_spectrum(self, indices=None):
        return (self.input_side.spectrum(indices)[..., :, None]
                * self.output_side.spectrum()[..., None, :])

    def update_scalings(self, captures, num_examples, factor_decay):
        """EKFAC: folds one estimate of the corrected diagonal into `S`.

        The estimate is `mean_n (Q_A^T dW_n Q_G)^2` over the statistics
        subset (`scaling_estimate`), in the current eigenbasis; see
        `fold_scalings`.

        Args:
            captures: as in `update_statistics`.
            num_examples: float32 scalar, the size of the statistics subset.
            factor_decay: float, the largest weight of the old value; or an
                `EstimateRecorder`, which keeps the estimate for a later
                `fold_scalings` (after averaging it over replicas).
        """
        if not self.uses_eigenbasis_scalings:
            return super().update_scalings(captures, num_examples, factor_decay)
        estimate = self.scaling_estimate(captures, num_examples)
        if isinstance(factor_decay, EstimateRecorder):
            factor_decay.record_scalings(self, estimate)
        else:
            self.fold_scalings(estimate, factor_decay)
        return None

    def fold_scalings(self, estimate, factor_decay):
        """Moving average of `S` with weight `min(1 - 1/k, factor_decay)`, `k`
        counting estimates since the last eigenbasis change (so the first
        estimate in a new basis replaces the initial `outer(d_A, d_G)`)."""
        self.scaling_estimates.assign_add(1.0)
        count = tf.convert_to_tensor(self.scaling_estimates)
        decay = tf.minimum(1.0 - 1.0 / count, factor_decay)
        ema_assign(self.eigenbasis_scalings, estimate, decay)

    def precondition_matrix(self, matrix, damping, indices=None):
        """`(F + damping I)^{-1}` applied to gradient matrices (or to the rows
        `indices` of one, for sparse gradients)."""
        inputs, outputs = self.input_side, self.output_side
        if self.inverse_method not in EIGEN_METHODS:
            return outputs.multiply_inverse(
                inputs.multiply_inverse(matrix, INPUT_SIDE, indices), OUTPUT_SIDE)
        rotated = outputs.to_eigenbasis(
            inputs.to_eigenbasis(matrix, INPUT_SIDE, indices), OUTPUT_SIDE)
        if self.uses_eigenbasis_scalings:
            diagonal = tf.convert_to_tensor(self.eigenbasis_scalings)
            if indices is not None:
                diagonal = tf.gather(diagonal, indices)
        else:
            diagonal = self._kronecker_spectrum(indices)
        damping = tf.cast(self.block_damping(damping), tf.float32)
        if self.damping_mode == "relative":  # one value per group
            damping = tf.reshape(damping, self.input_side.batch_shape + (1, 1))
        scaled = rotated / (diagonal + damping)
        return inputs.from_eigenbasis(
            outputs.from_eigenbasis(scaled, OUTPUT_SIDE), INPUT_SIDE, indices)

    def multiply_damped_inverse(self, grads, damping):
        if self.accepts_indexed_slices and isinstance(grads[0], tf.IndexedSlices):
            sparse = grads[0]
            values = self.precondition_matrix(tf.cast(sparse.values, tf.float32), damping,
                                              sparse.indices)
            return [tf.IndexedSlices(values, sparse.indices, sparse.dense_shape)]
        matrix = tf.cast(self.grads_to_matrix(grads), tf.float32)
        return self.matrix_to_grads(self.precondition_matrix(matrix, damping))


def location_rows(tensor, width):
    """Reshapes `(batch, ..., width)` to `(batch * locations, width)`, float32."""
    return tf.reshape(tf.cast(tensor, tf.float32), [-1, width])


def example_rows(tensor, width):
    """Reshapes `(batch, ..., width)` to `(batch, locations, width)`, float32."""
    tensor = tf.cast(tensor, tf.float32)
    locations = 1
    for size in tensor.shape[1:-1]:
        locations = None if (locations is None or size is None) else locations * size
    return tf.reshape(tensor, [tf.shape(tensor)[0], -1 if locations is None else locations,
                               width])


def location_weights(row_weight, examples, location_sizes):
    """`(examples, L)` float32 weights of one capture's `L` locations.

    Args:
        row_weight: `(m,)` per-example or `(m, T)` per-position weights, or
            None (ones).
        examples: int (scalar tensor) `m`.
        location_sizes: the sizes (ints or scalar tensors) of the capture's
            location axes, in row order; `L` is their product.

    Per-example weights apply to every location. Per-position weights apply
    position by position when the capture has one location axis of length
    `T` (sequence layers: Dense or EinsumDense on `(batch, T, d)`, recurrent
    steps, embedding lookups); otherwise (e.g. a 2-D convolution, or a layer
    after a pooling over time) each example weighs its mean position weight.
    """
    count = 1
    for size in location_sizes:
        count = count * size
    if row_weight is None:
        return tf.ones(tf.stack([examples, count]), tf.float32)
    weight = tf.cast(row_weight, tf.float32)
    if weight.shape.rank == 2:
        size = location_sizes[0] if len(location_sizes) == 1 else None
        static = size if isinstance(size, int) else None
        aligned = len(location_sizes) == 1 and (
            weight.shape[1] is None or static is None or weight.shape[1] == static)
        if aligned:
            return weight
        weight = tf.reduce_mean(weight, axis=1)
    return weight[:, None] * tf.ones(tf.stack([1, count]), tf.float32)


def join_location_weights(captures, sizes):
    """Per-capture `location_weights` concatenated along the location axis
    (the uses of a shared layer), or None when no capture carries weights.

    Args:
        captures: the block's captures (pairs or triples).
        sizes: per capture, `(examples, location_sizes)` as taken by
            `location_weights`.
    """
    weights = [split_capture(c)[2] for c in captures]
    if all(w is None for w in weights):
        return None
    return tf.concat([location_weights(w, examples, location_sizes)
                      for w, (examples, location_sizes) in zip(weights, sizes)], axis=1)


def static_or_dynamic_sizes(tensor, axes):
    """The sizes of `tensor` along `axes`: ints where static, else tensors."""
    return [tensor.shape[a] if tensor.shape[a] is not None else tf.shape(tensor)[a]
            for a in axes]


def append_homogeneous(rows):
    """Appends a column of ones: `[a, 1]`."""
    return tf.concat([rows, tf.ones_like(rows[..., :1])], axis=-1)
