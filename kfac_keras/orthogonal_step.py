"""The orthogonal step rule (`KFAC(step_rule="orthogonal")`): which matrices
of each Fisher block are orthogonalised, and the step of the others.

The maths is in `kfac_keras.step_rules` (`orthogonal_direction`); this module
maps each block's preconditioned gradients `Delta` to its *Kronecker
matrices* `P` (one per Kronecker pair `A (x) G`, in the pair's own layout
`(input_dim, output_dim)`, bias row included), replaces each by
`0.2 sqrt(max(rows, cols)) NS_k(P)`, and maps the result back. Each block
declares its matrices through the block contract
(`FisherBlock.kronecker_matrices` / `grads_from_kronecker_matrices`,
`kfac_keras.blocks.base`; None for a block without Kronecker pairs). Per
block:

* A `KroneckerBlock` other than an Embedding (Dense, EinsumDense,
  convolutions and transposed convolutions, SimpleRNN/LSTM `[W; U; b]`): its matrix
  `grads_to_matrix`. Grouped and depthwise convolutions have one pair
  per group, so one matrix per group (a batch of polar factors): the Fisher
  block is block-diagonal over groups, and each group's step gets the fixed
  RMS (a depthwise channel with `depth_multiplier=1` is a `(k + 1, 1)`
  column, whose step is its normalised direction).
* A GRU (`reset_after=True`): two pairs, so two matrices, `[W; b_input]`
  and `[U; b_recurrent]` (the bias rows split as its block does).
* A separable convolution: the depthwise part (per channel) and the pointwise
  `[K; b]`, each as above.
* A tridiagonal chain (`approximation="tridiagonal"`): the chain couples the
  layers in `Delta`, but each layer keeps its own `[K; b]`: one matrix per
  layer of the chain, orthogonalised after the chain's preconditioning.
* An Embedding block (token or position table): not orthogonalised. It
  takes the KL-clipped step of the other non-orthogonalised variables (its
  preconditioned table `diag(freq)^-1 (x) G^-1` applied row by row, the clip
  scale computed jointly with them) times `EMBEDDING_LEARNING_RATE_FACTOR`
  (30), i.e. the KL-clipped step at 30x the learning rate (0.3 at the default
  1e-2). Rows absent from the batch have a zero preconditioned gradient, so
  they stay still (momentum aside), and no `(vocabulary, dim)` matrix product
  is formed. Why (tools/step_efficiency/RESULTS.md, S5-embed): orthogonalising
  the table (session 4) left the transformer LM on its unigram plateau for
  400 steps, at any scale (a wide table of 32 present rows gets every row
  step normalised and decorrelated, and its weight rows grew 10x while the
  gradient shrank 50x), and a per-row normalised step did too at RMS 0.2;
  the KL-clipped step at the orthogonal rule's own learning rate (factor 1)
  left keras-io's transformer classifier at chance after one epoch. Factor
  30 was chosen on both together (LM floor+1.0 / +0.7 in 301 / 400 steps, as
  Muon / better; classifier val accuracy 0.908 / 0.9525 vs Adam 0.6795 /
  0.953); factor 10 was better on the LM (281 / 369) and worse on the
  classifier (0.8725 / 0.921), 100 stalled the LM. The same on one device
  and under a multi-replica step (the clip scale is a sum over all-reduced
  gradients).
* Every other block (diagonal, identity, LayerNormalization/BatchNorm
  scale-shift, variables of layers without a Kronecker block): the
  `kl_clip` step, `Delta` scaled by `kfac_keras.step_rules.kl_clipping_scale`
  computed over these variables alone (`norm_constraint`; unscaled when it
  is None), times the learning rate.

Nothing is refused: every block either has Kronecker matrices (whose polar
factor is defined for any shape, a zero matrix giving a zero step) or takes
the KL-clipped step; the first step logs which blocks took which (a warning
if none is orthogonalised, since the option then changes nothing but the
learning rate's default).

**The Newton bound** (`KFAC(orthogonal_step_bound=...)`, default 1.0):
each matrix's orthogonal step `lr D` (`D = 0.2 sqrt(max) NS_k(P)`, before
momentum) is shortened, when it is longer, to `bound * ||P||_F`:

    D <- D * min(1, bound ||P||_F / (lr ||D||_F)).

`P` is the minimiser of the block's damped quadratic model (the K-FAC
step at learning rate 1), so at bound 1 the rule never steps beyond the
point its own model says is best. The orthogonal direction's length is
fixed by the learning rate whatever the gradient's size; once a model
fits its data the gradient (and `P`) vanishes while the fixed-RMS step
does not, the weights grow linearly (the logits with them), and a
misclassified example then costs an enormous loss (the BiLSTM classifier,
tools/keras_programs/FINDINGS.md, S6-bilstm). While `P` is long (early
training: `||P||_F` 5-20000x `lr ||D||_F` on the BiLSTM; never on the AE,
CNN and LM benchmarks) the bound does not bind. Loss-scale invariant at the default
relative damping (`P` and `D` are both unchanged when the loss is
multiplied by a constant); it makes the step at most linear in `lr`
(shorter where it binds). `None` turns it off (the fixed-RMS step).
`bound_fraction` is the fraction of the orthogonalised matrices it
shortened at the last step (logged as `orthogonal_bound`).

Momentum (the optimizer's heavy-ball velocity) is applied after this
direction, and the Levenberg-Marquardt rule judges the update actually
taken (`mu delta0 - lr direction`).
"""

