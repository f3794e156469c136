"""Dense NumPy check of the issue-12 convex tasks (`tasks.issue_convex_data`).

Prints the optimum, the initial loss from Keras's initial weights (seed 0)
and from zero weights, and the steps an exact-expectation NumPy K-FAC
(`tasks.numpy_kfac_curve`, learning rate 1, damping 1e-4, no momentum) needs
to the issue's targets, without and with factor averaging (0.95)::

    python tools/step_efficiency/convex_check.py
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import tasks  # noqa: E402


def first_step(curve, target):
    """Index of the first loss at or below `target` (0: the initial loss), or None."""
    hits = np.nonzero(curve <= target)[0]
    return int(hits[0]) if len(hits) else None


def main():
    import keras

    for kind in ("lsq", "softmax"):
        x, y = tasks.issue_convex_data(kind)
        optimum = tasks.convex_optimum(kind, x, y)
        keras.utils.set_random_seed(0)
        model = tasks.issue_convex_task(kind, 1).make_model()
        kernel, bias = model.get_weights()
        keras_init = np.concatenate([kernel, bias[None]], axis=0).astype(np.float64)
        print(f"{kind}: optimum {optimum:.6g}, initial loss (Keras seed 0) "
              f"{tasks.numpy_loss(kind, keras_init, x, y):.4g}, (zero) "
              f"{tasks.numpy_loss(kind, 0 * keras_init, x, y):.4g}")
        for start, weights in (("keras", keras_init), ("zero", 0 * keras_init)):
            for decay in (0.0, 0.95):
                curve = tasks.numpy_kfac_curve(kind, x, y, weights, 30, factor_decay=decay)
                if kind == "lsq":
                    targets = {"gap 1e-3": optimum + 1e-3 * (curve[0] - optimum)}
                else:
                    targets = {"1%": optimum * 1.01, "2%": optimum * 1.02}
                reach = ", ".join(f"{name} in {first_step(curve, t)}" for name, t in targets.items())
                print(f"  from {start}, factor_decay {decay}: {reach}; "
                      f"loss/optimum after 10/30 steps {curve[10] / optimum:.4f}/"
                      f"{curve[30] / optimum:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
