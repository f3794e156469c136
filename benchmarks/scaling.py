"""How the cost of K-FAC grows with layer width and batch size, next to Adam.

Run with::

    python -m benchmarks.scaling [--quick] [--out-dir DIR]
        [--widths 256,512,1024,2048,4096] [--batches 250,500,1000,2000,4000]
        [--fixed-width 1024] [--fixed-batch 1000] [--repeats N] [--cycles N]

Model. An MLP ``784 -> Dense(n, relu) -> Dense(n, relu) -> Dense(10)`` that
outputs logits, trained with
``SparseCategoricalCrossentropy(from_logits=True)``. K-FAC gives each Dense
layer a Kronecker block with factors of size ``(in + 1)`` (input, with the
bias) and ``out`` (output gradient), so the largest factors are about
``n x n``. The data are random normal inputs with random labels (the cost of
a step does not depend on the values), fixed by seed 0.

What is timed (milliseconds; jit off, the Keras default on CPU; each entry
is the median over ``repeats`` calls after two warm-up calls, timed with
``benchmarks.timing`` and the step builders of ``benchmarks.step_cost``):

* ``adam_step``: one Adam step (forward, backward, update).
* ``kfac_plain_step``: a K-FAC step that neither updates statistics nor
  decomposes (forward, backward, preconditioning, update).
* ``kfac_statistics_step``: a K-FAC step that also updates the factor
  statistics (the sampled-loss backward pass and the factor products), with
  no decomposition in the timed steps.
* ``kfac_decomposition_call``: one call of ``KFAC.update_inverses`` (all
  factors of the model, the default ``cholesky`` method); one call fewer
  than ``repeats`` (at least one) after one warm-up call.
* ``kfac_step_amortised``: the default K-FAC step (statistics every
  ``cov_update_every`` steps, decompositions every ``inv_update_every``),
  timed over whole ``inv_update_every`` periods after the start-up phase
  (see ``timing.kfac_period_seconds(skip_startup=True)``), so occasional
  work counts at its steady-state frequency. With several periods the
  median of the per-period means is reported.
* ``cholesky_inverse`` and ``eigh`` (width sweep only): one decomposition of
  a random symmetric positive definite ``n x n`` matrix with
  ``kfac_keras.linalg.damped_inverse`` (Cholesky factorization and solves)
  and ``kfac_keras.linalg.clipped_eigh``, XLA-compiled or not as
  ``kfac_keras.linalg.decomposition_jit("auto")`` decides (off on CPU).

Memory: the bytes of the optimizer variables, counted from the variables
themselves (``size * itemsize``): for K-FAC the momentum buffers, the
factors, the decompositions (inverses) and the scalars; for Adam its two
moment buffers and the scalars. The process peak resident set size after
each point is listed too (it only grows).

The time exponents are least-squares slopes of ``log(time)`` against
``log(width)`` (or ``log(batch)``), over all points and over the three
largest. Small sizes are dominated by fixed per-step overhead, so the slope
over the largest points is the better guide to the cost of bigger models.

Cost. Fewer repeats are used at the largest sizes (the table lists them);
the command prints the time of every point and the total wall time.
``--quick`` uses widths 64, 128, 256 and batches 250, 1000, 4000 at width
128.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import cli, step_cost  # noqa: E402
from benchmarks.scaling_report import (  # noqa: E402
    exponent_rows, mib, decomposition_table, exponent_table, memory_table, step_table,
    write_csv, write_plots)
from benchmarks.timing import call_seconds, fetch, kfac_period_seconds, median_ms  # noqa: E402
from kfac_keras import linalg  # noqa: E402

DEFAULT_WIDTHS = (256, 512, 1024, 2048, 4096)
DEFAULT_BATCHES = (250, 500, 1000, 2000, 4000)
QUICK_WIDTHS = (64, 128, 256)
QUICK_BATCHES = (250, 1000, 4000)
DEFAULT_FIXED_WIDTH = 1024
QUICK_FIXED_WIDTH = 128
DEFAULT_FIXED_BATCH = 1000
INPUT_DIM = 784
NUM_CLASSES = 10
HIDDEN_LAYERS = 2



# --------------------------------------------------------------------------
# Model and accounting
# --------------------------------------------------------------------------


def make_mlp(width, hidden_layers=HIDDEN_LAYERS, input_dim=INPUT_DIM,
             num_classes=NUM_CLASSES):
    """The benchmark MLP: ``input_dim -> hidden_layers x Dense(width, relu) -> Dense``.

    Args:
        width: int, units of every hidden layer.
        hidden_layers: int, number of hidden Dense layers. Defaults to 2.
        input_dim: int, input features. Defaults to 784.
        num_classes: int, output logits. Defaults to 10.

    Returns:
        A built functional `keras.Model` that outputs logits.
    """
    inputs = keras.Input(shape=(input_dim,), name="features")
    h = inputs
    for index in range(hidden_layers):
        h = keras.layers.Dense(width, activation="relu", name=f"hidden_{index + 1}")(h)
    outputs = keras.layers.Dense(num_classes, name="logits")(h)
    return keras.Model(inputs, outputs, name=f"mlp_{width}")


def _variable_bytes(variable):
    return int(np.prod(variable.shape, dtype=np.int64)) * np.dtype(variable.dtype).itemsize


def optimizer_state_bytes(optimizer):
    """Bytes held by an optimizer's variables, with a breakdown.

    Args:
        optimizer: a built Keras optimizer. A `kfac_keras.KFAC` must be
            attached to its model (its factors exist only then).

    Returns:
        A dict of ints. ``total``: all ``optimizer.variables``. For K-FAC,
        ``momentum`` (the velocity buffers), ``factors`` (the block variables
        named by each block's ``factor_shapes``), ``decompositions`` (the
        other block state: inverses or eigenbases) and ``other`` (the rest:
        counters, learning rate, damping). For other optimizers
        ``slots`` (all variables with more than one entry) and ``other``.
    """
    variables = list(optimizer.variables)
    total = sum(_variable_bytes(v) for v in variables)
    registration = getattr(optimizer, "registration", None)
    if registration is None:
        slots = sum(_variable_bytes(v) for v in variables
                    if int(np.prod(v.shape, dtype=np.int64)) > 1)
        return {"total": total, "slots": slots, "other": total - slots}
    momentum_ids = {id(v) for v in optimizer.velocities}
    factor_ids, state_ids = set(), set()
    for block in registration.blocks:
        for name in block.factor_shapes():
            factor = getattr(block, name, None)
            if factor is not None and hasattr(factor, "shape"):
                factor_ids.add(id(factor))
        state_ids.update(id(v) for v in block.state_variables())
    parts = {"momentum": 0, "factors": 0, "decompositions": 0, "other": 0}
    for v in variables:
        if id(v) in momentum_ids:
            key = "momentum"
        elif id(v) in factor_ids:
            key = "factors"
        elif id(v) in state_ids:
            key = "decompositions"
        else:
            key = "other"
        parts[key] += _variable_bytes(v)
    return {"total": total, **parts}


def peak_rssmib():
    """The process's peak resident set size in MiB (Linux: ru_maxrss is KiB)."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / (1024.0 * 1024.0) if sys.platform == "darwin" else usage / 1024.0


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def default_repeats(width, batch):
    """Timed calls per entry: fewer for the most expensive sizes."""
    work = width * width * batch
    if work > 4096 * 4096 * 500:
        return 2
    if work > 1024 * 1024 * 2000:
        return 3
    return 5


