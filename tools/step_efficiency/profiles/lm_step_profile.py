"""Session-9 step-cost probe (RESULTS.md, S9-cost); run from the repository root."""
import os, sys, time, json, glob, collections
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "..", "..")); sys.path.insert(0, os.path.join(_HERE, ".."))
import numpy as np, tensorflow as tf, keras
import kfac_keras
from tasks import lm_task
from tensorflow.tsl.profiler.protobuf import xplane_pb2
opts = json.loads(sys.argv[1]); mode = sys.argv[2]
task = lm_task(100)
xs = [tf.constant(b[0]) for b in task.batches]; ys = [tf.constant(b[1]) for b in task.batches]
keras.utils.set_random_seed(0)
model = task.make_model()
if mode == "adam":
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=task.loss, jit_compile=True)
    f = lambda i: model.train_on_batch(xs[i % 100], ys[i % 100], return_dict=False)
else:
    opt = kfac_keras.KFAC(**opts)
    model.compile(optimizer=opt, loss=task.loss)
    step = tf.function(kfac_keras.make_train_step(model, opt, jit_compile=True))
    f = lambda i: step(xs[i % 100], ys[i % 100])["loss"].numpy()
for i in range(100): f(i)
logdir = f"/tmp/prof_{mode}"
import shutil; shutil.rmtree(logdir, ignore_errors=True)
tf.profiler.experimental.start(logdir)
t = time.perf_counter()
for i in range(50): f(i)
el = time.perf_counter() - t
tf.profiler.experimental.stop()
print("ms/step", el / 50 * 1e3)
path = glob.glob(logdir + "/**/*.xplane.pb", recursive=True)[0]
xs_ = xplane_pb2.XSpace(); xs_.ParseFromString(open(path, "rb").read())
for plane in xs_.planes:
    md = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
        tot = collections.Counter(); cnt = collections.Counter()
        for ev in line.events:
            tot[md[ev.metadata_id]] += ev.duration_ps / 1e9; cnt[md[ev.metadata_id]] += 1
        if not tot: continue
        print(f"--- plane {plane.name} line {line.name} total {sum(tot.values())/50:.2f} ms/step")
        for name, v in tot.most_common(12):
            print(f"   {v/50:8.3f} ms/step  x{cnt[name]/50:.1f}  {name[:110]}")
