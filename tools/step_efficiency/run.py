"""Steps-to-target (and, optionally, step-time ratio to Adam) of K-FAC step rules.

One run compares every configuration on one task with the same initial
weights and batches, prints a table and appends one JSON line per
configuration to `--out`::

    python tools/step_efficiency/run.py --task autoencoder --steps 300 \\
        --configs '{"kl": {"step_rule": "kl"}, "rms": {"step_rule": "rms", "learning_rate": 0.01}}' \\
        --baselines adam:1e-3,muon:1e-2 --tune adam,muon --ratio kl,rms

`--configs` maps a name to `StepRuleKFAC` arguments (tools/step_efficiency/
step_rules.py; `{}` is `kfac_keras.KFAC()`'s defaults through
`step_rule="library"`; an `"lr_schedule": {"kind": "cosine" or "inv_sqrt",
"steps": N, "final_fraction": f}` entry decays `learning_rate` to `f` times
it at step N, `step_rules.learning_rate_schedule`), or, when `step_rule` is one of the library's own
(`"kl_clip"`, `"orthogonal"`), to `kfac_keras.KFAC` arguments, e.g.
`{"lib_ortho3": {"step_rule": "orthogonal", "learning_rate": 1e-2}}`.
`--baselines` lists `adam:LR` / `muon:LR` / `muon_bf16:LR` runs (`muon_bf16`:
`benchmarks.optimizers.MuonBfloat16`, Newton-Schulz products in bfloat16); `--tune adam,muon` searches
their learning rates on a 3x-spaced grid around the given value, extended at an edge until the best is inside (Muon as the
harness runs it: output layer excluded, no weight decay). `--ratio` times
the named configurations against Adam alternately in the same process
(`--ratio-rounds` rounds of `--ratio-period` steps each, after a warm-up),
so machine load affects both alike; time to a target is then
`steps x ratio x Adam's step`.

Targets are in the task's unit (tasks.py), counted on the `task.smooth`-step (10; 1 for the
full-batch `*_issue` tasks: the raw loss) trailing
mean of the training loss.
"""

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The checkout's kfac_keras (not an installed copy), so a branch measures its own code.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

SMOOTH = 10
#: `step_rule` values of `kfac_keras.KFAC` itself: such a config builds
#: `kfac_keras.KFAC(**kwargs)` instead of `StepRuleKFAC` (whose own rule names
#: differ: "kl", "ortho", ...).
LIBRARY_STEP_RULES = ("kl_clip", "orthogonal")


def make_optimizer(spec, task):
    import keras
    from step_rules import StepRuleKFAC

    kind, kwargs = spec
    if kind == "adam":
        return keras.optimizers.Adam(**kwargs)
    if kind == "muon":
        return keras.optimizers.Muon(exclude_layers=[task.output_layer], weight_decay=0.0,
                                     adam_weight_decay=0.0, **kwargs)
    if kind == "muon_bf16":
        from benchmarks.optimizers import MuonBfloat16

        return MuonBfloat16(exclude_layers=[task.output_layer], weight_decay=0.0,
                            adam_weight_decay=0.0, **kwargs)
    kwargs = dict(kwargs)
    schedule = kwargs.pop("lr_schedule", None)  # {"kind": "cosine"|"inv_sqrt", "steps": N, ...}
    if schedule:
        from step_rules import learning_rate_schedule

        kwargs["learning_rate"] = learning_rate_schedule(kwargs.get("learning_rate", 1.0),
                                                         **schedule)
    kwargs.setdefault("seed", 0)
    if "embedding_rule" in kwargs:  # S5-embed's experimental Embedding treatments
        from embedding_rules import EmbeddingRuleKFAC

        return EmbeddingRuleKFAC(**kwargs)
    if kwargs.get("step_rule") in LIBRARY_STEP_RULES:
        import kfac_keras

        return kfac_keras.KFAC(**kwargs)  # the library's own rule, no subclass
    kwargs.setdefault("step_rule", "library")
    return StepRuleKFAC(**kwargs)