def default_cycles(width, batch):
    """`inv_update_every` periods timed for the amortised step."""
    return 1 if width * width * batch > 1024 * 1024 * 1000 else 2


def measure_steps(width, batch, repeats, cycles):
    """Times Adam and K-FAC steps of the MLP of `width` at `batch`.

    Args:
        width: int, hidden width.
        batch: int, examples per step.
        repeats: int, timed calls for the median of each single-step entry.
        cycles: int, `inv_update_every` periods for the amortised step.

    Returns:
        A dict of the `STEP_COLUMNS` milliseconds, the K-FAC / Adam ratio,
        the parameter count and the optimizer-state bytes.
    """
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, INPUT_DIM)).astype("float32"))
    y = tf.constant(rng.integers(0, NUM_CLASSES, size=(batch,)).astype("int32"))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    make_model = lambda: make_mlp(width)  # noqa: E731
    out = {}

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = make_model()
    out["params"] = int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    adam, adam_step = step_cost.build_adam_step(model, x, y, loss)
    out["adam_step_ms"] = median_ms(adam_step, repeats)
    adam_bytes = optimizer_state_bytes(adam)
    del model, adam, adam_step

    never = 10**9
    _, _, plain = step_cost.build_kfac_step(
        make_model, x, y, loss, cov_update_every=never, inv_update_every=never)
    out["kfac_plain_step_ms"] = median_ms(plain, repeats)
    del plain
    _, statistics_optimizer, with_statistics = step_cost.build_kfac_step(
        make_model, x, y, loss, cov_update_every=1, inv_update_every=never)
    # K-FAC also decomposes after each of its first three statistics updates;
    # with statistics at every step those would be timed steps. Starting the
    # estimate counter at 3 leaves only the decomposition of the (warm-up)
    # step 0, so every timed step is a pure statistics step.
    statistics_optimizer.num_estimates.assign(3.0)
    out["kfac_statistics_step_ms"] = median_ms(with_statistics, repeats)
    del with_statistics, statistics_optimizer

    _, optimizer, default_step = step_cost.build_kfac_step(make_model, x, y, loss)
    cycle_seconds = kfac_period_seconds(default_step, optimizer, cycles, skip_startup=True)
    out["kfac_step_amortised_ms"] = (
        1000.0 * float(np.median(cycle_seconds)) / optimizer.inv_update_every)
    decompose = tf.function(optimizer.update_inverses, autograph=False)
    out["kfac_decomposition_call_ms"] = median_ms(
        decompose, max(1, repeats - 1), warmup=1)
    kfac_bytes = optimizer_state_bytes(optimizer)
    out["inv_update_every"] = optimizer.inv_update_every
    out["cov_update_every"] = optimizer.cov_update_every
    out["ratio_kfac_to_adam"] = out["kfac_step_amortised_ms"] / out["adam_step_ms"]
    out["adam_state_bytes"] = adam_bytes["total"]
    out["kfac_state_bytes"] = kfac_bytes["total"]
    for key in ("momentum", "factors", "decompositions", "other"):
        out[f"kfac_{key}_bytes"] = kfac_bytes[key]
    out["repeats"] = repeats
    out["cycles"] = cycles
    del optimizer, default_step, decompose
    keras.backend.clear_session()
    out["peak_rss_mib"] = peak_rssmib()
    return out


