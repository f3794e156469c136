"""Cost of 3 Newton-Schulz iterations on the autoencoder's Kronecker matrices, by dtype.

Times, alternated round by round in one process (so machine load affects
all alike), `kfac_keras.step_rules.newton_schulz` in float32 and with
bfloat16 products (`dtype="bfloat16"`: float32 iterate and coefficients),
and a plain all-bfloat16 loop (iterate and coefficients rounded to
bfloat16, as `a * x` on a bfloat16 tensor does) for comparison::

    python tools/step_efficiency/ns_dtype_bench.py [--rounds 20]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The checkout's kfac_keras, so a branch measures its own code.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kfac_keras import step_rules  # noqa: E402

#: The autoencoder's layer widths (tasks.py); its Kronecker matrices are `(n_in + 1, n_out)`.
WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
ITERATIONS = 3


def all_bfloat16(matrix, iterations):
    """Newton-Schulz with everything after the float32 normalisation in bfloat16."""
    a, b, c = step_rules.NEWTON_SCHULZ_COEFFICIENTS
    x = tf.cast(matrix, tf.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = tf.linalg.matrix_transpose(x)
    x = tf.cast(tf.math.divide_no_nan(x, tf.norm(x, axis=[-2, -1], keepdims=True)), tf.bfloat16)
    for _ in range(iterations):
        gram = tf.matmul(x, x, transpose_b=True)
        x = a * x + tf.matmul(b * gram + c * tf.matmul(gram, gram), x)
    x = tf.cast(x, tf.float32)
    return tf.linalg.matrix_transpose(x) if tall else x


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    matrices = [tf.constant(rng.normal(size=(n_in + 1, n_out)), tf.float32)
                for n_in, n_out in zip(WIDTHS[:-1], WIDTHS[1:])]
    variants = {
        "float32": lambda m: step_rules.newton_schulz(m, ITERATIONS, "float32"),
        "bfloat16 products (library)": lambda m: step_rules.newton_schulz(m, ITERATIONS, "bfloat16"),
        "all bfloat16": lambda m: all_bfloat16(m, ITERATIONS),
    }
    functions = {name: tf.function(lambda ms, f=f: [f(m) for m in ms])
                 for name, f in variants.items()}
    for function in functions.values():
        [t.numpy() for t in function(matrices)]
    seconds = {name: [] for name in functions}
    for _ in range(args.rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            [t.numpy() for t in function(matrices)]
            seconds[name].append(time.perf_counter() - start)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"{ITERATIONS} iterations on {len(matrices)} matrices, {args.rounds} alternated rounds, "
          f"load {' '.join(load)}")
    for name, values in seconds.items():
        print(f"{name}: median {1000 * np.median(values):.1f} ms, min {1000 * min(values):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
