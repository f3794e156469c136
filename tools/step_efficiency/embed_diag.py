"""LM diagnostics (S5-embed): per-row statistics of the token Embedding block.

    python tools/step_efficiency/embed_diag.py [RULE [KL_FACTOR [LAST_STEP]]]

RULE one of `embedding_rules.RULES` (default "table"); eager, slow.
"""
import sys, json, os
sys.path.insert(0, "/work/wt/embed/tools/step_efficiency")
sys.path.insert(0, "/work/wt/embed")
import numpy as np, tensorflow as tf, keras
import run, tasks
from embedding_rules import EmbeddingRuleKFAC
rule = sys.argv[1] if len(sys.argv) > 1 else "table"
kl_factor = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
last = int(sys.argv[3]) if len(sys.argv) > 3 else 300
task = tasks.lm_task(last + 1)
tf.config.run_functions_eagerly(True)
keras.utils.set_random_seed(0)
model = task.make_model()
opt = EmbeddingRuleKFAC(embedding_rule=rule, kl_factor=kl_factor, diagnose=True, seed=0)
step = run.make_step(model, opt, task)
# positions layer: its block kind
for k in range(last + 1):
    x, y = task.batches[k]
    loss = float(step(tf.convert_to_tensor(x), tf.convert_to_tensor(y)))
    if k in (0, 1, 10, 50, 150, 300) and k <= last:
        s = opt.embedding_stats[-1]
        def q(a): return "min %.3g med %.3g max %.3g" % (np.min(a), np.median(a), np.max(a))
        print(f"step {k} loss {loss:.4f} {s['block']} shape {s['shape']} present {s['present']}")
        for key in ("freq", "grad_row_norm", "precond_row_norm", "direction_row_rms", "table_ortho_row_rms", "weight_row_norm"):
            print(f"   {key:20s} {q(s[key])}")
        sv = s["precond_singular"]; print(f"   precond singular values top5 {np.round(sv[:5],4).tolist()} min {sv[-1]:.3g}")
        # correlation of precond row norm with frequency
        print(f"   corr(log freq, log precond_row_norm) {np.corrcoef(np.log(s['freq']+1e-12), np.log(s['precond_row_norm']+1e-30))[0,1]:.3f}")
    opt.embedding_stats.clear()
