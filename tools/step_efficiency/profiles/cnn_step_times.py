"""Session-9 step-cost probe (RESULTS.md, S9-cost); run from the repository root."""
import sys, time, json, os
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "..", "..")); sys.path.insert(0, os.path.join(_HERE, ".."))
import numpy as np, tensorflow as tf, keras, kfac_keras
from tasks import cnn_task
opts = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
which = sys.argv[2] if len(sys.argv) > 2 else "kfac"
task = cnn_task(80)
x = np.concatenate([b[0] for b in task.batches]); y = np.concatenate([b[1] for b in task.batches])
keras.utils.set_random_seed(0)
model = task.make_model()
opt = kfac_keras.KFAC(**opts) if which == "kfac" else keras.optimizers.Adam(0.01)
model.compile(optimizer=opt, loss=task.loss)
class T(keras.callbacks.Callback):
    def on_train_batch_begin(self, b, logs=None): self.t = time.perf_counter()
    def on_train_batch_end(self, b, logs=None): times.append((time.perf_counter() - self.t) * 1e3)
times = []
cbs = [T()] + ([kfac_keras.KFACCallback()] if which == "kfac" else [])
model.fit(x, y, batch_size=250, epochs=1, shuffle=False, verbose=0, callbacks=cbs)
t = np.array(times)
print(which, opts, "first 5", np.round(t[:5]).tolist())
print(" steps 2-40 median %.1f mean %.1f; 40-80 median %.1f mean %.1f" % (np.median(t[2:40]), t[2:40].mean(), np.median(t[40:]), t[40:].mean()))
print(" slowest (step, ms):", sorted(zip(np.round(t[2:], 1).tolist(), range(2, 80)), reverse=True)[:8])
