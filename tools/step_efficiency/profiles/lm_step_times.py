"""Session-9 step-cost probe (RESULTS.md, S9-cost); run from the repository root."""
import os, sys, time, json
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "..", "..")); sys.path.insert(0, os.path.join(_HERE, ".."))
import numpy as np, tensorflow as tf, keras, kfac_keras
from tasks import lm_task
opts = json.loads(sys.argv[1])
task = lm_task(100)
xs = [tf.constant(b[0]) for b in task.batches]; ys = [tf.constant(b[1]) for b in task.batches]
keras.utils.set_random_seed(0)
model = task.make_model()
opt = kfac_keras.KFAC(**opts)
model.compile(optimizer=opt, loss=task.loss)
step = tf.function(kfac_keras.make_train_step(model, opt, jit_compile=True))
f = lambda i: step(xs[i % 100], ys[i % 100])["loss"].numpy()
t0 = time.perf_counter()
for i in range(40): f(i)
print("first 40 steps s", round(time.perf_counter() - t0, 1))
ts = []
for i in range(40, 240):
    t = time.perf_counter(); f(i); ts.append((time.perf_counter() - t) * 1e3)
ts = np.array(ts).reshape(-1, 20)
print("by step % 20:", np.round(np.median(ts, 0), 1).tolist())
print("mean", ts.mean().round(2), "median", np.median(ts).round(2))
