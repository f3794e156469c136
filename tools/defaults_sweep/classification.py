"""Classification check of candidate defaults: ReLU MLP and small CNN on MNIST 10k (8k train / 2k test).

    python tools/defaults_sweep/classification.py CONFIGS_JSON mlp,cnn

CONFIGS_JSON maps a name to KFAC arguments (names starting with 'adam': Adam arguments); 3 epochs
of batch 128 from seed 0; prints one JSON line per model and configuration.
"""
import json, os, sys, time
# benchmarks/ is not installed: import it from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np, keras, kfac_keras
from benchmarks.mnist_data import load_mnist
x, y, _ = load_mnist(None)  # $KFAC_KERAS_DATA_DIR, see benchmarks/mnist_data.py
x = x.reshape(-1, 28, 28, 1).astype("float32"); y = y.astype("int32")
xtr, ytr, xte, yte = x[:8000], y[:8000], x[8000:], y[8000:]
def mlp():
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(256, activation="relu"),
                             keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10, activation="softmax")])
def cnn():
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.MaxPooling2D(),
                             keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                             keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")])
configs = json.loads(sys.argv[1])
for arch in sys.argv[2].split(","):
    for name, kw in configs.items():
        keras.utils.set_random_seed(0)
        model = {"mlp": mlp, "cnn": cnn}[arch]()
        if name.startswith("adam"):
            opt, cbs = keras.optimizers.Adam(**kw), []
        else:
            if kw.get("adaptive"): kw = dict(kw, adaptive=kfac_keras.AdaptiveOptions(**kw["adaptive"]))
            opt, cbs = kfac_keras.KFAC(seed=0, **kw), [kfac_keras.KFACCallback(verbose=0)]
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        t0 = time.time()
        h = model.fit(xtr, ytr, batch_size=128, epochs=3, verbose=0, callbacks=cbs, shuffle=False)
        te = model.evaluate(xte, yte, verbose=0)
        print(json.dumps({"arch": arch, "config": name, "train_loss": [round(v, 4) for v in h.history["loss"]],
                          "test_loss": round(te[0], 4), "test_acc": round(te[1], 4), "wall": round(time.time() - t0, 1)}), flush=True)
