"""Result tables of an optimizer race: Markdown, CSV and the per-step histories as JSON."""

from __future__ import annotations

import csv
import json
import math
import os
import time

from benchmarks.targets import compute_ratios, steps_and_seconds_to_target

__all__ = [
    "evaluation_column",
    "finish_race",
    "fmt_lr",
    "save_histories",
    "write_grid_table",
    "write_results",
]


def fmt_lr(lr) -> str:
    return "default" if lr is None else f"{lr:.3g}"


def round_sig(v: float, sig: int = 3) -> float:
    return float(f"{v:.{sig}g}")


def _fmt_target(t) -> str:
    return f"{t:g}"


def write_results(runs, targets, out_dir, *, title="Benchmark", loss_scale=1.0,
                  loss_name="loss", raw_loss_name=None, kfac_key="kfac",
                  notes=(), grids=None, basename="results", extra_columns=()):
    """Writes ``<basename>.md`` and ``<basename>.csv`` (+ ``ratios.csv`` if
    K-FAC ran) to ``out_dir``. Returns the Markdown text.

    ``targets`` are in scaled units (``loss * loss_scale``).
    ``raw_loss_name`` names the unscaled loss column (e.g. Keras' mean BCE).
    ``extra_columns`` (default none): ``(name, fn)`` pairs; ``fn(run)``
    gives the value of column ``name`` (None: empty), which is added to both
    tables after the final-loss columns (e.g. held-out accuracy).
    """
    os.makedirs(out_dir, exist_ok=True)
    targets = list(targets)
    rows = []
    for name, r in runs.items():
        h = r["history"]
        tt = steps_and_seconds_to_target(r, targets, loss_scale)
        final = r["final_loss"]
        row = {
            "optimizer": name,
            "display": r.get("display", name),
            "lr": fmt_lr(r.get("lr")),
            "jit_compile": r["jit_compile"],
            "batch_size": r.get("batch_size") or "schedule",
            "steps_run": h["steps_run"],
            "per_step_ms": round(r["per_step_ms"], 2),
            "mean_step_ms": round(float(h.get("mean_step_ms", r["per_step_ms"])), 2),
            "compile_s": round(r["compile_seconds"], 2),
            "run_s": round(float(h["elapsed"][-1]), 2) if h["steps_run"] else "",
            f"final_{loss_name}": (round_sig(final * loss_scale, 5)
                                   if math.isfinite(final) else "nan"),
        }
        if raw_loss_name:
            row[f"final_{raw_loss_name}"] = round_sig(final, 5) if math.isfinite(final) else "nan"
        for column, value_fn in extra_columns:
            value = value_fn(r)
            row[column] = "" if value is None else value
        for t in targets:
            s, sec = tt[t]
            row[f"steps_to_{_fmt_target(t)}"] = "" if s is None else s
            row[f"seconds_to_{_fmt_target(t)}"] = "" if sec is None else round(sec, 2)
        rows.append(row)

    csv_path = os.path.join(out_dir, f"{basename}.csv")
    with open(csv_path, "w", newline="") as f:
        if rows:
            wr = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            wr.writeheader()
            wr.writerows(rows)

    ratio_rows = compute_ratios(runs, targets, kfac_key, loss_scale)
    if ratio_rows:
        with open(os.path.join(out_dir, "ratios.csv"), "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["baseline", "target", "steps_ratio_baseline_over_kfac",
                         "seconds_ratio_baseline_over_kfac"])
            wr.writerows(ratio_rows)

    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    hdr = ["optimizer", "lr", "jit", "ms/step (median)", "ms/step (mean)", "compile s",
           f"final {loss_name}"]
    if raw_loss_name:
        hdr.append(f"final {raw_loss_name}")
    hdr += [column for column, _ in extra_columns]
    hdr += [f"{loss_name} ≤ {_fmt_target(t)}: steps / s" for t in targets]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    for row in rows:
        cells = [row["display"], row["lr"], "on" if row["jit_compile"] else "off",
                 f"{row['per_step_ms']:.1f}", f"{row['mean_step_ms']:.1f}",
                 f"{row['compile_s']:.1f}",
                 str(row[f"final_{loss_name}"])]
        if raw_loss_name:
            cells.append(str(row[f"final_{raw_loss_name}"]))
        cells += [str(row[column]) for column, _ in extra_columns]
        for t in targets:
            s = row[f"steps_to_{_fmt_target(t)}"]
            sec = row[f"seconds_to_{_fmt_target(t)}"]
            cells.append("not reached" if s == "" else f"{s} / {sec:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    if ratio_rows:
        lines += ["", "## K-FAC speed-up (baseline / K-FAC; >1 means K-FAC is faster)", "",
                  "| baseline | target | steps ratio | seconds ratio |", "|---|---|---|---|"]
        for b, t, sr, tr in ratio_rows:
            lines.append(f"| {runs[b].get('display', b)} | {_fmt_target(t)} | {sr} | {tr} |")
        lines += ["", "'>' marks a lower bound: the baseline did not reach the target "
                  "within its run; 'n/a': K-FAC did not reach it."]
    if grids:
        lines += ["", write_grid_table(grids, loss_scale, loss_name)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"{basename}.md"), "w") as f:
        f.write(text)
    return text


