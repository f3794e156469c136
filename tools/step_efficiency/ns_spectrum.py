"""Singular values of the orthogonal rule's Kronecker matrices on the autoencoder.

Trains the autoencoder task (tasks.py) with `kfac_keras.KFAC()` defaults and
records, at the listed steps, every matrix `P` handed to
`step_rules.orthogonal_direction`, then prints the spread of the singular
values of `P / ||P||_F` (what the Newton-Schulz iterations start from) and of
`P / ||P P^T||_F^(1/2)` (a normalisation by the Gram matrix, which bounds the
largest singular value more tightly). Saves the spectra to `--out` (.npz).

    python tools/step_efficiency/ns_spectrum.py --steps 1,5,20,60,120 --out /tmp/spectra.npz
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,5,20,60,120",
                        help="comma list of 1-based steps to record")
    parser.add_argument("--out", required=True, help=".npz of the spectra")
    args = parser.parse_args(argv)
    record_at = sorted(int(s) for s in args.steps.split(","))

    import numpy as np
    import tensorflow as tf
    import keras
    import kfac_keras
    from kfac_keras import step_rules
    import tasks

    recorded = []  # (step, shape, singular values of the raw P)
    current = {"step": 0}

    def record(matrix):
        if current["step"] in record_at:
            values = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
            recorded.append((current["step"], matrix.shape, values))
        return np.float32(0.0)

    original = step_rules.orthogonal_direction

    def recording_direction(matrix, iterations, dtype="float32"):
        token = tf.numpy_function(record, [tf.cast(matrix, tf.float32)], tf.float32)
        with tf.control_dependencies([token]):
            matrix = tf.identity(matrix)
        return original(matrix, iterations, dtype)

    step_rules.orthogonal_direction = recording_direction
    task = tasks.autoencoder_task(max(record_at))
    keras.utils.set_random_seed(0)
    model = task.make_model()
    optimizer = kfac_keras.KFAC()
    train_step = kfac_keras.make_train_step(model, optimizer, loss=task.loss)
    step = tf.function(lambda x, y: train_step(x, y)["loss"])
    for k in range(max(record_at)):
        current["step"] = k + 1
        x, y = task.batches[k]
        loss = float(step(tf.convert_to_tensor(x), tf.convert_to_tensor(y)))
        if current["step"] in record_at:
            print(f"step {k + 1}: loss {loss * task.loss_scale:.1f}", flush=True)

    print("step shape      n   s_max/||P||_F  s_min/||P||_F  s_10%/||P||_F  s_max/||PP^T||^.5  "
          "s_min/||PP^T||^.5  s_10%/||PP^T||^.5")
    save = {}
    for i, (k, shape, values) in enumerate(recorded):
        fro = np.sqrt(np.sum(values ** 2))
        gram = np.sqrt(np.sqrt(np.sum(values ** 4)))
        tenth = np.quantile(values, 0.1)
        print(f"{k:4d} {str(shape):12s} {len(values):4d} {values[0] / fro:13.3e}  "
              f"{values[-1] / fro:13.3e}  {tenth / fro:13.3e}  {values[0] / gram:17.3e}  "
              f"{values[-1] / gram:17.3e}  {tenth / gram:17.3e}")
        save[f"s{k}_{shape[0]}x{shape[1]}_{i}"] = values
    np.savez(args.out, **save)


if __name__ == "__main__":
    main()