import tensorflow as tf
from absl import logging

from kfac_keras import step_rules

#: The Embedding tables' KL-clipped step is this many times the learning
#: rate's (module docstring; tools/step_efficiency/RESULTS.md, S5-embed).
EMBEDDING_LEARNING_RATE_FACTOR = 30.0


class OrthogonalStep:
    """Turns the preconditioned gradients into the orthogonal rule's directions.

    Args:
        iterations: int >= 1, Newton-Schulz iterations of every matrix, or a
            dict `{"iterations": k, "large_iterations": k_large,
            "large_min_dim": n}`: `k_large` for the matrices whose smaller
            side is at least `n`, `k` for the others (`KFAC`'s resolved
            `orthogonal_iterations`).
        dtype: the dtype of the Newton-Schulz matrix products, one of
            `step_rules.NEWTON_SCHULZ_DTYPES`. Defaults to `"float32"`.
        bound: float > 0 or None, the Newton bound (module docstring): each
            matrix's step `lr ||D||_F` is at most `bound ||P||_F`; None: no
            bound. Defaults to None.
    """

    def __init__(self, iterations, dtype="float32", bound=None):
        self.iterations = (dict(iterations) if isinstance(iterations, dict)
                           else int(iterations))
        self.dtype = dtype
        self.bound = None if bound is None else float(bound)
        #: Float32 scalar tensor of the last `directions` call (read in the
        #: same trace): the fraction of the matrices the bound shortened.
        self.bound_fraction = tf.constant(0.0)
        self._reported = False

    def matrix_iterations(self, shape):
        """The Newton-Schulz iterations of a matrix (or a stack of matrices
        along leading axes) of static `shape`."""
        if not isinstance(self.iterations, dict):
            return self.iterations
        large = min(shape[-2:]) >= self.iterations["large_min_dim"]
        return self.iterations["large_iterations" if large else "iterations"]

    def _report(self, orthogonal, clipped):
        if self._reported:
            return
        self._reported = True
        if orthogonal:
            logging.info("KFAC step_rule='orthogonal': orthogonalised blocks %s; KL-clipped "
                         "step for %s.", orthogonal, clipped or "none")
        else:
            logging.warning(
                "KFAC step_rule='orthogonal' found no Kronecker block to orthogonalise "
                "(blocks %s all take the KL-clipped step), so it trains as "
                "step_rule='kl_clip' at this learning rate (Embedding tables at %gx it).",
                clipped, EMBEDDING_LEARNING_RATE_FACTOR)

    def directions(self, blocks, variables, full_grads, preconditioned, norm_constraint,
                   learning_rate=None):
        """The step directions (to be multiplied by `-lr`, momentum after).

        Args:
            blocks: the registration's blocks.
            variables: the variables to update.
            full_grads: the dense gradients of the objective (with `l2_reg`).
            preconditioned: `Delta`, dense, aligned with `variables`.
            norm_constraint: float or None, the KL bound of the variables
                that are not orthogonalised.
            learning_rate: scalar, `lr` of this step; required when `bound`
                is set. Defaults to None.

        Returns:
            `(directions, rms)`: a list aligned with `variables`, and the
            float32 RMS entry of the orthogonalised part of the directions
            (0 when nothing is orthogonalised).
        """
        index = {id(v): i for i, v in enumerate(variables)}
        directions = list(preconditioned)
        remaining = set(range(len(variables)))
        if self.bound is not None and learning_rate is None:
            raise ValueError("OrthogonalStep.directions needs `learning_rate` when `bound` is "
                             "set (the bound compares lr ||D|| with ||P||).")
        orthogonal, clipped, embeddings = [], [], []
        square_sum, count = tf.constant(0.0), 0
        bound_count, matrix_count = tf.constant(0.0), 0
        for block in blocks:
            members = [index.get(id(v)) for v in block.variables]
            present = [i for i in members if i is not None]
            if not present:
                continue
            if block.lookup_table:
                # Left in `remaining` (the KL-clipped step), scaled up below.
                embeddings.extend(present)
                clipped.append(block.name)
                continue
            # Reshaped to the variable: a densified sparse gradient may have lost
            # its static shape, which the Newton-Schulz scale needs.
            grads = [tf.zeros_like(v, dtype=tf.float32) if i is None
                     else tf.reshape(tf.cast(preconditioned[i], tf.float32), v.shape)
                     for i, v in zip(members, block.variables)]
            matrices = block.kronecker_matrices(grads)
            if matrices is None:
                clipped.append(block.name)
                continue
            counts = [self.matrix_iterations(m.shape) for m in matrices]
            orthogonal.append(f"{block.name} (Newton-Schulz x{'/'.join(map(str, counts))})")
            steps = [step_rules.orthogonal_direction(m, k, self.dtype)
                     for m, k in zip(matrices, counts)]
            if self.bound is not None:
                scales = [step_rules.newton_bound_scale(m, d, learning_rate, self.bound)
                          for m, d in zip(matrices, steps)]
                steps = [d * c for d, c in zip(steps, scales)]
                bound_count += tf.add_n([tf.reduce_sum(tf.cast(c < 1.0, tf.float32))
                                         for c in scales])
                matrix_count += sum(c.shape.num_elements() for c in scales)
            for i, direction in zip(members, block.grads_from_kronecker_matrices(steps)):
                if i is not None:
                    directions[i] = tf.cast(direction, preconditioned[i].dtype)
                    square_sum += tf.reduce_sum(tf.square(tf.cast(direction, tf.float32)))
                    count += direction.shape.num_elements()
                    remaining.discard(i)
        self._report(orthogonal, clipped)
        rest = sorted(remaining)
        if rest and norm_constraint is not None:
            scale = step_rules.kl_clipping_scale([full_grads[i] for i in rest],
                                                 [preconditioned[i] for i in rest],
                                                 norm_constraint)
            for i in rest:
                directions[i] = preconditioned[i] * tf.cast(scale, preconditioned[i].dtype)
        for i in embeddings:
            directions[i] = directions[i] * tf.cast(EMBEDDING_LEARNING_RATE_FACTOR,
                                                    directions[i].dtype)
        rms = tf.sqrt(square_sum / count) if count else tf.constant(0.0)
        self.bound_fraction = bound_count / matrix_count if matrix_count else tf.constant(0.0)
        return directions, rms