def make_step(model, optimizer, task):
    import tensorflow as tf
    import kfac_keras

    if isinstance(optimizer, kfac_keras.KFAC):
        train_step = kfac_keras.make_train_step(model, optimizer, loss=task.loss)
        return tf.function(lambda x, y: train_step(x, y)["loss"])

    @tf.function(jit_compile=False)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = task.loss(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def fresh(task, spec, seed):
    import keras

    keras.utils.set_random_seed(seed)
    model = task.make_model()
    optimizer = make_optimizer(spec, task)
    if not hasattr(optimizer, "attach"):
        optimizer.build(model.trainable_variables)
    return model, optimizer, make_step(model, optimizer, task)


def train(task, spec, steps, seed=0):
    """Runs `steps` steps; returns losses (task unit), per-step seconds, logs."""
    import tensorflow as tf

    model, optimizer, step = fresh(task, spec, seed)
    losses, seconds = [], []
    for k in range(steps):
        x, y = task.batches[k]
        x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
        t0 = time.perf_counter()
        value = float(step(x, y))
        seconds.append(time.perf_counter() - t0)
        losses.append(value * task.loss_scale)
        if not math.isfinite(value):
            break
    extra = {}
    if hasattr(optimizer, "damping"):
        extra["damping_end"] = float(optimizer.damping.numpy())
        extra["skipped"] = int(optimizer.skipped_steps.numpy())
    return np.array(losses), np.array(seconds), extra


def smoothed(losses, window=SMOOTH):
    c = np.cumsum(np.insert(losses, 0, 0.0))
    k = np.arange(1, len(losses) + 1)
    lo = np.maximum(0, k - window)
    return (c[k] - c[lo]) / (k - lo)


def steps_to(curve, target):
    hits = np.nonzero(curve <= target)[0]
    return int(hits[0]) + 1 if len(hits) else None


def parse_baselines(text):
    out = []
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        kind, lr = item.split(":")
        out.append((kind, float(lr)))
    return out


def grid_around(lr):
    return [lr / 3.0, lr, lr * 3.0]


def fmt(value):
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def run_config(task, name, spec, args, targets, results):
    t0 = time.perf_counter()
    losses, seconds, extra = train(task, spec, args.steps, args.seed)
    curve = smoothed(losses, getattr(task, "smooth", SMOOTH))
    row = {"task": task.name, "config": name, "kind": spec[0],
           "kwargs": spec[1], "steps": args.steps,
           "reach": {f"{t:.4g}": steps_to(curve, t) for t in targets},
           "final": float(curve[-1]) if len(curve) else None,
           "at": [round(float(v), 4) for v in curve[49::50]],
           "curve": [round(float(v), 5) for v in curve],
           "ms_median": round(1000 * float(np.median(seconds[5:] if len(seconds) > 10 else seconds)), 1),
           "ms_mean": round(1000 * float(np.mean(seconds[5:] if len(seconds) > 10 else seconds)), 1),
           "diverged": bool(len(losses) < args.steps), "wall": round(time.perf_counter() - t0, 1),
           **extra}
    results.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def score(row, targets):
    """Lower is better: steps to the last target reached, then final loss."""
    reached = [row["reach"][f"{t:.4g}"] for t in targets]
    missing = sum(r is None for r in reached)
    total = sum(r if r is not None else 10 * row["steps"] for r in reached)
    return (missing, total, row["final"] if row["final"] is not None else float("inf"))


def tune(task, kind, lr, args, targets, results):
    """3x grid around `lr`, extended at an edge (at most 3 times) until the best is inside."""
    tried = {}
    grid = grid_around(lr)
    for _ in range(4):
        for value in grid:
            key = float(f"{value:.3g}")
            if key not in tried:
                tried[key] = run_config(task, f"{kind}:{key:g}", (kind, {"learning_rate": key}),
                                        args, targets, results)
        ordered = sorted(tried)
        best = min(ordered, key=lambda v: score(tried[v], targets))
        if best == ordered[0]:
            grid = [best / 3.0]
        elif best == ordered[-1]:
            grid = [best * 3.0]
        else:
            break
    return best


def alternate_ratio(task, spec, adam_lr, args):
    """Seconds of `--ratio-rounds` x `--ratio-period` steps of `spec` over
    those of Adam, interleaved period by period after a warm-up."""
    import tensorflow as tf

    runners = []
    for s in (spec, ("adam", {"learning_rate": adam_lr})):
        _, _, step = fresh(task, s, args.seed)
        runners.append(step)
    batches = [(tf.convert_to_tensor(x), tf.convert_to_tensor(y)) for x, y in
               task.batches[:args.ratio_warmup + args.ratio_rounds * args.ratio_period]]
    for step in runners:
        for x, y in batches[:args.ratio_warmup]:
            float(step(x, y))
    totals = [0.0, 0.0]
    for r in range(args.ratio_rounds):
        chunk = batches[args.ratio_warmup + r * args.ratio_period:
                        args.ratio_warmup + (r + 1) * args.ratio_period]
        for j, step in enumerate(runners):
            t0 = time.perf_counter()
            for x, y in chunk:
                value = step(x, y)
            float(value)
            totals[j] += time.perf_counter() - t0
    steps = args.ratio_rounds * args.ratio_period
    return totals[0] / totals[1], 1000 * totals[1] / steps, 1000 * totals[0] / steps


def main_with_experiment_optimizer(key, factory):
    """`main()` where a K-FAC configuration carrying `key` is built by
    `factory(**kwargs)` (seed 0 unless given, as `make_optimizer` does) instead
    of the library's class; other configurations as usual."""
    global make_optimizer
    library_make_optimizer = make_optimizer

    def experiment_make_optimizer(spec, task):
        kind, kwargs = spec
        if kind == "kfac" and key in kwargs:
            return factory(**{"seed": 0, **kwargs})
        return library_make_optimizer(spec, task)

    make_optimizer = experiment_make_optimizer
    return main()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, help="autoencoder, cnn, lm, mlp, lsq, softmax, "
                   "lsq_issue, softmax_issue, lsq_sum, softmax_sum, autoencoder_sum")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default="{}", help="JSON: name -> StepRuleKFAC kwargs")
    p.add_argument("--baselines", default="", help="comma list of adam:LR / muon:LR / muon_bf16:LR")
    p.add_argument("--tune", default="", help="comma list of baselines to tune (adam, muon)")
    p.add_argument("--ratio", default="", help="comma list of config names to time vs Adam")
    p.add_argument("--ratio-adam-lr", type=float, default=1e-3)
    p.add_argument("--ratio-period", type=int, default=20)
    p.add_argument("--ratio-rounds", type=int, default=3)
    p.add_argument("--ratio-warmup", type=int, default=25)
    p.add_argument("--ratio-only", action="store_true",
                   help="only time the --ratio configurations (no training runs)")
    p.add_argument("--targets", default=None, help="comma list (default: the task's)")
    p.add_argument("--out", default=None, help="JSON-lines file to append to")
    args = p.parse_args(argv)

    import tasks as tasks_lib

    needed = max(args.steps, args.ratio_warmup + args.ratio_rounds * args.ratio_period)
    task = tasks_lib.TASKS[args.task](needed, args.seed)
    targets = ([float(t) for t in args.targets.split(",")] if args.targets
               else list(task.targets))
    if task.gap_fraction is not None:
        import keras

        keras.utils.set_random_seed(args.seed)
        model = task.make_model()
        x, y = task.batches[0]
        first = float(task.loss(y, model(x))) * task.loss_scale
        targets.append(task.floor + task.gap_fraction * (first - task.floor))
    print(f"task {task.name}: steps {args.steps}, targets {[f'{t:.5g}' for t in targets]} "
          f"{task.unit}" + (f", floor {task.floor:.5g}" if task.floor is not None else ""),
          flush=True)
    results = []
    tuned = {}
    for kind, lr in ([] if args.ratio_only else parse_baselines(args.baselines)):
        if kind in args.tune.split(","):
            tuned[kind] = tune(task, kind, lr, args, targets, results)
        else:
            run_config(task, f"{kind}:{lr:g}", (kind, {"learning_rate": lr}), args, targets,
                       results)
    configs = json.loads(args.configs)
    for name, kwargs in ({} if args.ratio_only else configs).items():
        run_config(task, name, ("kfac", kwargs), args, targets, results)
    ratios = {}
    adam_lr = tuned.get("adam", args.ratio_adam_lr)
    for name in filter(None, args.ratio.split(",")):
        spec = ("kfac", configs[name]) if name in configs else (
            name.split(":")[0], {"learning_rate": float(name.split(":")[1])})
        ratios[name] = alternate_ratio(task, spec, adam_lr, args)
        print(json.dumps({"task": task.name, "ratio_config": name, "ratio": round(ratios[name][0], 3),
                          "adam_ms": round(ratios[name][1], 1), "ms": round(ratios[name][2], 1)}),
              flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"task": task.name, "ratio_config": name,
                                    "ratio": round(ratios[name][0], 3),
                                    "adam_ms": round(ratios[name][1], 1),
                                    "ms": round(ratios[name][2], 1)}) + "\n")
    header = ["config"] + [f"steps to {t:.4g}" for t in targets] + ["final", "ms/step", "ratio"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in results:
        ratio = ratios.get(row["config"])
        print("| " + " | ".join([row["config"]] + [fmt(row["reach"][f"{t:.4g}"]) for t in targets]
                                + [fmt(row["final"]), fmt(row["ms_median"]),
                                   "-" if ratio is None else f"{ratio[0]:.2f}"]) + " |")
    if tuned:
        print("tuned: " + ", ".join(f"{k} {v:g}" for k, v in tuned.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