def measure_decompositions(n, cholesky_repeats, eigh_repeats, damping=1e-3):
    """Times one damped Cholesky inverse and one eigh of an ``n x n`` SPD matrix.

    The functions are traced once for a dynamic shape and warmed up on a
    small matrix, so the timed calls include no tracing.

    Args:
        n: int, matrix size.
        cholesky_repeats: int, timed calls of `linalg.damped_inverse`.
        eigh_repeats: int, timed calls of `linalg.clipped_eigh`.
        damping: float, added to the diagonal before the Cholesky inverse.
            Defaults to 1e-3.

    Returns:
        ``{"cholesky_inverse_ms": median, "eigh_ms": median, "jit": bool}``.
    """
    use_jit = linalg.decomposition_jit("auto")
    spec = [tf.TensorSpec([None, None], tf.float32)]
    inverse = tf.function(lambda m: linalg.damped_inverse(m, damping),
                          input_signature=spec, jit_compile=use_jit)
    eigh = tf.function(linalg.clipped_eigh, input_signature=spec, jit_compile=use_jit)
    rng = np.random.default_rng(n)
    rows = rng.normal(size=(2 * n, n)).astype("float32")
    matrix = tf.constant(rows.T @ rows / (2 * n))  # a Wishart sample: SPD, condition ~ 34
    small = tf.eye(8)
    out = {"jit": use_jit}
    for key, fn, repeats in (("cholesky_inverse_ms", inverse, cholesky_repeats),
                             ("eigh_ms", eigh, eigh_repeats)):
        fetch(fn(small))
        out[key] = 1000.0 * float(np.median(call_seconds(lambda f=fn: f(matrix), repeats,
                                                         warmup=0)))
        out[key.replace("_ms", "_repeats")] = repeats
    return out


