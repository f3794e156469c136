"""Block-tridiagonal inverse for chains of Dense layers (Martens & Grosse 2015, section 4.3).

A *chain* is a sequence of Dense layers `1..l` in which the input of layer
`i+1` is exactly the output `a_i = phi(s_i)` of layer `i` (each layer called
once, on rank-2 inputs). For a chain, K-FAC can also model the Fisher blocks
between neighbouring layers (KFAC_NOTES section 4):

    Ft_ij = A_{i-1,j-1} (x) G_ij,  A_{i-1,i} = E[abar_{i-1} abar_i^T],  G_{i,i+1} = E[g_i g_{i+1}^T]

(the cross factors are rectangular). The approximation `Fhat` agrees with `Ft`
on the diagonal and first off-diagonal blocks and has a block-tridiagonal
*inverse* (a chain-structured Gaussian graphical model over the layers'
gradients), `Fhat^{-1} = Xi^T Lambda Xi` with

* `Psi_{i,i+1} = Ft_{i,i+1} Ft_{i+1,i+1}^{-1} = PsiA (x) PsiG`,
  `PsiA = A_{i-1,i} A_{ii}^{-1}`, `PsiG = G_{i,i+1} G_{i+1,i+1}^{-1}`;
* `Sigma_{i|i+1} = Ft_ii - Psi Ft_{i+1,i+1} Psi^T = A1 (x) B1 - A2 (x) B2` with
  `A1 = A_{i-1,i-1}`, `B1 = G_ii`, `A2 = PsiA A_ii PsiA^T`,
  `B2 = PsiG G_{i+1,i+1} PsiG^T`; `Sigma_l = Ft_ll`;
* `Xi` block upper-bidiagonal with identity diagonal and `-Psi_{i,i+1}` above
  it, `Lambda = blockdiag(Sigma_{1|2}^{-1}, ..., Sigma_l^{-1})`.

The inverse of `A1 (x) B1 - A2 (x) B2` uses the generalized eigenproblems
`A2 x = s A1 x` and `B2 y = s B1 y`: with `A1 = L L^T` (Cholesky),
`L^{-1} A2 L^{-T} = E diag(s_A) E^T` and `K_A = L^{-T} E` we have
`K_A^T A1 K_A = I` and `K_A^T A2 K_A = diag(s_A)` (the same for `B`), so

    Sigma^{-1} vec(V) = vec(K_A [(K_A^T V K_B) / (1 - outer(s_A, s_B))] K_B^T).

(`K_A` plays the role of `A1^{-1/2} E_A` in the paper; any square root of
`A1` gives the same product.) `s_A`, `s_B` are in `[0, 1)` in exact arithmetic
(`A2 <= A1` because the joint second moment of `(abar_{i-1}, abar_i)` is
positive semi-definite and `A1` is damped); they are clipped to
`[0, MAX_CONDITIONAL_EIGENVALUE]` against round-off.

Damping (paper sections 4.3 and 6.3): factored Tikhonov is applied to the
diagonal factors first, `A_{i-1,i-1} + pi_i gamma I` and `G_ii + gamma/pi_i I`
with `gamma = sqrt(damping)` and each layer's own `pi_i`; Psi and Sigma are
formed from the damped diagonal factors and the undamped cross factors. As
with `inverse_method="cholesky"`, the damping is baked into the stored
decompositions: a new damping value (a schedule or the Levenberg-Marquardt
rule) takes effect at the next inverse update, up to `inv_update_every` steps
later.

Preconditioning a gradient list `V_1..V_l` (matrices `[dK; db]`):
`u_i = V_i - PsiA_i V_{i+1} PsiG_i^T` (`u_l = V_l`), `w_i = Sigma_{i|i+1}^{-1} u_i`,
`r_1 = w_1`, `r_{i+1} = w_{i+1} - PsiA_i^T w_i PsiG_i`. Cost: 8 matrix
products per layer instead of 2, about 3-4x the block-diagonal product
(measured 3.2x on the paper's autoencoder, CPU); the decompositions add a
Cholesky factorization and an `eigh` per factor per link.

Memory per link `i -> i+1`: the cross factors `(d_in_i, d_in_{i+1})` and
`(d_out_i, d_out_{i+1})`, `PsiA` and `PsiG` of the same shapes, and `K_A`,
`K_B` (square, like the diagonal factors) with their eigenvalues.

Chains are found at registration (`kfac_keras.chains.group_dense_chains`) by tracing the
model's forward pass once with the capture wrappers on: a link `i -> j`
exists when the tensor layer `j` receives is the very tensor layer `i`
returned, both layers are called once on rank-2 inputs, and layer `i`'s output
feeds no other Dense layer. This works for Functional, Sequential and
subclassed models (the latter need a known input shape, i.e. a model built by
`build(shape)` or by calling it). Layers outside chains keep their
block-diagonal blocks. Anything between two Dense layers (Dropout, an
Activation layer, a residual add) ends the chain.
"""

