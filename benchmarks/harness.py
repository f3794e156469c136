"""The optimizer race: trains each optimizer on the same model and batches and times it.

The benchmarks race K-FAC against first-order baselines on the same model,
the same initial weights and the same order of mini-batches, and report how
many steps and seconds each optimizer takes to reach a set of training-loss
targets.

* **What is measured**: per-batch loss and wall-clock time, by
  ``benchmarks.timing.TimedLossHistory`` (put last among the callbacks, so
  K-FAC's per-batch work is timed too; ``run_optimizer`` does this). The
  first ``warmup_steps`` steps are reported as ``compile_seconds`` and
  charged the median step time on the time axis.
* **Time-to-target**: ``benchmarks.targets.steps_and_seconds_to_target``,
  the first step where the trailing moving average of the per-batch losses
  is at or below the target, and the charged run time up to that step
  (actual per-step times, so K-FAC's occasional expensive steps count).
* **Fair comparison**: ``run_optimizer`` calls
  ``keras.utils.set_random_seed(seed)`` before it builds each model, so
  every optimizer starts from the same weights, and feeds
  ``benchmarks.batches.make_dataset`` (a fixed batch order) to ``fit`` with
  ``shuffle=False``, so every optimizer sees the same batches in the same
  order.
* **Learning rates**: ``lr_grid_search`` runs short trainings over a grid
  and extends it when the best value is at an edge; the baselines are
  listed in ``benchmarks.optimizers``.
"""

from __future__ import annotations

import math
import time
import traceback

import keras

from benchmarks.batches import make_dataset
from benchmarks.reports import fmt_lr, round_sig
from benchmarks.targets import DEFAULT_SMOOTH_WINDOW
from benchmarks.timing import DEFAULT_WARMUP_STEPS, TimedLossHistory

__all__ = [
    "benchmark_optimizers",
    "choose_jit_compile",
    "lr_grid_search",
    "run_optimizer",
]


def run_optimizer(make_model, make_optimizer, x, y, loss, batch_size, steps,
                  seed, jit_compile, callbacks=(), verbose=0, *,
                  data_seed=None, batch_sizes=None,
                  warmup_steps=DEFAULT_WARMUP_STEPS,
                  smooth_window=DEFAULT_SMOOTH_WINDOW, label="",
                  progress_every=0, loss_scale=1.0, loss_unit="",
                  metrics=None, evaluate=None):
    """Trains a fresh model for ``steps`` steps and times it.

    Args:
        make_model: ``() -> keras.Model`` (built after seeding).
        make_optimizer: ``() -> keras.optimizers.Optimizer``.
        x, y: numpy arrays. ``y=None`` means autoencoder targets ``x``.
        loss: Keras loss passed to ``compile``.
        batch_size: constant batch size (ignored if ``batch_sizes`` given).
        steps: number of optimizer steps (one epoch of ``steps`` batches).
        seed: weight-initialisation seed; also the data-order seed unless
            ``data_seed`` is given.
        jit_compile: passed to ``model.compile``.
        callbacks: a list of callbacks or a zero-argument callable returning
            one (use a callable for stateful callbacks such as K-FAC's).
        verbose: Keras ``fit`` verbosity (0 = silent; use ``progress_every``
            for compact lines).
        evaluate: optional ``model -> dict`` called after training (outside
            the timed run), e.g. to measure held-out accuracy. Defaults to
            None (no evaluation).

    Returns:
        A dict with ``history`` (see ``TimedLossHistory.result``), plus
        ``final_loss`` (last smoothed loss), ``per_step_ms``,
        ``compile_seconds``, ``jit_compile``, ``steps``, ``total_seconds``,
        and ``evaluation`` (the result of ``evaluate``, or None).
    """
    keras.backend.clear_session()
    keras.utils.set_random_seed(int(seed))
    model = make_model()
    optimizer = make_optimizer()
    model.compile(optimizer=optimizer, loss=loss, jit_compile=bool(jit_compile),
                  metrics=metrics)
    ds = make_dataset(x, y, batch_size, steps,
                      seed if data_seed is None else data_seed, batch_sizes)
    extra = list(callbacks() if callable(callbacks) else callbacks)
    timer = TimedLossHistory(warmup_steps=warmup_steps, smooth_window=smooth_window,
                             batch_sizes=batch_sizes, progress_every=progress_every,
                             label=label, loss_scale=loss_scale, loss_unit=loss_unit,
                             total_steps=steps)
    t = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=steps, shuffle=False,
              verbose=verbose, callbacks=extra + [timer])
    total = time.perf_counter() - t
    evaluation = None if evaluate is None else evaluate(model)
    h = timer.result()
    final = float(h["smoothed"][-1]) if h["steps_run"] else float("nan")
    if h["steps_run"] < steps:  # stopped early (diverged)
        final = float("nan")
    return {
        "label": label,
        "history": h,
        "final_loss": final,
        "per_step_ms": h["per_step_ms"],
        "mean_step_ms": h["mean_step_ms"],
        "compile_seconds": h["compile_seconds"],
        "jit_compile": bool(jit_compile),
        "steps": int(steps),
        "steps_run": h["steps_run"],
        "total_seconds": total,
        "batch_size": int(batch_size) if batch_sizes is None else None,
        "evaluation": evaluation,
    }


