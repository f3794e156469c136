"""LM diagnostics (S5-embed): per-row statistics of the token Embedding block.

    python tools/step_efficiency/embed_diag.py [RULE [KL_FACTOR [LAST_STEP]]]

RULE is one of `embedding_rules.RULES` (default "table"), KL_FACTOR the
`kl_factor` of RULE "kl" (default 1), LAST_STEP the last step printed
(default 300). Runs eagerly (slow) so `EmbeddingRuleKFAC(diagnose=True)` can
record, at steps 0, 1, 10, 50, 150 and 300, the present rows' token
frequencies, gradient / preconditioned-gradient row norms, the step
direction's row RMS, the whole-table orthogonalised direction's row RMS, the
weight row norms, and the preconditioned table's singular values.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import run  # noqa: E402
import tasks  # noqa: E402
from embedding_rules import EmbeddingRuleKFAC  # noqa: E402

PRINTED_STEPS = (0, 1, 10, 50, 150, 300)
ROW_STATISTICS = ("freq", "grad_row_norm", "precond_row_norm", "direction_row_rms",
                  "table_ortho_row_rms", "weight_row_norm")


def spread(values):
    return "min %.3g med %.3g max %.3g" % (np.min(values), np.median(values), np.max(values))


def main():
    rule = sys.argv[1] if len(sys.argv) > 1 else "table"
    kl_factor = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    last_step = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    task = tasks.lm_task(last_step + 1)
    tf.config.run_functions_eagerly(True)
    keras.utils.set_random_seed(0)
    model = task.make_model()
    optimizer = EmbeddingRuleKFAC(embedding_rule=rule, kl_factor=kl_factor, diagnose=True,
                                  seed=0)
    step = run.make_step(model, optimizer, task)
    for k in range(last_step + 1):
        x, y = task.batches[k]
        loss = float(step(tf.convert_to_tensor(x), tf.convert_to_tensor(y)))
        if k in PRINTED_STEPS:
            stats = optimizer.embedding_stats[-1]
            print(f"step {k} loss {loss:.4f} {stats['block']} shape {stats['shape']} "
                  f"present {stats['present']}")
            for key in ROW_STATISTICS:
                print(f"   {key:20s} {spread(stats[key])}")
            singular = stats["precond_singular"]
            print(f"   precond singular values top5 {np.round(singular[:5], 4).tolist()} "
                  f"min {singular[-1]:.3g}")
            # Do rare tokens get larger preconditioned rows (the diag(freq)^-1 factor)?
            correlation = np.corrcoef(np.log(stats["freq"] + 1e-12),
                                      np.log(stats["precond_row_norm"] + 1e-30))[0, 1]
            print(f"   corr(log freq, log precond_row_norm) {correlation:.3f}")
        optimizer.embedding_stats.clear()


if __name__ == "__main__":
    main()
