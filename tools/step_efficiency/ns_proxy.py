"""How close each Newton-Schulz variant's direction is to the default's, on recorded spectra.

The iterations keep the singular vectors of `P` and map each singular value, so two variants'
directions differ by `||g_1(s) - g_2(s)|| / ||g_2(s)||` over the singular values `s` (exact, no
matrix needed). Reads the spectra of `ns_spectrum.py --out` and prints, per recorded step, the
median over the matrices of that relative distance to the default (`frobenius`/`muon`, 3
iterations) and to the exact polar factor (every nonzero `s` -> 1).

    python tools/step_efficiency/ns_proxy.py tools/step_efficiency/logs/cost_spectra.npz
"""

import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 3)[0])

from kfac_keras.step_rules import newton_schulz_schedule  # noqa: E402

VARIANTS = [("frobenius", "muon", 3), ("frobenius", "muon", 2), ("gram", "muon", 2),
            ("gram", "tuned", 2), ("gram", "muon", 3), ("gram", "tuned", 1),
            ("frobenius", "muon", 1)]


def mapped(values, normalization, coefficients, iterations):
    x = values / np.sqrt(np.sum(values ** 2))
    if normalization == "gram":
        x = x / np.sqrt(np.sqrt(np.sum(x ** 4)))
    for a, b, c in newton_schulz_schedule(iterations, coefficients):
        x = x * (a + b * x * x + c * x ** 4)
    return x


def main():
    spectra = np.load(sys.argv[1])
    by_step = {}
    for key in spectra.files:
        by_step.setdefault(int(key.split("_")[0][1:]), []).append(spectra[key])
    header = " | ".join(f"step {k}: vs default / vs polar" for k in sorted(by_step))
    print(f"| variant | {header} |")
    print("|---|" + "---|" * len(by_step))
    for variant in VARIANTS:
        cells = []
        for k in sorted(by_step):
            to_default, to_polar = [], []
            for values in by_step[k]:
                got, ref = mapped(values, *variant), mapped(values, *VARIANTS[0])
                polar = (values > 1e-12 * values[0]).astype(np.float64)
                to_default.append(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                to_polar.append(np.linalg.norm(got - polar) / np.linalg.norm(polar))
            cells.append(f"{np.median(to_default):.3f} / {np.median(to_polar):.3f}")
        print(f"| {variant[0]}, {variant[1]}, k={variant[2]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
