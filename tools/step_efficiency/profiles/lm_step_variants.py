"""LM step-time variants of the step's structure (timing only), alternated with Adam."""
import os, sys, time, json
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "..", "..")); sys.path.insert(0, os.path.join(_HERE, ".."))
import numpy as np, tensorflow as tf, keras
import kfac_keras
from kfac_keras import training
from tasks import lm_task
task = lm_task(100)
xs = [tf.constant(b[0]) for b in task.batches]; ys = [tf.constant(b[1]) for b in task.batches]
RARE = {"step_rule": "kl_clip", "adaptive": None, "cov_update_every": 100000, "inv_update_every": 100000}
def make(variant):
    keras.utils.set_random_seed(0)
    model = task.make_model()
    if variant == "adam":
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=task.loss, jit_compile=True)
        return lambda i: model.train_on_batch(xs[i % 100], ys[i % 100], return_dict=False)
    opt = kfac_keras.KFAC(**RARE)
    model.compile(optimizer=opt, loss=task.loss)
    st = kfac_keras.make_train_step(model, opt, jit_compile=(variant != "onejit"))
    if variant in ("noinv", "onejit"):
        opt.curvature.maybe_update_inverses = lambda *a, **k: tf.constant(False)
    if variant == "onejit":
        step = tf.function(lambda x, y: st(x, y), jit_compile=True)
    elif variant == "nolog":
        fn = tf.function(lambda x, y: st.run(x, y)[1])
        return lambda i: fn(xs[i % 100], ys[i % 100]).numpy()
    else:
        step = tf.function(lambda x, y: st(x, y))
    return lambda i: step(xs[i % 100], ys[i % 100])["loss"].numpy()
runs = {k: make(k) for k in sys.argv[1].split(",")}
for f in runs.values():
    for i in range(100): f(i)
res = {k: [] for k in runs}
for r in range(3):
    for k, f in runs.items():
        t = time.perf_counter()
        for i in range(100): f(i)
        res[k].append((time.perf_counter() - t) / 100 * 1e3)
for k, v in res.items():
    print(f"{k:30s} {np.median(v):7.2f} ms  ratio {np.median(v)/np.median(res['adam']):.2f}")
