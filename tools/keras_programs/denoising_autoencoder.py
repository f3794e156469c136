"""keras-io's convolutional denoising autoencoder (Conv2DTranspose decoder).

The keras-io program ("Convolutional autoencoder for image denoising"): Conv2D
32 -> MaxPooling -> Conv2D 32 -> MaxPooling -> Conv2DTranspose 32 (stride 2)
x 2 -> Conv2D 1 sigmoid, binary cross-entropy, on MNIST digits with Gaussian
noise (factor 0.4) as inputs and the clean digits as targets. Only the
optimizer line and the callback change. Data: the MNIST IDX files in
`KFAC_KERAS_DATA_DIR` (here the 10,000-image test set; `--train` of them
for training, the next `--val` for validation).

    PYTHONPATH=. KFAC_KERAS_DATA_DIR=/work/shared/data/mnist \
        python tools/keras_programs/denoising_autoencoder.py --optimizer kfac

(`PYTHONPATH=.` from the repository root, so that this checkout's
`kfac_keras` is imported rather than an installed one.)
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

import kfac_keras
from kfac_choice import make_kfac

# The model lives in benchmarks/keras_program_models.py (one copy), the MNIST
# loader in benchmarks/mnist_data.py (kfac_keras.datasets moved there). The
# repository root is on sys.path only for these imports, so `kfac_keras` still
# comes from wherever it came from before.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.keras_program_models import build_denoising_autoencoder as build_model  # noqa: E402
from benchmarks.mnist_data import load_mnist  # noqa: E402
del sys.path[0]



def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=["adam", "kfac"], default="kfac")
    parser.add_argument("--kfac", default="{}", help="JSON keyword arguments of KFAC(...)")
    parser.add_argument("--step-rule", default="", help="JSON StepRuleKFAC arguments (tools/step_efficiency/step_rules.py): train with that step rule instead of KFAC's (kfac_choice.py)")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    images = load_mnist(flatten=False, allow_download=False)[0]
    rng = np.random.default_rng(1)
    noisy = np.clip(images + 0.4 * rng.normal(size=images.shape), 0.0, 1.0).astype("float32")
    train = slice(0, args.train)
    val = slice(args.train, args.train + args.val)
    model = build_model()
    callbacks = []
    if args.optimizer == "adam":
        optimizer = "adam"
    else:
        optimizer = make_kfac(json.loads(args.kfac), args.step_rule)
        callbacks.append(kfac_keras.KFACCallback(verbose=0))
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    start = time.time()

    class EpochLine(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            print(json.dumps({"optimizer": args.optimizer, "kfac": args.kfac,
                              "step_rule": args.step_rule, "seed": args.seed,
                              "epoch": epoch + 1, "loss": round(float(logs["loss"]), 4),
                              "val_loss": round(float(logs["val_loss"]), 4),
                              "seconds": round(time.time() - start, 1)}), flush=True)

    model.fit(noisy[train], images[train], batch_size=args.batch_size, epochs=args.epochs,
              validation_data=(noisy[val], images[val]), verbose=0,
              callbacks=callbacks + [EpochLine()])
    if args.optimizer == "kfac":
        for info in model.optimizer.registration.describe():
            if info["layer_class"] == "Conv2DTranspose":
                print(json.dumps({"block": info["block"], "kind": info["kind"],
                                  "note": info["note"]}))


if __name__ == "__main__":
    main()
