"""S7-shrink: an orthogonal step that shrinks with the gradient relative to its early size (issue 15).

S7-classgap (FINDINGS.md) found that on keras-io's transformer classifier the orthogonal step on
the Dense matrices keeps its fixed RMS all through epoch 2 (the weights move 6-38x more per 47
steps than under Adam) while the absolute Newton bound (`orthogonal_step_bound`, the step capped at
`bound * ||P||_F`) binds on at most 1/8 of the matrices. This prototype adds a *relative* Newton
bound: per Kronecker matrix it keeps the running maximum `M` of `||P||_F` over the steps so far
(the current step included) and multiplies that matrix's orthogonal direction by

    min(1, ||P||_F / M) ** power

so the step keeps its fixed RMS while `P` is at its largest and shrinks once `P` shrinks below
it. With `"reference": "ema"` the reference `M` is instead a slow exponential moving average of
`||P||_F` (`M <- b M + (1 - b) ||P||_F`, `b = min(1 - 1/k, beta)` at the k-th step, so the first
counts fully), so an early spike of `||P||` is forgotten after ~1/(1-beta) steps and the factor
measures whether `P` is below its recent typical size. `P` is the block's preconditioned gradient (the damped quadratic model's minimiser), so the
factor also falls when the adaptive damping rises. The library's own absolute Newton bound (and
everything else of the rule: the Embedding tables' KL-clipped step x30, the KL-clipped step of the
other variables, momentum after) is applied unchanged, after this factor.

`ShrinkKFAC(shrink={"power": p}, **KFAC options)` is `kfac_keras.KFAC` with that step; like
`tools/step_efficiency/cheap_polar.py` it does not edit the library: its `OrthogonalStep.directions`
runs with `step_rules.orthogonal_direction` swapped for the duration of the call.

Run as `s7_classgap.py` (same program, arguments and log format), with a `"shrink"` entry in
`--kfac` choosing `ShrinkKFAC`; each checkpoint line gets `shrink_factor` / `shrink_norm` /
`shrink_max` per orthogonalised matrix (in the order the step meets them):

    PYTHONPATH=. python tools/keras_programs/s7_shrink.py --seed 0 --kfac '{"shrink": {"power": 1}}'

`--self-check` checks the factor on a toy sequence of matrices.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "step_efficiency"))

import kfac_keras  # noqa: E402
from kfac_keras import orthogonal_step, step_rules  # noqa: E402
from cheap_polar import MatrixDirectionStep, orthogonalised_matrix_shapes  # noqa: E402


class ShrinkStep(MatrixDirectionStep):
    """`OrthogonalStep` whose per-matrix direction is scaled by `min(1, ||P|| / max ||P||)^power`.

    Args:
        iterations, dtype, bound: `OrthogonalStep`'s (`bound`: the library's absolute Newton
            bound, applied after the factor).
        power: float > 0, the exponent `p`.
        reference: "max" (running maximum of `||P||_F`) or "ema" (its moving average).
        beta: float in (0, 1), the moving average's decay (only for "ema").
    """

    def __init__(self, iterations, dtype, bound, power, reference="max", beta=0.99):
        super().__init__(iterations, dtype, bound)
        if reference not in ("max", "ema"):
            raise ValueError(f"reference must be 'max' or 'ema'; got {reference!r}")
        self.power = float(power)
        self.reference = reference
        self.beta = float(beta)
        #: Calls of the per-matrix direction (all matrices of one step count once); the EMA
        #: assumes one `directions` call per optimizer step, which this lets a log check.
        self.calls = tf.Variable(0.0, trainable=False, name="shrink_calls")
        # Per matrix: (running max of ||P||_F, last ||P||_F, last factor, shape).
        self.states = None
        self._position = 0

    def build_states(self, blocks):
        """One state per Kronecker matrix, in the order `directions` meets them (blocks in order;
        Embedding tables and blocks without Kronecker matrices are not orthogonalised)."""
        if self.states is not None:
            return
        self.states = []
        for shape in orthogonalised_matrix_shapes(blocks):
            per_matrix = shape[:-2] + (1, 1)  # grouped convolutions: one factor per group
            k = len(self.states)
            self.states.append((
                tf.Variable(tf.zeros(per_matrix), trainable=False, name=f"shrink_max_{k}"),
                tf.Variable(tf.zeros(per_matrix), trainable=False, name=f"shrink_norm_{k}"),
                tf.Variable(tf.ones(per_matrix), trainable=False, name=f"shrink_factor_{k}"),
                shape))

    def _matrix_direction(self, matrix, iterations, dtype="float32"):
        running_max, last_norm, last_factor, shape = self.states[self._position]
        self._position += 1
        if tuple(matrix.shape) != shape:
            raise ValueError(f"state order mismatch: matrix {matrix.shape}, state {shape}")
        # The library's function (held by the module before the swap; `directions` restores it).
        direction = ORIGINAL_ORTHOGONAL_DIRECTION(matrix, iterations, dtype)
        norm = step_rules.frobenius_norm(matrix)  # (..., 1, 1), robust to tiny entries
        first = self._position == 1  # the first matrix of this step
        # Steps so far, this one included (read before the first matrix counts this step).
        count = tf.convert_to_tensor(self.calls) + (1.0 if first else 0.0)
        updates = [self.calls.assign(count)] if first else []
        if self.reference == "max":
            reference = tf.maximum(running_max, norm)
        else:
            decay = tf.minimum(1.0 - 1.0 / count, self.beta)
            reference = decay * running_max + (1.0 - decay) * norm
        # A zero P (nothing to step along) gives factor 0; its direction is zero anyway.
        factor = tf.minimum(1.0, tf.math.divide_no_nan(norm, reference)) ** self.power
        with tf.control_dependencies(updates):
            updates += [running_max.assign(reference), last_norm.assign(norm),
                        last_factor.assign(factor)]
        with tf.control_dependencies(updates):
            return direction * tf.identity(factor)


#: `step_rules.orthogonal_direction` as the library defines it (before any swap).
ORIGINAL_ORTHOGONAL_DIRECTION = step_rules.orthogonal_direction


class ShrinkKFAC(kfac_keras.KFAC):
    """`kfac_keras.KFAC` with a `ShrinkStep` (only with the orthogonal rule, the default).

    Args:
        shrink: dict `{"power": p, "reference": "max" | "ema", "beta": b}`, or None for the library's step.
        **kwargs: `kfac_keras.KFAC` options.
    """

    def __init__(self, shrink=None, **kwargs):
        super().__init__(**kwargs)
        self.shrink = shrink
        if shrink is not None:
            library = self._orthogonal_step
            if library is None:
                raise ValueError("shrink needs step_rule='orthogonal'")
            unknown = set(shrink) - {"power", "reference", "beta"}
            if unknown:
                raise ValueError(f"unknown shrink keys: {sorted(unknown)}")
            self._orthogonal_step = ShrinkStep(library.iterations, library.dtype, library.bound,
                                               **shrink)

    def attach(self, model):
        registration = super().attach(model)
        if isinstance(self._orthogonal_step, ShrinkStep):
            self._orthogonal_step.build_states(registration.blocks)
        return registration


def make_kfac(**options):
    """`ShrinkKFAC` when the options carry `"shrink"`, else the library's `KFAC`."""
    if "shrink" in options:
        return ShrinkKFAC(**options)
    return LIBRARY_KFAC(**options)


