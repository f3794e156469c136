"""Steps-to-target sweep of K-FAC configurations on the MNIST autoencoder (300 steps).

The sweep behind the defaults (docs/benchmarks.md section 6). `--configs` maps a name to a JSON
object of KFAC arguments (names starting with 'adam' are Adam arguments), for example::

    python tools/defaults_sweep/sweep.py --configs '{"lr1_nc1e-4": {"learning_rate": 1.0, "norm_constraint": 1e-4}}'

Same model, data order, seed and smoothing as `python -m benchmarks.autoencoder`; one JSON
line per configuration is printed and appended to `--out`.
"""
import argparse, json, os, sys, time
# benchmarks/ is not installed: import it from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
import kfac_keras
from benchmarks.autoencoder import PIXELS, make_autoencoder
from benchmarks.harness import run_optimizer
from benchmarks.mnist_data import load_mnist
from benchmarks.targets import steps_and_seconds_to_target

class Logs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__(); self.rows = []
    def on_train_batch_end(self, batch, logs=None):
        self.rows.append({k: float(v) for k, v in (logs or {}).items() if k in ("damping", "update_norm", "rho", "alpha", "mu")})

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=300)
p.add_argument("--configs", required=True, help="json dict name -> kwargs")
p.add_argument("--targets", default="200,150,120,100,90,80,70")
p.add_argument("--out", default="defaults_sweep.jsonl")
args = p.parse_args()
x, _, source = load_mnist(None)  # $KFAC_KERAS_DATA_DIR, see benchmarks/mnist_data.py
targets = [float(t) for t in args.targets.split(",")]
loss = keras.losses.BinaryCrossentropy(from_logits=True)
for name, kwargs in json.loads(args.configs).items():
    if kwargs.get("adaptive"):
        kwargs["adaptive"] = kfac_keras.AdaptiveOptions(**kwargs["adaptive"])
    logger = Logs(); t0 = time.time()
    if name.startswith("adam"):
        make_opt = lambda: keras.optimizers.Adam(**kwargs); cbs = lambda: [logger]
    else:
        make_opt = lambda: kfac_keras.KFAC(**kwargs); cbs = lambda: [kfac_keras.KFACCallback(verbose=0), logger]
    r = run_optimizer(make_autoencoder, make_opt, x, None, loss, 1000, args.steps, 0, False,
                             callbacks=cbs, progress_every=0, label=name, loss_scale=PIXELS, loss_unit=" nats")
    reached = steps_and_seconds_to_target(r, targets, loss_scale=PIXELS)
    sm = r["history"]["smoothed"] * PIXELS
    row = {"config": name, "kwargs": {k: str(v) for k, v in kwargs.items()},
           "reach": {str(int(t)): reached[t][0] for t in targets},
           "at": [round(float(v), 1) for v in sm[49::50]], "final": round(float(sm[-1]), 2),
           "ms": round(r["per_step_ms"], 1), "wall": round(time.time() - t0, 1),
           "damping_end": logger.rows[-1].get("damping") if logger.rows else None}
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