def write_grid_table(grids, loss_scale=1.0, loss_name="loss") -> str:
    """Markdown section listing every grid-search run's final smoothed loss."""
    lines = ["## Learning-rate search (final smoothed loss of the short runs)", ""]
    for name, g in grids.items():
        cells = []
        for lr in g["grid"]:
            s = g["scores"][lr]
            val = "diverged" if not math.isfinite(s) else f"{s * loss_scale:.4g}"
            mark = " **(best)**" if lr == g["winner"] else ""
            cells.append(f"{fmt_lr(lr)}: {val}{mark}")
        edge = " — WARNING: best lr is at the edge of the grid" if g["at_edge"] else ""
        ext = f" (extended by {[fmt_lr(e) for e in g['extensions']]})" if g["extensions"] else ""
        lines.append(f"- {name}{ext}: " + ", ".join(cells) + edge)
    return "\n".join(lines)


def save_histories(runs, out_dir, loss_scale=1.0, filename="histories.json"):
    """Dumps per-step loss and time of every run as JSON (for re-plotting)."""
    os.makedirs(out_dir, exist_ok=True)
    data = {}
    for name, r in runs.items():
        h = r["history"]
        data[name] = {
            "lr": r.get("lr"), "jit_compile": r["jit_compile"],
            "per_step_ms": r["per_step_ms"], "mean_step_ms": r.get("mean_step_ms"),
            "compile_seconds": r["compile_seconds"],
            "loss_scale": loss_scale,
            "loss": [float(v) for v in h["loss"]],
            "elapsed": [float(v) for v in h["elapsed"]],
            "step_seconds": [float(v) for v in h["step_seconds"]],
        }
    path = os.path.join(out_dir, filename)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def print_summary(text, out_dir, plots, start_time):
    """Prints the results table, the files written to `out_dir` and the run's
    wall time since `start_time` (a `time.perf_counter()` value)."""
    print()
    print(text)
    print(f"wrote {os.path.join(out_dir, 'results.md')}, results.csv, "
          f"{', '.join(os.path.basename(p) for p in plots)}, histories.json")
    print(f"total wall time {time.perf_counter() - start_time:.1f} s", flush=True)


def evaluation_column(key, digits=4):
    """A ``write_results`` extra column: ``run["evaluation"][key]`` rounded
    to ``digits`` (empty when the run has no such evaluation)."""
    def column(run):
        value = (run.get("evaluation") or {}).get(key)
        return None if value is None else round(value, digits)
    return column


def finish_race(runs, grids, targets, out_dir, start_time, *, title, loss_name, loss_label,
                notes, plot_title=None, loss_scale=1.0, raw_loss_name=None, extra_columns=()):
    """The end of an optimizer-race command: the result tables
    (`write_results`), the loss plots, the histories and the printed summary,
    all in ``out_dir``.

    Args:
        runs: dict ``{name: run}`` from `harness.benchmark_optimizers`.
        grids: its learning-rate grid results.
        targets: loss targets in scaled units (``loss * loss_scale``).
        out_dir: folder, created if missing.
        start_time: ``time.perf_counter()`` at the start of the command.
        title: str, the tables' title.
        loss_name: str, the scaled loss's column name.
        loss_label: str, the plots' y-axis label.
        notes: list of str, the tables' notes.
        plot_title: str, the plots' title. Defaults to None (``title``).
        loss_scale: float, factor from Keras's loss to the reported unit.
            Defaults to 1.
        raw_loss_name: str or None, the unscaled loss column. Defaults to None.
        extra_columns: ``(name, fn)`` pairs of `write_results`. Defaults to ().
    """
    os.makedirs(out_dir, exist_ok=True)
    text = write_results(runs, targets, out_dir, title=title, loss_scale=loss_scale,
                         loss_name=loss_name, raw_loss_name=raw_loss_name, notes=notes,
                         grids=grids, extra_columns=extra_columns)
    # Imported here: plotting imports this module (fmt_lr).
    from benchmarks import plotting
    plots = plotting.write_loss_plots(runs, out_dir, loss_scale=loss_scale, loss_label=loss_label,
                                      targets=targets, title=plot_title or title)
    save_histories(runs, out_dir, loss_scale=loss_scale)
    print_summary(text, out_dir, plots, start_time)