LIBRARY_KFAC = kfac_keras.KFAC


def self_check():
    """Factors for a matrix whose norm goes 1, 2, 1, 0.5 (max 1, 2, 2, 2): 1, 1, 0.5, 0.25 at p=1."""
    base = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    base /= np.linalg.norm(base)
    results = {}
    for reference in ("max", "ema"):
        step = ShrinkStep(3, "float32", None, power=1.0, reference=reference, beta=0.5)
        step.states = [(tf.Variable(tf.zeros((1, 1))), tf.Variable(tf.zeros((1, 1))),
                        tf.Variable(tf.ones((1, 1))), (6, 4))]
        factors, lengths = [], []
        for scale in (1.0, 2.0, 1.0, 0.5):
            step._position = 0
            direction = step._matrix_direction(tf.constant(base * scale), 3)
            factors.append(round(float(step.states[0][2].numpy().item()), 4))
            lengths.append(float(np.linalg.norm(direction.numpy())))
        results[reference] = (factors, [round(x / lengths[0], 4) for x in lengths],
                              float(step.calls.numpy()))
    return results


def main(argv=None):
    import s7_classgap

    argv = sys.argv[1:] if argv is None else argv
    if "--self-check" in argv:
        print("factors, direction lengths / first, calls; want max: 1, 1, 0.5, 0.25; "
              "ema (beta 0.5: references 1, 1.5, 1.25, 0.875): 1, 1, 0.8, 0.5714; calls 4:", self_check())
        return 0

    class Diagnostics(s7_classgap.Diagnostics):
        def _record(self, epoch, logs):
            # `_record` prints its line; the shrink states go on a line of their own just after
            # it (same step), so s7_table.py reads the checkpoint lines unchanged.
            super()._record(epoch, logs)
            step = getattr(self.model.optimizer, "_orthogonal_step", None)
            if isinstance(step, ShrinkStep) and step.states:
                def values(k):
                    return [round(float(np.mean(s[k].numpy())), 5) for s in step.states]
                print(json.dumps({"kind": "shrink", "step": self.step, "epoch": epoch,
                                  "shrink_factor": values(2), "shrink_norm": values(1),
                                  "shrink_reference": values(0),
                                  "shrink_calls": float(step.calls.numpy()),
                                  "shapes": [list(s[3]) for s in step.states]}), flush=True)

    s7_classgap.Diagnostics = Diagnostics
    kfac_keras.KFAC = make_kfac  # s7_classgap.main builds `kfac_keras.KFAC(**options)`
    return s7_classgap.main(argv)


if __name__ == "__main__":
    sys.exit(main())
