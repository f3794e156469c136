"""Cost of orthogonalising an Embedding table: the whole `(vocabulary, dim)`
table (`step_rules.orthogonal_direction`) vs its present rows only
(`embedding_rules`' gather / Newton-Schulz with the `dim x dim` Gram /
scatter), alternated in one process (S5-embed).

    python tools/step_efficiency/embed_cost.py [--vocabulary 20000 --dim 32 --present 1500]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from embedding_rules import newton_schulz_right, present_rows  # noqa: E402
from kfac_keras import step_rules  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocabulary", type=int, default=20000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--present", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    table = np.zeros((args.vocabulary, args.dim), np.float32)
    rows = rng.choice(args.vocabulary, args.present, replace=False)
    table[rows] = rng.normal(size=(args.present, args.dim))
    table = tf.constant(table)

    @tf.function
    def whole(m):
        return step_rules.orthogonal_direction(m, 3)

    @tf.function
    def present(m):
        index = present_rows(m)
        polar = newton_schulz_right(tf.gather(m, index), 3)
        return tf.scatter_nd(index[:, None], polar, m.shape)

    a, b = whole(table).numpy(), present(table).numpy()
    scale = 0.2 * np.sqrt(max(args.vocabulary, args.dim))
    print(f"max |table - present * table scale| = {np.abs(a - scale * b).max():.2e}")
    times = {"whole": [], "present": []}
    for _ in range(args.rounds):
        for name, fn in (("whole", whole), ("present", present)):
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                fn(table).numpy()
            times[name].append((time.perf_counter() - t0) / args.repeats * 1e3)
    for name, t in times.items():
        print(f"{name}: median {np.median(t):.2f} ms per call (rounds {np.round(t, 2).tolist()})")
    print(f"ratio whole / present: {np.median(times['whole']) / np.median(times['present']):.1f}x")


if __name__ == "__main__":
    main()