def decomposition_repeats(n):
    """``(cholesky_repeats, eigh_repeats)``: fewer for the largest sizes, where
    one eigh takes many seconds on a CPU."""
    if n >= 4096:
        return 2, 1
    if n >= 2048:
        return 3, 2
    return 5, 3


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _positive_int_list(text):
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of positive integers; received {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected a comma list of positive integers; received {text!r}")
    return values


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; received {text!r}")
    return value


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="widths 64,128,256 and batches 250,1000,4000 at width 128, "
                        "5 repeats, 1 period: a smoke test")
    p.add_argument("--out-dir", default=os.path.join("benchmark_results", "scaling"),
                   help="where results.md, results.csv and the plots go "
                        "(default: %(default)s)")
    p.add_argument("--widths", type=_positive_int_list, default=None,
                   help="hidden widths of the width sweep (default "
                        f"{','.join(map(str, DEFAULT_WIDTHS))}; "
                        f"{','.join(map(str, QUICK_WIDTHS))} with --quick)")
    p.add_argument("--batches", type=_positive_int_list, default=None,
                   help="batch sizes of the batch sweep (default "
                        f"{','.join(map(str, DEFAULT_BATCHES))}; "
                        f"{','.join(map(str, QUICK_BATCHES))} with --quick)")
    p.add_argument("--fixed-width", type=_positive_int, default=None,
                   help=f"width of the batch sweep (default {DEFAULT_FIXED_WIDTH}; "
                        f"{QUICK_FIXED_WIDTH} with --quick)")
    p.add_argument("--fixed-batch", type=_positive_int, default=DEFAULT_FIXED_BATCH,
                   help="batch size of the width sweep (default: %(default)s)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed calls per entry (default: 5, 3 or 2 by size)")
    p.add_argument("--cycles", type=_positive_int, default=None,
                   help="inv_update_every periods timed for the amortised step "
                        "(default: 2, or 1 for the largest sizes and with --quick)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    cli.print_environment()
    widths = args.widths or (QUICK_WIDTHS if args.quick else DEFAULT_WIDTHS)
    batches = args.batches or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    fixed_width = args.fixed_width or (QUICK_FIXED_WIDTH if args.quick else DEFAULT_FIXED_WIDTH)
    fixed_batch = args.fixed_batch

    def repeats_for(width, batch):
        return args.repeats or default_repeats(width, batch)

    def cycles_for(width, batch):
        return args.cycles or (1 if args.quick else default_cycles(width, batch))

    print(f"model: MLP {INPUT_DIM} -> {HIDDEN_LAYERS} x Dense(n, relu) -> Dense({NUM_CLASSES}) "
          "logits, sparse softmax cross-entropy, random data; K-FAC defaults, jit off",
          flush=True)
    print(f"width sweep {list(widths)} at batch {fixed_batch}; batch sweep {list(batches)} "
          f"at width {fixed_width}", flush=True)
    cache = {}

    def point(width, batch):
        if (width, batch) not in cache:
            t0 = time.perf_counter()
            r = measure_steps(width, batch, repeats_for(width, batch),
                              cycles_for(width, batch))
            r.update(width=width, batch=batch)
            cache[(width, batch)] = r
            print(f"  width {width:5d} batch {batch:5d}: Adam {r['adam_step_ms']:.1f} ms, "
                  f"K-FAC plain {r['kfac_plain_step_ms']:.1f}, statistics "
                  f"{r['kfac_statistics_step_ms']:.1f}, decomposition call "
                  f"{r['kfac_decomposition_call_ms']:.1f}, amortised "
                  f"{r['kfac_step_amortised_ms']:.1f} ms (x{r['ratio_kfac_to_adam']:.2f}); "
                  f"state {mib(r['kfac_state_bytes']):.1f} vs "
                  f"{mib(r['adam_state_bytes']):.1f} MiB  [{time.perf_counter() - t0:.1f} s]",
                  flush=True)
        return cache[(width, batch)]

    width_rows = [point(w, fixed_batch) for w in widths]
    batch_rows = [point(fixed_width, b) for b in batches]
    decomposition_rows = []
    for n in widths:
        t0 = time.perf_counter()
        chol_repeats, eigh_repeats = decomposition_repeats(n)
        if args.repeats:
            chol_repeats = eigh_repeats = args.repeats
        r = measure_decompositions(n, chol_repeats, eigh_repeats)
        r["n"] = n
        decomposition_rows.append(r)
        print(f"  n {n:5d}: Cholesky damped inverse {r['cholesky_inverse_ms']:.2f} ms, "
              f"eigh {r['eigh_ms']:.2f} ms  [{time.perf_counter() - t0:.1f} s]", flush=True)

    exponents = exponent_rows(width_rows, batch_rows, decomposition_rows)
    env = (f"python {sys.version.split()[0]}, tensorflow {tf.__version__}, keras "
           f"{keras.__version__}, {os.cpu_count()} CPU cores")
    first = width_rows[0]
    text = "\n".join([
        "# K-FAC cost vs layer width and batch size",
        "",
        f"- machine: {env}",
        f"- model: MLP {INPUT_DIM} -> {HIDDEN_LAYERS} x Dense(n, relu) -> Dense({NUM_CLASSES}) "
        "logits, SparseCategoricalCrossentropy(from_logits=True), random inputs and labels",
        f"- K-FAC defaults (cov_update_every={first['cov_update_every']}, "
        f"inv_update_every={first['inv_update_every']}, cholesky); jit off; milliseconds are "
        "medians over the listed repeats after 2 warm-up calls (the decomposition call: "
        "one repeat fewer, at least 1, after 1 warm-up call); the amortised step is the "
        "median over the listed periods of the mean step time of a whole "
        "inv_update_every period, timed after the start-up phase",
        "",
        f"## Versus width (batch {fixed_batch})",
        "",
        step_table(width_rows, "width"),
        "",
        "## One decomposition of an n x n matrix",
        "",
        decomposition_table(decomposition_rows),
        "",
        f"## Versus batch size (width {fixed_width})",
        "",
        step_table(batch_rows, "batch"),
        "",
        f"## Optimizer state memory (batch {fixed_batch})",
        "",
        memory_table(width_rows),
        "",
        "## Fitted exponents (time ~ size^p, log-log least squares)",
        "",
        exponent_table(exponents),
        "",
    ])
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text)
    write_csv(os.path.join(args.out_dir, "results.csv"), width_rows, batch_rows,
              decomposition_rows)
    with open(os.path.join(args.out_dir, "exponents.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["quantity", "versus", "exponent_all", "exponent_top3", "points"])
        for label, versus, p_all, p_top, count in exponents:
            writer.writerow([label, versus, f"{p_all:.4f}", f"{p_top:.4f}", count])
    plots = write_plots(args.out_dir, width_rows, batch_rows, decomposition_rows)
    print()
    print(text)
    print(f"wrote {os.path.join(args.out_dir, 'results.md')}, results.csv, exponents.csv, "
          f"{', '.join(os.path.basename(p) for p in plots)}")
    print(f"total wall time {time.perf_counter() - t_start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
