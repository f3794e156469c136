"""Experimental Embedding treatments under the orthogonal step rule (S5-embed).

`EmbeddingRuleKFAC(embedding_rule=..., ...)` is `kfac_keras.KFAC(step_rule=
"orthogonal")` whose Embedding blocks take one of these steps instead of the
library's (the preconditioned table `P`, `(vocabulary, dim)`, present rows =
rows with a nonzero preconditioned gradient; absent rows are exactly zero in
`P` and get a zero step under every rule):

* `"table"`: the library's session-4 rule, `0.2 sqrt(max(V, d)) NS_k(P)`.
* `"present"`: `NS_k` of the present rows `P_S` only (`(n, d)`, equal to the
  table's polar factor restricted to them), scale `0.2 sqrt(max(n, d))`.
* `"present_table_scale"`: the same rows, the table's scale (equal to
  `"table"`; only for the cost comparison).
* `"row"`: each present row scaled to RMS `row_rms` (`row / rms(row) *
  row_rms`), a per-token normalised step.
* `"kl"`: the KL-clipped step (`P` times the clipping scale computed with the
  other non-orthogonalised variables), times `kl_factor` (so its own learning
  rate is `kl_factor * lr`).
* `"by_shape"` (S6-classifier): `"present"` for a tall table (`vocabulary >
  dim`: the present rows' polar factor does not equalise their norms), `"kl"`
  for a wide one (the LM's `(32, 64)`, the BiLSTM's `(12, 16)`).

`position_rule` (optional) overrides the rule for Embedding blocks whose name
contains "pos" (the keras-io classifier's position table).

`diagnose=True` records per-row statistics of each Embedding block when run
eagerly (`tf.config.run_functions_eagerly(True)`), in `self.embedding_stats`.
"""

import numpy as np
import tensorflow as tf

import kfac_keras
from kfac_keras import orthogonal_step, step_rules
from kfac_keras.blocks.embedding import EmbeddingBlock

RULES = ("table", "present", "present_table_scale", "row", "kl", "by_shape")


def newton_schulz_right(matrix, iterations):
    """Quintic Newton-Schulz with the `(cols, cols)` Gram matrix `X^T X`, so the
    number of rows may be dynamic: `X <- a X + X (b A + c A^2)`, `A = X^T X`
    (the same polynomial as `step_rules.newton_schulz`, `X A = (X X^T) X`)."""
    a, b, c = step_rules.NEWTON_SCHULZ_COEFFICIENTS
    x = tf.math.divide_no_nan(matrix, tf.norm(matrix))
    for _ in range(int(iterations)):
        gram = tf.matmul(x, x, transpose_a=True)
        x = a * x + tf.matmul(x, b * gram + c * tf.matmul(gram, gram))
    return x


def present_rows(matrix):
    """Indices `(n,)` of the rows of `matrix` with a nonzero entry."""
    return tf.reshape(tf.where(tf.reduce_any(tf.not_equal(matrix, 0.0), axis=1)), [-1])


