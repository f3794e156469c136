"""Step time of several orthogonal-rule variants and Adam on the autoencoder, alternated in one
process (so machine load affects all alike).

Each variant is `{"kfac": KFAC options, "ns": step_rules.orthogonal_direction keywords}`; its
step is traced with `orthogonal_direction` bound to those keywords. Every round times one whole
`inv_update_every` period of each K-FAC variant (steady state: no start-up decompositions) and
as many Adam steps, in turn; prints per variant the median ms per step over rounds and the ratio
of its total time to Adam's. The problem is `benchmarks.step_cost`'s (batch 1000, one fixed
batch, seed 0).

    python tools/step_efficiency/ns_ratio.py --rounds 6 --variants \\
        '{"default": {}, "gt2": {"kfac": {"orthogonal_iterations": 2},
          "ns": {"normalization": "gram", "coefficients": "tuned"}}}'
"""

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", required=True, help="JSON {name: {kfac: {}, ns: {}}}")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    variants = json.loads(args.variants)

    import numpy as np
    import tensorflow as tf
    from kfac_keras import step_rules
    from benchmarks import step_cost
    from benchmarks.timing import kfac_period_seconds

    make_model, x, y, loss, description = step_cost.autoencoder_problem(args.batch_size,
                                                                        args.data_dir)
    x, y = tf.constant(x), tf.constant(y)
    original = step_rules.orthogonal_direction
    steps = {}
    for name, spec in variants.items():
        unknown = set(spec) - {"kfac", "ns"}
        if unknown:
            raise SystemExit(f"variant {name!r}: keys must be kfac/ns; got {sorted(unknown)}")
        step_rules.orthogonal_direction = functools.partial(original, **spec.get("ns", {}))
        model, optimizer, step = step_cost.build_kfac_step(make_model, x, y, loss,
                                                           **spec.get("kfac", {}))
        kfac_period_seconds(step, optimizer, periods=1, warmup=3, skip_startup=True)  # trace
        steps[name] = (optimizer, step)
    step_rules.orthogonal_direction = original
    import keras
    keras.utils.set_random_seed(0)
    adam_model = make_model()
    _, adam_step = step_cost.build_adam_step(adam_model, x, y, loss)
    for _ in range(3):
        float(adam_step())
    period = max(optimizer.inv_update_every for optimizer, _ in steps.values())
    seconds = {name: [] for name in list(steps) + ["adam"]}
    print(f"{description}; load before {os.getloadavg()}", flush=True)
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(period):
            value = adam_step()
        float(value)
        seconds["adam"].append((time.perf_counter() - start) / period)
        for name, (optimizer, step) in steps.items():
            duration = kfac_period_seconds(step, optimizer, periods=1, warmup=0)[0]
            seconds[name].append(duration / optimizer.inv_update_every)
    print(f"load after {os.getloadavg()}")
    adam_total = sum(seconds["adam"])
    print("| variant | ms per step (median of rounds) | ratio to Adam (totals) |")
    print("|---|---|---|")
    for name, values in seconds.items():
        print(f"| {name} | {1e3 * np.median(values):.1f} | {sum(values) / adam_total:.2f} |")
    print(json.dumps({"variants": variants, "seconds": seconds}))


if __name__ == "__main__":
    main()