import tensorflow as tf

from kfac_keras import linalg
from kfac_keras.blocks.base import (RELATIVE_SCALE_FLOOR, FisherBlock, StatisticsSource,
                                    ema_assign, split_capture)
from kfac_keras.blocks.dense import DenseBlock
from kfac_keras.blocks.factors import weighted_count
from kfac_keras.blocks.kronecker import append_homogeneous, location_rows

#: Upper clip of the generalized eigenvalues `s_A`, `s_B` (see module doc).
MAX_CONDITIONAL_EIGENVALUE = 1.0 - 1e-5

#: Inverse methods a chain block accepts (factored Tikhonov damping).
CHAIN_INVERSE_METHODS = ("cholesky", "inverse")


def generalized_eigh(positive, other):
    """Solves `other x = s positive x` for symmetric `positive` (PD) and `other` (PSD).

    Args:
        positive: `(d, d)` symmetric positive definite float32 matrix.
        other: `(d, d)` symmetric positive semi-definite float32 matrix.

    Returns:
        `(s, K)` with `K^T positive K = I` and `K^T other K = diag(s)`; `s` is
        clipped to `[0, MAX_CONDITIONAL_EIGENVALUE]`.
    """
    chol = tf.linalg.cholesky(linalg.symmetrize(positive))
    left = tf.linalg.triangular_solve(chol, linalg.symmetrize(other), lower=True)
    whitened = tf.linalg.triangular_solve(
        chol, tf.linalg.matrix_transpose(left), lower=True)
    values, vectors = tf.linalg.eigh(linalg.symmetrize(whitened))
    basis = tf.linalg.triangular_solve(chol, vectors, lower=True, adjoint=True)
    return tf.clip_by_value(values, 0.0, MAX_CONDITIONAL_EIGENVALUE), basis


def _solve_right(matrix, positive):
    """`matrix @ positive^{-1}` for symmetric positive definite `positive`."""
    chol = tf.linalg.cholesky(linalg.symmetrize(positive))
    return tf.linalg.matrix_transpose(
        tf.linalg.cholesky_solve(chol, tf.linalg.matrix_transpose(matrix)))