class EmbeddingRuleStep(orthogonal_step.OrthogonalStep):
    """`OrthogonalStep` with a chosen Embedding treatment (module docstring)."""

    def __init__(self, iterations, dtype, rule, position_rule, row_rms, kl_factor, diagnose,
                 present_rms=0.2):
        super().__init__(iterations, dtype)
        self.present_rms = float(present_rms)
        for r in (rule, position_rule):
            if r is not None and r not in RULES:
                raise ValueError(f"embedding rule must be one of {RULES}; received {r!r}")
        self.rule, self.position_rule = rule, position_rule
        self.row_rms, self.kl_factor, self.diagnose = float(row_rms), float(kl_factor), diagnose
        self.stats = []

    def _rule_of(self, block):
        rule = self.rule
        if self.position_rule is not None and "pos" in block.name:
            rule = self.position_rule
        if rule == "by_shape":
            vocabulary, dim = block.variables[0].shape
            rule = "present" if vocabulary > dim else "kl"
        return rule

    def _embedding_direction(self, rule, matrix):
        vocabulary, dim = matrix.shape
        if rule == "row":
            rms = tf.sqrt(tf.reduce_mean(tf.square(matrix), axis=1, keepdims=True))
            return tf.math.divide_no_nan(matrix, rms) * self.row_rms
        rows = present_rows(matrix)
        polar = newton_schulz_right(tf.gather(matrix, rows), self.matrix_iterations(matrix.shape))
        if rule == "present":
            count = tf.cast(tf.maximum(tf.size(rows), dim), tf.float32)
        else:  # "present_table_scale"
            count = float(max(vocabulary, dim))
        rms = self.present_rms if rule == "present" else step_rules.ORTHOGONAL_STEP_RMS
        scale = rms * tf.sqrt(count)
        return tf.scatter_nd(rows[:, None], scale * polar, matrix.shape)

    def directions(self, blocks, variables, full_grads, preconditioned, norm_constraint,
                   learning_rate=None):
        index = {id(v): i for i, v in enumerate(variables)}
        special = []  # (block, rule, variable index) of Embedding blocks not on "table"
        for block in blocks:
            if isinstance(block, EmbeddingBlock) and id(block.variables[0]) in index:
                rule = self._rule_of(block)
                if rule != "table":
                    special.append((block, rule, index[id(block.variables[0])]))
        # The "kl" tables join the other KL-clipped variables; the others are
        # left out of the base rule (so out of its clipping scale).
        own = {i for _, rule, i in special if rule != "kl"}
        kept = [i for i in range(len(variables)) if i not in own]
        base_blocks = [b for b in blocks if not (isinstance(b, EmbeddingBlock) and any(
            b is s for s, rule, _ in special))]
        base, rms = super().directions(base_blocks, [variables[i] for i in kept],
                                       [full_grads[i] for i in kept],
                                       [preconditioned[i] for i in kept], norm_constraint,
                                       learning_rate)
        directions = list(preconditioned)
        for j, i in enumerate(kept):
            directions[i] = base[j]
        for block, rule, i in special:
            matrix = tf.reshape(tf.cast(preconditioned[i], tf.float32), variables[i].shape)
            if rule == "kl":
                direction = directions[i] * self.kl_factor
            else:
                direction = self._embedding_direction(rule, matrix)
            directions[i] = tf.cast(direction, preconditioned[i].dtype)
        if self.diagnose and tf.executing_eagerly():
            self._record(blocks, variables, full_grads, preconditioned, directions, index)
        return directions, rms

    def _record(self, blocks, variables, full_grads, preconditioned, directions, index):
        for block in blocks:
            if not isinstance(block, EmbeddingBlock) or id(block.variables[0]) not in index:
                continue
            i = index[id(block.variables[0])]
            shape = variables[i].shape
            p = np.reshape(np.asarray(tf.convert_to_tensor(preconditioned[i])), shape)
            g = np.reshape(np.asarray(tf.convert_to_tensor(full_grads[i])), shape)
            d = np.reshape(np.asarray(directions[i]), shape)
            table = tf.reshape(tf.cast(preconditioned[i], tf.float32), shape)
            ortho = np.asarray(step_rules.orthogonal_direction(table, self.iterations))
            present = np.any(p != 0, axis=1)
            self.stats.append({
                "block": block.name, "shape": list(shape),
                "present": int(present.sum()),
                "freq": np.asarray(block.token_frequencies)[present],
                "grad_row_norm": np.linalg.norm(g, axis=1)[present],
                "precond_row_norm": np.linalg.norm(p, axis=1)[present],
                "direction_row_rms": np.sqrt(np.mean(d ** 2, axis=1))[present],
                "table_ortho_row_rms": np.sqrt(np.mean(ortho ** 2, axis=1))[present],
                "weight_row_norm": np.linalg.norm(np.asarray(variables[i]), axis=1)[present],
                "precond_singular": np.linalg.svd(p[present], compute_uv=False),
            })


class EmbeddingRuleKFAC(kfac_keras.KFAC):
    """`kfac_keras.KFAC(step_rule="orthogonal")` with an Embedding treatment.

    Args:
        embedding_rule: one of `RULES` (module docstring). Defaults to "row".
        position_rule: rule for Embedding blocks named "*pos*", or None (the
            same as `embedding_rule`). Defaults to None.
        row_rms: float, the per-row RMS of `"row"`. Defaults to 0.2.
        kl_factor: float, the multiplier of `"kl"`'s step. Defaults to 1.0.
        present_rms: float, the RMS entry of `"present"`'s step. Defaults to 0.2.
        diagnose: bool, record per-row statistics when eager. Defaults to False.
        **kwargs: `kfac_keras.KFAC` arguments (`step_rule` must be "orthogonal").
    """

    def __init__(self, embedding_rule="row", position_rule=None, row_rms=0.2, kl_factor=1.0,
                 diagnose=False, present_rms=0.2, **kwargs):
        if kwargs.setdefault("step_rule", "orthogonal") != "orthogonal":
            raise ValueError("EmbeddingRuleKFAC needs step_rule='orthogonal'; received "
                             f"{kwargs['step_rule']!r}")
        super().__init__(**kwargs)
        self._orthogonal_step = EmbeddingRuleStep(
            self.options.orthogonal_iterations, self.options.orthogonal_dtype, embedding_rule,
            position_rule, row_rms, kl_factor, diagnose, present_rms)

    @property
    def embedding_stats(self):
        return self._orthogonal_step.stats
