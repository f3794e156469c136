"""Tables, CSV, plots and fitted exponents of the scaling benchmark (``benchmarks.scaling``)."""

from __future__ import annotations

import csv
import math
import os

import numpy as np

from benchmarks.plotting import write_log_log_plot

__all__ = [
    "DECOMPOSITION_COLUMNS",
    "STEP_COLUMNS",
    "decomposition_table",
    "exponent_rows",
    "exponent_table",
    "fit_power_law",
    "memory_table",
    "mib",
    "step_table",
    "write_csv",
    "write_plots",
]

STEP_COLUMNS = ("adam_step_ms", "kfac_plain_step_ms", "kfac_statistics_step_ms",
                "kfac_decomposition_call_ms", "kfac_step_amortised_ms")
DECOMPOSITION_COLUMNS = ("cholesky_inverse_ms", "eigh_ms")


def fit_power_law(sizes, times):
    """Least-squares fit of ``time = c * size**p`` on a log-log scale.

    Args:
        sizes: sequence of positive numbers.
        times: sequence of positive numbers, same length (at least 2).

    Returns:
        ``(p, c)``, the exponent and the prefactor.

    Raises:
        ValueError: fewer than two points, different lengths, or a value
            that is not positive and finite.
    """
    x = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(times, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"`sizes` and `times` must be 1-D of equal length; "
                         f"received shapes {x.shape} and {y.shape}.")
    if x.size < 2:
        raise ValueError(f"need at least 2 points to fit an exponent; received {x.size}.")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))
            and np.all(x > 0) and np.all(y > 0)):
        raise ValueError(f"sizes and times must be positive and finite; received "
                         f"sizes={x.tolist()}, times={y.tolist()}.")
    if np.unique(x).size < 2:
        raise ValueError(f"need at least 2 distinct sizes; received {x.tolist()}.")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(np.exp(intercept))


def mib(value):
    return value / (1024.0 * 1024.0)


def exponent_rows(width_rows, batch_rows, decomposition_rows):
    """Fitted exponents: ``[(quantity, versus, exponent_all, exponent_top3, points)]``."""
    rows = []

    def add(label, versus, xs, ys):
        points = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0
                  and math.isfinite(y)]
        if len(points) < 2:
            return
        xs_, ys_ = zip(*points)
        p_all, _ = fit_power_law(xs_, ys_)
        p_top = fit_power_law(xs_[-3:], ys_[-3:])[0] if len(points) > 3 else p_all
        rows.append((label, versus, p_all, p_top, len(points)))

    for column in STEP_COLUMNS:
        add(column, "width", [r["width"] for r in width_rows],
            [r[column] for r in width_rows])
    for column in DECOMPOSITION_COLUMNS:
        add(column, "n", [r["n"] for r in decomposition_rows],
            [r[column] for r in decomposition_rows])
    add("kfac_state_bytes", "width", [r["width"] for r in width_rows],
        [r["kfac_state_bytes"] for r in width_rows])
    for column in STEP_COLUMNS:
        if column == "kfac_decomposition_call_ms":
            continue  # does not depend on the batch size
        add(column, "batch", [r["batch"] for r in batch_rows],
            [r[column] for r in batch_rows])
    return rows