class DenseChainBlock(FisherBlock):
    """One block-tridiagonal Fisher block for a chain of Dense layers.

    The block covers all the chain's variables (kernel and bias of each
    layer, in chain order), so `multiply_damped_inverse` couples the layers.

    Args:
        layers: the chain's `keras.layers.Dense` layers, in order; at least 2.
            Each layer's input must be the previous layer's output (see
            `group_dense_chains`).
        inverse_method: `"cholesky"` (default) or `"inverse"`, used for the
            last layer's damped inverses; the other layers always use a
            Cholesky factorization and a symmetric eigendecomposition.
    """

    kind = "tridiagonal (dense chain)"
    statistics_source = StatisticsSource.CAPTURES

    def __init__(self, layers, inverse_method="cholesky"):
        layers = list(layers)
        if len(layers) < 2:
            raise ValueError(
                f"A Dense chain needs at least 2 layers; received {len(layers)}.")
        if inverse_method not in CHAIN_INVERSE_METHODS:
            raise ValueError(
                f"Tridiagonal chain blocks use factored Tikhonov damping: "
                f"`inverse_method` must be one of {CHAIN_INVERSE_METHODS}; "
                f"received {inverse_method!r}.")
        self.members = [DenseBlock(layer, inverse_method="cholesky") for layer in layers]
        for previous, following in zip(self.members[:-1], self.members[1:]):
            if previous.output_dim != following.input_units:
                raise ValueError(
                    f"Layers {previous.name!r} ({previous.output_dim} units) and "
                    f"{following.name!r} ({following.input_units} inputs) cannot "
                    "form a chain.")
        name = "chain[" + " -> ".join(m.name for m in self.members) + "]"
        variables = [v for member in self.members for v in member.variables]
        super().__init__(name, variables, layer=None)
        self.layers = layers
        self.inverse_method = inverse_method

    def capture_layers(self):
        return list(self.layers)

    # -- state ---------------------------------------------------------------
    def build(self, optimizer):
        if self.built:
            return

        def add(shape, initializer, name):
            return optimizer.add_variable(
                tuple(shape), initializer=initializer, dtype="float32", name=name)

        self.input_factors, self.output_grad_factors = [], []
        for member in self.members:
            prefix = member.name.replace("/", "_")
            self.input_factors.append(add(
                (member.input_dim,) * 2, "zeros", f"{prefix}_input_factor"))
            self.output_grad_factors.append(add(
                (member.output_dim,) * 2, "zeros", f"{prefix}_output_grad_factor"))
        self.input_cross_factors, self.output_grad_cross_factors = [], []
        self.input_psi, self.output_grad_psi = [], []
        self.input_bases, self.input_values = [], []
        self.output_grad_bases, self.output_grad_values = [], []
        for member, following in zip(self.members[:-1], self.members[1:]):
            prefix = member.name.replace("/", "_")
            input_shape = (member.input_dim, following.input_dim)
            output_shape = (member.output_dim, following.output_dim)
            self.input_cross_factors.append(add(
                input_shape, "zeros", f"{prefix}_input_cross_factor"))
            self.output_grad_cross_factors.append(add(
                output_shape, "zeros", f"{prefix}_output_grad_cross_factor"))
            self.input_psi.append(add(input_shape, "zeros", f"{prefix}_input_psi"))
            self.output_grad_psi.append(add(output_shape, "zeros", f"{prefix}_output_grad_psi"))
            self.input_bases.append(add(
                (member.input_dim,) * 2, "identity", f"{prefix}_input_sigma_basis"))
            self.input_values.append(add(
                (member.input_dim,), "zeros", f"{prefix}_input_sigma_values"))
            self.output_grad_bases.append(add(
                (member.output_dim,) * 2, "identity", f"{prefix}_output_grad_sigma_basis"))
            self.output_grad_values.append(add(
                (member.output_dim,), "zeros", f"{prefix}_output_grad_sigma_values"))
        last = self.members[-1]
        prefix = last.name.replace("/", "_")
        self.last_input_inverse = add(
            (last.input_dim,) * 2, "identity", f"{prefix}_input_factor_inverse")
        self.last_output_grad_inverse = add(
            (last.output_dim,) * 2, "identity", f"{prefix}_output_grad_factor_inverse")
        self.built = True

    def state_variables(self):
        return (self.input_factors + self.output_grad_factors
                + self.input_cross_factors + self.output_grad_cross_factors
                + self.input_psi + self.output_grad_psi
                + self.input_bases + self.input_values
                + self.output_grad_bases + self.output_grad_values
                + [self.last_input_inverse, self.last_output_grad_inverse])

    def factor_shapes(self):
        shapes = {}
        for index, member in enumerate(self.members):
            shapes[f"A{index}"] = (member.input_dim, member.input_dim)
            shapes[f"G{index}"] = (member.output_dim, member.output_dim)
        for index, (member, following) in enumerate(zip(self.members[:-1], self.members[1:])):
            shapes[f"A{index},{index + 1}"] = (member.input_dim, following.input_dim)
            shapes[f"G{index},{index + 1}"] = (member.output_dim, following.output_dim)
        return shapes

    def describe(self):
        info = super().describe()
        info["layer_class"] = f"Dense chain x{len(self.members)}"
        info["chain"] = [member.name for member in self.members]
        return info

    # -- captures ------------------------------------------------------------
    def verify_captures(self, recorder):
        """Checks, at trace time, that the forward pass still forms this chain.

        Args:
            recorder: the capture recorder of the current forward pass.

        Raises:
            RuntimeError: if a layer was called more than once or a layer's
                input is not the previous layer's output.
        """
        for previous, following in zip(self.layers[:-1], self.layers[1:]):
            uses = recorder.for_layer(following)
            outputs = recorder.outputs_for(previous)
            if len(uses) != 1 or len(outputs) != 1 or uses[0][0] is not outputs[0]:
                raise RuntimeError(
                    f"K-FAC registered the Dense chain {self.name} (approximation="
                    f"'tridiagonal'), but in this forward pass layer "
                    f"{following.name!r} does not receive the output of "
                    f"{previous.name!r} exactly once. A model whose forward pass "
                    "changes between calls needs approximation='block_diagonal'.")

    def _rows(self, captures):
        """Per layer: input rows, gradient rows and row weights (or None)."""
        if len(captures) != len(self.members):
            raise ValueError(
                f"{self.name} expects one capture per layer ({len(self.members)}); "
                f"received {len(captures)}.")
        inputs, grads, weights = [], [], []
        for member, capture in zip(self.members, captures):
            layer_inputs, layer_grads, _ = split_capture(capture)
            rows = location_rows(layer_inputs, member.input_units)
            if member.has_bias:
                rows = append_homogeneous(rows)
            inputs.append(rows)
            grads.append(location_rows(layer_grads, member.output_dim))
            layer_weights = member.per_example_weights([capture])
            weights.append(None if layer_weights is None else tf.reshape(layer_weights, [-1]))
        return inputs, grads, weights

    # -- pipeline ------------------------------------------------------------
    def update_statistics(self, captures, sampled_grads, num_examples, decay):
        """Folds `A_ii`, `G_ii` and the cross factors `A_{i,i+1}`, `G_{i,i+1}`.

        With row weights `r_i` (sample weights, masks) the input factors are
        weighted means (`location_factors`), the cross factor of layers `i`
        and `i+1` with weights `sqrt(r_i r_{i+1})` (`= r` when both layers see
        the same rows' weights, as in a chain); `G`s are unweighted.
        """
        inputs, grads, weights = self._rows(captures)

        def second_moment(left, right):
            return tf.matmul(left, right, transpose_a=True) / num_examples

        def input_moment(left, right, row_weights):
            if row_weights is None:
                return second_moment(left, right), None
            count = weighted_count(row_weights, num_examples)
            return tf.math.divide_no_nan(tf.matmul(
                left * row_weights[:, None], right, transpose_a=True), count), count

        for index in range(len(self.members)):
            moment, count = input_moment(inputs[index], inputs[index], weights[index])
            ema_assign(self.input_factors[index], moment, decay, count)
            ema_assign(self.output_grad_factors[index],
                       second_moment(grads[index], grads[index]), decay)
        for index in range(len(self.members) - 1):
            pair = weights[index:index + 2]
            if all(w is None for w in pair):
                cross_weights = None
            else:
                ones = [tf.ones_like(inputs[i][:, 0]) for i in (index, index + 1)]
                cross_weights = tf.sqrt(
                    (ones[0] if pair[0] is None else pair[0])
                    * (ones[1] if pair[1] is None else pair[1]))
            moment, count = input_moment(inputs[index], inputs[index + 1], cross_weights)
            ema_assign(self.input_cross_factors[index], moment, decay, count)
            ema_assign(self.output_grad_cross_factors[index],
                       second_moment(grads[index], grads[index + 1]), decay)

    def damped_factors(self, damping):
        """The diagonal factors with factored Tikhonov damping, per layer.

        Returns:
            `(inputs, output_grads)`: lists of `A_{i-1,i-1} + pi_i gamma I` and
            `G_ii + (gamma / pi_i) I`, `gamma = sqrt(damping)` (relative mode:
            `gamma_i = sqrt(damping (tr A_ii / dim) (tr G_ii / dim))`, each
            layer damped relative to its own diagonal factors).
        """
        damped_inputs, damped_grads = [], []
        for input_factor, grad_factor in zip(self.input_factors, self.output_grad_factors):
            input_factor = linalg.symmetrize(tf.convert_to_tensor(input_factor))
            grad_factor = linalg.symmetrize(tf.convert_to_tensor(grad_factor))
            pi = linalg.pi_adjustment(input_factor, grad_factor)
            layer_damping = tf.cast(damping, tf.float32)
            if self.damping_mode == "relative":
                layer_damping *= tf.maximum(
                    linalg.mean_diagonal(input_factor) * linalg.mean_diagonal(grad_factor),
                    RELATIVE_SCALE_FLOOR)
            gamma = tf.sqrt(layer_damping)
            damped_inputs.append(
                input_factor + pi * gamma * tf.eye(tf.shape(input_factor)[0]))
            damped_grads.append(
                grad_factor + (gamma / pi) * tf.eye(tf.shape(grad_factor)[0]))
        return damped_inputs, damped_grads

    def update_inverses(self, damping):
        damped_inputs, damped_grads = self.damped_factors(damping)
        for index in range(len(self.members) - 1):
            input_cross = tf.convert_to_tensor(self.input_cross_factors[index])
            grad_cross = tf.convert_to_tensor(self.output_grad_cross_factors[index])
            psi_input = _solve_right(input_cross, damped_inputs[index + 1])
            psi_grad = _solve_right(grad_cross, damped_grads[index + 1])
            # PsiA A_ii PsiA^T = A_{i-1,i} A_ii^{-1} A_{i,i-1} (same for G).
            conditional_input = tf.matmul(psi_input, input_cross, transpose_b=True)
            conditional_grad = tf.matmul(psi_grad, grad_cross, transpose_b=True)
            input_values, input_basis = generalized_eigh(damped_inputs[index],
                                                         conditional_input)
            grad_values, grad_basis = generalized_eigh(damped_grads[index],
                                                       conditional_grad)
            self.input_psi[index].assign(psi_input)
            self.output_grad_psi[index].assign(psi_grad)
            self.input_bases[index].assign(input_basis)
            self.input_values[index].assign(input_values)
            self.output_grad_bases[index].assign(grad_basis)
            self.output_grad_values[index].assign(grad_values)
        # Sigma_l = Ft_ll: the damped diagonal factors (with zero damping added,
        # since it is already in them).
        self.last_input_inverse.assign(linalg.damped_inverse(
            damped_inputs[-1], 0.0, self.inverse_method))
        self.last_output_grad_inverse.assign(linalg.damped_inverse(
            damped_grads[-1], 0.0, self.inverse_method))

    def multiply_damped_inverse(self, grads, damping):
        matrices, position = [], 0
        for member in self.members:
            count = len(member.variables)
            matrices.append(tf.cast(
                member.grads_to_matrix(grads[position:position + count]), tf.float32))
            position += count
        last = len(self.members) - 1
        # u = Xi V
        conditioned = []
        for index in range(last):
            predicted = tf.matmul(
                tf.matmul(self.input_psi[index], matrices[index + 1]),
                self.output_grad_psi[index], transpose_b=True)
            conditioned.append(matrices[index] - predicted)
        conditioned.append(matrices[last])
        # w = Lambda u
        whitened = []
        for index in range(last):
            input_basis = tf.convert_to_tensor(self.input_bases[index])
            grad_basis = tf.convert_to_tensor(self.output_grad_bases[index])
            rotated = tf.matmul(tf.matmul(input_basis, conditioned[index], transpose_a=True),
                                grad_basis)
            scale = 1.0 - (self.input_values[index][:, None]
                           * self.output_grad_values[index][None, :])
            whitened.append(tf.matmul(tf.matmul(input_basis, rotated / scale),
                                      grad_basis, transpose_b=True))
        whitened.append(tf.matmul(tf.matmul(self.last_input_inverse, conditioned[last]),
                                  self.last_output_grad_inverse))
        # r = Xi^T w
        results = [whitened[0]]
        for index in range(last):
            back = tf.matmul(tf.matmul(self.input_psi[index], whitened[index],
                                       transpose_a=True),
                             self.output_grad_psi[index])
            results.append(whitened[index + 1] - back)
        out = []
        for member, matrix in zip(self.members, results):
            out.extend(member.matrix_to_grads(matrix))
        return out

    def kronecker_matrices(self, grads):
        """Each layer's `[K; b]`: the chain couples the layers in the
        preconditioned gradient, but each layer keeps its own pair's layout."""
        matrices, position = [], 0
        for member in self.members:
            count = len(member.variables)
            matrices.extend(member.kronecker_matrices(grads[position:position + count]))
            position += count
        return matrices

    def grads_from_kronecker_matrices(self, matrices):
        """Inverse of `kronecker_matrices`."""
        return [grad for member, matrix in zip(self.members, matrices)
                for grad in member.grads_from_kronecker_matrices([matrix])]
