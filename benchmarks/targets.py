"""Smoothed training losses and the steps and seconds each run needs to reach targets.

Mini-batch losses are noisy, so a target counts as reached at the first step
where the **trailing moving average of the last k per-batch losses**
(default k = 10; fewer at the very start) is at or below the target. The
harness does not evaluate the full-data loss.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DEFAULT_SMOOTH_WINDOW",
    "compute_ratios",
    "moving_average",
    "steps_and_seconds_to_target",
]

DEFAULT_SMOOTH_WINDOW = 10


def moving_average(values, window: int = DEFAULT_SMOOTH_WINDOW) -> np.ndarray:
    """Trailing moving average: entry i is the mean of values[max(0,i-k+1):i+1].

    A NaN or inf inside the window makes the average NaN/inf (a diverged run
    never counts as reaching a target).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    window = max(1, int(window))
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(0, idx - window)
    with np.errstate(invalid="ignore"):
        out = (c[idx] - c[lo]) / (idx - lo)
    # cumsum turns one NaN into NaN forever; recompute exactly around bad values
    bad = ~np.isfinite(v)
    if bad.any():
        out = np.array([np.mean(v[max(0, i - window + 1):i + 1]) for i in range(v.size)])
    return out


def steps_and_seconds_to_target(history, targets, loss_scale: float = 1.0,
                                window: int | None = None):
    """First step at which the smoothed loss reaches each target.

    Args:
        history: a dict with ``"loss"`` (per-batch losses) and ``"elapsed"``
            (charged run time in seconds after each step). ``"smoothed"`` is
            used if present, else a ``window``-step moving average of
            ``"loss"`` is computed. Accepts a ``run_optimizer`` result too.
        targets: iterable of target values, in the scaled units.
        loss_scale: the history's losses are multiplied by this first (e.g.
            784 to turn Keras' mean BCE into summed cross-entropy per image).

    Returns:
        ``{target: (steps, seconds)}``. Both are None if the target was never
        reached. ``steps`` counts steps from 1.
    """
    h = history.get("history", history)
    if "smoothed" in h and window is None:
        smoothed = np.asarray(h["smoothed"], dtype=np.float64)
    else:
        smoothed = moving_average(h["loss"], window or h.get("window", DEFAULT_SMOOTH_WINDOW))
    smoothed = smoothed * loss_scale
    elapsed = np.asarray(h["elapsed"], dtype=np.float64)
    out = {}
    for t in targets:
        with np.errstate(invalid="ignore"):
            hit = np.nonzero(smoothed <= t)[0]
        if hit.size:
            i = int(hit[0])
            out[t] = (i + 1, float(elapsed[i]))
        else:
            out[t] = (None, None)
    return out


def _ratio_text(num, den, lower_bound=False):
    if num is None or den is None or den == 0:
        return "n/a"
    txt = f"{num / den:.2f}x"
    return (">" + txt) if lower_bound else txt


def compute_ratios(runs, targets, kfac_key="kfac", loss_scale=1.0):
    """Rows ``(baseline, target, steps_ratio, seconds_ratio)`` where a ratio
    is baseline / K-FAC (>1 means K-FAC is faster). If the baseline never
    reached the target the ratio is a lower bound, computed from its whole
    run, and starts with '>'. 'n/a' if K-FAC didn't reach it."""
    if kfac_key not in runs:
        return []
    k = steps_and_seconds_to_target(runs[kfac_key], targets, loss_scale)
    rows = []
    for name, r in runs.items():
        if name.startswith("kfac"):  # K-FAC and its variants are not baselines
            continue
        b = steps_and_seconds_to_target(r, targets, loss_scale)
        for t in targets:
            ks, ksec = k[t]
            bs, bsec = b[t]
            if ks is None:
                rows.append((name, t, "n/a", "n/a"))
            elif bs is None:
                h = r["history"]
                tot_s = float(h["elapsed"][-1]) if h["steps_run"] else None
                rows.append((name, t, _ratio_text(h["steps_run"], ks, True),
                             _ratio_text(tot_s, ksec, True)))
            else:
                rows.append((name, t, _ratio_text(bs, ks), _ratio_text(bsec, ksec)))
    return rows
