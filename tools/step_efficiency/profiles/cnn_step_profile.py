"""Session-9 step-cost probe (RESULTS.md, S9-cost); run from the repository root."""
import sys, time, json, os, glob, collections
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "..", "..")); sys.path.insert(0, os.path.join(_HERE, ".."))
import numpy as np, tensorflow as tf, keras, kfac_keras
from tasks import cnn_task
from tensorflow.tsl.profiler.protobuf import xplane_pb2
opts = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
task = cnn_task(100)
xs = [tf.constant(b[0]) for b in task.batches]; ys = [tf.constant(b[1]) for b in task.batches]
keras.utils.set_random_seed(0)
model = task.make_model()
opt = kfac_keras.KFAC(**opts)
model.compile(optimizer=opt, loss=task.loss)
st = kfac_keras.make_train_step(model, opt)
step = tf.function(lambda x, y: st(x, y))
f = lambda i: step(xs[i % 100], ys[i % 100])["loss"].numpy()
for i in range(41): f(i)   # next step 41.. ; stats at 50
logdir = "/tmp/prof_cnn"
import shutil; shutil.rmtree(logdir, ignore_errors=True)
N = 20
tf.profiler.experimental.start(logdir)
for i in range(N): f(41 + i)
tf.profiler.experimental.stop()
path = glob.glob(logdir + "/**/*.xplane.pb", recursive=True)[0]
xs_ = xplane_pb2.XSpace(); xs_.ParseFromString(open(path, "rb").read())
tot = collections.Counter(); cnt = collections.Counter()
for plane in xs_.planes:
    md = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
        if "python" in line.name: continue
        for ev in line.events:
            n = md[ev.metadata_id]
            if n.startswith("Executor") or "Process" in n: continue
            tot[n] += ev.duration_ps / 1e9; cnt[n] += 1
print("per step (ms) over", N, "steps (2 stats steps: 50, 60; 1 inverse step: 60)")
for name, v in tot.most_common(40):
    print(f"   {v/N:8.3f} ms/step  x{cnt[name]/N:.1f}  {name[:120]}")
pre = collections.Counter(); pcnt = collections.Counter()
for name, v in tot.items():
    if name in ("ParallelFor",): continue
    p = name.split("/")[0].split(":")[0]
    if p.startswith("cond_2"):
        p = "cond_2(apply)" + ("/nested" if "/cond/then/" in name or "cond_2/cond" in name else "")
    pre[p] += v
print("by prefix:")
for p, v in pre.most_common(15): print(f"   {v/N:8.3f} ms/step  {p}")
print("total (ex ParallelFor)", sum(pre.values())/N)
for P in ["cond/", "cond_2", "cond_1/"]:
    print("top in", P)
    items = sorted(((v, n) for n, v in tot.items() if n.startswith(P)), reverse=True)[:14]
    for v, n in items: print(f"   {v/N*10:8.3f} ms/10 steps x{cnt[n]/N*10:.0f}  {n[-90:]}")