def choose_jit_compile(probe, probe_steps=6, verbose=True, label=""):
    """Times a short run with and without XLA and returns the faster setting.

    ``probe(jit_compile, steps)`` must run training and return a
    ``run_optimizer`` result. Returns ``(choice, {True: ms, False: ms})``
    using the median post-warm-up step time.
    """
    timings = {}
    for jit in (False, True):
        try:
            r = probe(jit, probe_steps)
            timings[jit] = r["per_step_ms"]
        except Exception as e:  # noqa: BLE001 - XLA may not support an op
            if verbose:
                print(f"  [{label}] jit_compile={jit} failed: {type(e).__name__}: {e}",
                      flush=True)
            timings[jit] = float("inf")
    choice = timings[True] < timings[False]
    if verbose:
        print(f"  [{label}] jit probe: off {timings[False]:.1f} ms/step, "
              f"on {timings[True]:.1f} ms/step -> jit_compile={choice}", flush=True)
    return choice, timings


def _default_score(result) -> float:
    v = result["final_loss"] if isinstance(result, dict) else result
    v = float(v)
    return v if math.isfinite(v) else float("inf")


def lr_grid_search(run_fn, grid, score_fn=None, max_extensions=2, factor=3.0,
                   verbose=True, label="", display_scale=1.0):
    """Tries each learning rate in ``grid`` and picks the best.

    Args:
        run_fn: ``lr -> result``. A result is a ``run_optimizer`` dict or a
            plain number (the score itself).
        grid: learning rates to try.
        score_fn: ``result -> float`` (lower is better). The default is the
            final smoothed loss, with NaN/inf (divergence) scored as +inf.
        max_extensions: how many times the grid may grow when the winner is
            its smallest or largest value. Each extension adds one value,
            ``factor`` times beyond that edge.
        display_scale: scores are multiplied by this in progress lines only.

    Returns:
        dict with ``grid`` (sorted, including extensions), ``results``
        and ``scores`` (keyed by lr), ``winner``, ``extensions`` (the lrs
        added), and ``at_edge`` (True if the final winner is still at an
        edge of the grid it was searched on: the optimum may be further out).
    """
    score_fn = score_fn or _default_score
    grid = sorted({round_sig(float(g)) for g in grid})
    if not grid:
        raise ValueError("empty learning-rate grid")
    results, scores, extensions = {}, {}, []

    def evaluate(lr):
        if lr in results:
            return
        r = run_fn(lr)
        results[lr] = r
        scores[lr] = float(score_fn(r))
        if verbose:
            print(f"  [{label}] lr={fmt_lr(lr)}: final smoothed loss "
                  f"{scores[lr] * display_scale:.5g}", flush=True)

    for lr in grid:
        evaluate(lr)
    while True:
        winner = min(grid, key=lambda g: (scores[g], g))
        at_low, at_high = winner == grid[0], winner == grid[-1]
        at_edge = (at_low or at_high) and len(grid) > 1 or len(grid) == 1
        if not at_edge or len(extensions) >= max_extensions:
            break
        new = round_sig(grid[0] / factor) if at_low else round_sig(grid[-1] * factor)
        if verbose:
            print(f"  [{label}] winner {fmt_lr(winner)} is at the "
                  f"{'low' if at_low else 'high'} edge; extending to {fmt_lr(new)}",
                  flush=True)
        extensions.append(new)
        grid = sorted(grid + [new])
        evaluate(new)
    if verbose and at_edge:
        print(f"  [{label}] WARNING: best lr {fmt_lr(winner)} is still at the edge "
              f"of the grid {[fmt_lr(g) for g in grid]}", flush=True)
    return {"grid": grid, "results": results, "scores": scores, "winner": winner,
            "extensions": extensions, "at_edge": bool(at_edge)}