def step_table(rows, key):
    head = [key, "params", "Adam step", "K-FAC plain step", "K-FAC statistics step",
            "K-FAC decomposition call", "K-FAC step (amortised)", "K-FAC / Adam",
            "repeats / periods"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[key]), f"{r['params']:,}"]
        cells += [f"{r[c]:.1f}" for c in STEP_COLUMNS]
        cells += [f"{r['ratio_kfac_to_adam']:.2f}", f"{r['repeats']} / {r['cycles']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(rows):
    head = ["width", "Adam state MiB", "K-FAC state MiB", "K-FAC momentum MiB",
            "K-FAC factors MiB", "K-FAC inverses MiB", "K-FAC other bytes",
            "K-FAC / Adam", "process peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["width"]), f"{mib(r['adam_state_bytes']):.2f}",
                 f"{mib(r['kfac_state_bytes']):.2f}", f"{mib(r['kfac_momentum_bytes']):.2f}",
                 f"{mib(r['kfac_factors_bytes']):.2f}",
                 f"{mib(r['kfac_decompositions_bytes']):.2f}",
                 str(r["kfac_other_bytes"]),
                 f"{r['kfac_state_bytes'] / r['adam_state_bytes']:.2f}",
                 f"{r['peak_rss_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decomposition_table(rows):
    head = ["n", "Cholesky damped inverse ms", "eigh ms", "repeats (Cholesky / eigh)", "XLA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['n']} | {r['cholesky_inverse_ms']:.2f} | {r['eigh_ms']:.2f} | "
                     f"{r['cholesky_inverse_repeats']} / {r['eigh_repeats']} | "
                     f"{'on' if r['jit'] else 'off'} |")
    return "\n".join(lines)


def exponent_table(rows):
    lines = ["| quantity | versus | exponent (all points) | exponent (3 largest) | points |",
             "|---|---|---|---|---|"]
    for label, versus, p_all, p_top, count in rows:
        lines.append(f"| {label} | {versus} | {p_all:.2f} | {p_top:.2f} | {count} |")
    return "\n".join(lines)


def write_csv(path, width_rows, batch_rows, decomposition_rows):
    fields = ["sweep", "width", "batch", "n", "params", *STEP_COLUMNS, "ratio_kfac_to_adam",
              "cholesky_inverse_ms", "eigh_ms", "adam_state_bytes", "kfac_state_bytes",
              "kfac_momentum_bytes", "kfac_factors_bytes", "kfac_decompositions_bytes",
              "kfac_other_bytes", "peak_rss_mib", "repeats", "cycles",
              "cholesky_inverse_repeats", "eigh_repeats"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for sweep, rows in (("width", width_rows), ("batch", batch_rows),
                            ("decomposition", decomposition_rows)):
            for r in rows:
                writer.writerow({"sweep": sweep, **{k: _csv_value(v) for k, v in r.items()}})


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_plots(out_dir, width_rows, batch_rows, decomposition_rows):
    """Writes the log-log plots; returns their paths."""
    labels = {"adam_step_ms": "Adam step", "kfac_plain_step_ms": "K-FAC plain step",
              "kfac_statistics_step_ms": "K-FAC statistics step",
              "kfac_decomposition_call_ms": "K-FAC decomposition call (all factors)",
              "kfac_step_amortised_ms": "K-FAC step, amortised (default)",
              "cholesky_inverse_ms": "n x n Cholesky damped inverse",
              "eigh_ms": "n x n eigh"}
    widths = [r["width"] for r in width_rows]
    series = [(labels[c], widths, [r[c] for r in width_rows], "o-") for c in STEP_COLUMNS]
    ns = [r["n"] for r in decomposition_rows]
    series += [(labels[c], ns, [r[c] for r in decomposition_rows], "s--")
               for c in DECOMPOSITION_COLUMNS]
    batch = width_rows[0]["batch"] if width_rows else ""
    batches = [r["batch"] for r in batch_rows]
    width = batch_rows[0]["width"] if batch_rows else ""
    milliseconds = "milliseconds (log scale)"
    return [
        write_log_log_plot(
            os.path.join(out_dir, "time_vs_width.png"), series,
            xlabel="layer width n (log scale)", ylabel=milliseconds,
            title=f"Step and decomposition time vs width (batch {batch})"),
        write_log_log_plot(
            os.path.join(out_dir, "time_vs_batch.png"),
            [(labels[c], batches, [r[c] for r in batch_rows], "o-") for c in STEP_COLUMNS],
            xlabel="batch size (log scale)", ylabel=milliseconds,
            title=f"Step time vs batch size (width {width})"),
        write_log_log_plot(
            os.path.join(out_dir, "memory_vs_width.png"),
            [("Adam state", widths, [mib(r["adam_state_bytes"]) for r in width_rows], "o-"),
             ("K-FAC state (total)", widths,
              [mib(r["kfac_state_bytes"]) for r in width_rows], "o-"),
             ("K-FAC factors", widths,
              [mib(r["kfac_factors_bytes"]) for r in width_rows], "^--"),
             ("K-FAC inverses", widths,
              [mib(r["kfac_decompositions_bytes"]) for r in width_rows], "v--")],
            xlabel="layer width n (log scale)", ylabel="MiB (log scale)",
            title="Optimizer state vs width"),
    ]
