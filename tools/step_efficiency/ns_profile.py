"""Milliseconds of each Newton-Schulz matrix product on the autoencoder's Kronecker matrices.

For each matrix shape of the autoencoder's orthogonal step (784-1000-500-250-30-250-500-1000-784,
`[K; b]` layouts), times in one process, alternated round by round so machine load affects all
alike: the Gram matrix `X X^T`, its square, the product `poly @ X` (float32 and bfloat16 inputs),
one whole iteration, the Frobenius and Gram normalisations, and `step_rules.newton_schulz` at 1-3
iterations. Medians over `--rounds`.

    python tools/step_efficiency/ns_profile.py --rounds 15
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SHAPES = ((785, 1000), (1001, 500), (501, 250), (251, 30), (31, 250), (251, 500), (501, 1000),
          (1001, 784))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--schedules", default="", help="comma list of extra newton_schulz "
                        "coefficient schedules to time (names in step_rules), if the code has them")
    args = parser.parse_args(argv)
    import numpy as np
    import tensorflow as tf
    from kfac_keras import step_rules

    rng = np.random.default_rng(0)
    jobs = {}
    for rows, cols in SHAPES:
        m, n = min(rows, cols), max(rows, cols)
        wide = tf.constant(rng.standard_normal((m, n)).astype(np.float32) / np.sqrt(n))
        square = tf.constant(rng.standard_normal((m, m)).astype(np.float32) / np.sqrt(m))
        full = tf.constant(rng.standard_normal((rows, cols)).astype(np.float32))
        for dtype in ("float32", "bfloat16"):
            w, s = tf.cast(wide, dtype), tf.cast(square, dtype)
            jobs[(rows, cols, dtype, "gram X X^T")] = tf.function(
                lambda w=w: tf.matmul(w, w, transpose_b=True))
            jobs[(rows, cols, dtype, "gram^2")] = tf.function(lambda s=s: tf.matmul(s, s))
            jobs[(rows, cols, dtype, "poly @ X")] = tf.function(lambda s=s, w=w: tf.matmul(s, w))
            for k in (1, 2, 3):
                jobs[(rows, cols, dtype, f"newton_schulz k={k}")] = tf.function(
                    lambda full=full, k=k, dtype=dtype: step_rules.newton_schulz(full, k, dtype))
        jobs[(rows, cols, "float32", "norm ||X||_F")] = tf.function(
            lambda w=wide: tf.norm(w, axis=[-2, -1], keepdims=True))
    times = {key: [] for key in jobs}
    for fn in jobs.values():
        fn()  # trace
    for _ in range(args.rounds):
        for key, fn in jobs.items():
            t0 = time.perf_counter()
            fn().numpy()
            times[key].append(time.perf_counter() - t0)
    print(f"load: {os.getloadavg()}")
    print("| shape | dtype | operation | ms (median) |")
    print("|---|---|---|---|")
    totals = {}
    for key, values in times.items():
        rows, cols, dtype, op = key
        ms = 1e3 * float(np.median(values))
        totals[(dtype, op)] = totals.get((dtype, op), 0.0) + ms
        print(f"| {rows}x{cols} | {dtype} | {op} | {ms:.2f} |")
    print("\n| dtype | operation | ms summed over the 8 matrices |")
    print("|---|---|---|")
    for (dtype, op), ms in totals.items():
        print(f"| {dtype} | {op} | {ms:.2f} |")


if __name__ == "__main__":
    main()