def benchmark_optimizers(specs, make_model, x, y, loss, *, steps, batch_size,
                         seed, grid=True, quick=False, grid_steps=None,
                         lr_overrides=None, jit="off", batch_sizes=None,
                         smooth_window=DEFAULT_SMOOTH_WINDOW,
                         warmup_steps=DEFAULT_WARMUP_STEPS, loss_scale=1.0,
                         loss_unit="", verbose=0, progress_every=None,
                         evaluate=None):
    """Grid-searches (optionally) and then trains every optimizer in ``specs``.

    ``evaluate`` (``model -> dict``, default None) is passed to
    ``run_optimizer`` for the final training run of each optimizer only (not
    for grid-search or jit-probe runs); its result is the run's
    ``evaluation``.

    Returns ``{"runs": {name: result}, "grids": {name: grid_search_dict}}``.
    Each run result also holds ``name``, ``display`` and ``lr``.
    """
    lr_overrides = dict(lr_overrides or {})
    if grid_steps is None:
        grid_steps = max(20, steps // 4)
    grid_steps = min(grid_steps, steps)
    if progress_every is None:
        progress_every = max(1, steps // 10)
    runs, grids = {}, {}
    for spec in specs:
        print(f"=== {spec.label} ===", flush=True)

        def do_run(lr, n_steps, jit_flag, prog, tag, _spec=spec, _evaluate=None):
            return run_optimizer(
                make_model, lambda: _spec.build(lr), x, y, loss, batch_size, n_steps,
                seed, jit_flag, callbacks=_spec.callbacks, verbose=verbose,
                batch_sizes=None if batch_sizes is None else batch_sizes[:n_steps],
                warmup_steps=warmup_steps, smooth_window=smooth_window,
                label=f"{_spec.name} lr={fmt_lr(lr)}{tag}", progress_every=prog,
                loss_scale=loss_scale, loss_unit=loss_unit, evaluate=_evaluate)

        if jit == "auto" and batch_sizes is None:
            probe_lr = lr_overrides.get(spec.name, spec.default_lr)
            jit_flag, _ = choose_jit_compile(
                lambda j, n: do_run(probe_lr, n, j, 0, " (jit probe)"),
                probe_steps=warmup_steps + 6, label=spec.name)
        else:
            jit_flag = jit == "on" and batch_sizes is None

        grid_vals = spec.quick_grid if quick else spec.grid
        if spec.name in lr_overrides:
            lr = lr_overrides[spec.name]
        elif grid and grid_vals:
            def grid_run(v, _jit=jit_flag, _name=spec.name):
                try:
                    return do_run(v, grid_steps, _jit, 0, " (grid)")
                except Exception:  # noqa: BLE001 - a failing lr scores +inf
                    print(f"  [{_name}] lr={fmt_lr(v)} raised; counted as diverged:",
                          flush=True)
                    traceback.print_exc()
                    return {"final_loss": float("nan")}

            g = lr_grid_search(
                grid_run, grid_vals,
                max_extensions=0 if quick else 2, label=spec.name,
                display_scale=loss_scale)
            grids[spec.name] = g
            lr = g["winner"]
        else:
            lr = spec.default_lr
        print(f"  [{spec.name}] training {steps} steps at lr={fmt_lr(lr)}, "
              f"jit_compile={jit_flag}", flush=True)
        try:
            r = do_run(lr, steps, jit_flag, progress_every, "", _evaluate=evaluate)
        except Exception:  # noqa: BLE001 - report, and go on with the others
            print(f"  [{spec.name}] training raised; leaving it out of the results:",
                  flush=True)
            traceback.print_exc()
            continue
        r.update(name=spec.name, display=spec.label, lr=lr)
        runs[spec.name] = r
    return {"runs": runs, "grids": grids}
