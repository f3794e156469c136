"""Per-iteration quintic Newton-Schulz coefficients for a small number of iterations.

Each iteration maps a singular value `x` of the iterate to `p_i(x) = x (a_i + b_i x^2 + c_i x^4)`;
`k` iterations map the singular values of `X_0` by the composition `g = p_k o ... o p_1`. Muon's
fixed `(3.4445, -4.7750, 2.0315)` sends every `x >= x_min(k)` into the band `[0.68, 1.21]` (its
`p` oscillates inside it rather than converging to 1). This script finds, for `k` iterations,
coefficients that send the widest interval `[l, 1]` into the same band and keep `g <= 1.21` and
`g >= 0` on `[0, 1.05]` (inputs a little above 1 from rounding), by bisection on `l` around a
minimax fit (Nelder-Mead on the worst-case band violation over a log-spaced grid). Prints Muon's
`x_min(k)` and the fitted `l`, the coefficients and the composed map at a few points.

    python tools/step_efficiency/ns_coefficients.py --iterations 2
"""

import argparse

import numpy as np
from scipy.optimize import minimize

MUON = (3.4445, -4.7750, 2.0315)
BAND = (0.68, 1.21)


def compose(coefficients, x):
    """`g(x)` for a flat list `[a_1, b_1, c_1, a_2, ...]` of per-iteration coefficients."""
    y = np.array(x, dtype=np.float64)
    for i in range(0, len(coefficients), 3):
        a, b, c = coefficients[i:i + 3]
        y = y * (a + b * y * y + c * y ** 4)
    return y


def violation(coefficients, lower):
    """Worst band violation of `g` on `[lower, 1.05]`, and of `0 <= g <= BAND[1]` below `lower`."""
    inside = np.concatenate([np.logspace(np.log10(lower), 0, 600), np.linspace(1.0, 1.05, 20)])
    below = np.logspace(-6, np.log10(lower), 200)
    g_in, g_below = compose(coefficients, inside), compose(coefficients, below)
    return max(np.max(BAND[0] - g_in), np.max(g_in - BAND[1]),
               np.max(g_below - BAND[1]), np.max(-g_below), 0.0)


def fit(lower, start):
    """Coefficients minimising `violation(., lower)` from `start` (Nelder-Mead, two restarts)."""
    best = np.array(start, dtype=np.float64)
    for _ in range(3):
        result = minimize(violation, best, args=(lower,), method="Nelder-Mead",
                          options={"maxiter": 20000, "xatol": 1e-7, "fatol": 1e-10})
        best = result.x
    return best, violation(best, lower)


def muon_threshold(iterations):
    x = np.logspace(-6, 0, 60001)
    g = compose(list(MUON) * iterations, x)
    return x[np.argmax(g >= BAND[0])]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2)
    args = parser.parse_args(argv)
    k = args.iterations
    for j in range(1, 5):
        print(f"Muon, {j} iterations: g >= {BAND[0]} from x = {muon_threshold(j):.4e}, slope at 0 "
              f"{MUON[0] ** j:.2f}")
    # Start from steep early iterations (large a) and Muon's last one.
    start = [8.0, -22.0, 15.0] * (k - 1) + list(MUON)
    low, high = muon_threshold(k + 2), muon_threshold(k)  # the answer lies between
    best = None
    for _ in range(18):
        mid = np.sqrt(low * high)
        coefficients, worst = fit(mid, start if best is None else best)
        if worst <= 1e-9:
            high, best = mid, coefficients
        else:
            low = mid
    if best is None:
        raise SystemExit("no fit found")
    print(f"\n{k} tuned iterations: g in {BAND} on [{high:.4e}, 1.05]; slope at 0 "
          f"{np.prod(best[0::3]):.2f}")
    for i in range(k):
        a, b, c = best[3 * i:3 * i + 3]
        print(f"  iteration {i + 1}: ({a:.6f}, {b:.6f}, {c:.6f})")
    x = np.array([1e-4, 1e-3, high, 0.01, 0.03, 0.1, 0.3, 0.6, 1.0, 1.05])
    print("  x:      " + " ".join(f"{v:9.3e}" for v in x))
    print("  g(x):   " + " ".join(f"{v:9.3e}" for v in compose(best, x)))
    print(f"  Muon {k}: " + " ".join(f"{v:9.3e}" for v in compose(list(MUON) * k, x)))
    print(f"  Muon 3: " + " ".join(f"{v:9.3e}" for v in compose(list(MUON) * 3, x)))


if __name__ == "__main__":
    main()
