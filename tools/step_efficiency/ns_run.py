"""`run.py` with the orthogonal rule's Newton-Schulz variant set from the environment.

`NS_VARIANT='{"normalization": "gram", "coefficients": "tuned"}'` (keys of
`kfac_keras.step_rules.orthogonal_direction`) applies to every orthogonalised
matrix of every K-FAC configuration of the run; the iteration count and the
product dtype stay `KFAC` options (`orthogonal_iterations`, `orthogonal_dtype`).
Without `NS_VARIANT` this is `run.py`. Arguments are `run.py`'s.

    NS_VARIANT='{"normalization": "gram", "coefficients": "tuned"}' \\
        python tools/step_efficiency/ns_run.py --task autoencoder --steps 160 --configs ...
"""

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    from kfac_keras import step_rules
    import run

    variant = json.loads(os.environ.get("NS_VARIANT", "{}"))
    unknown = set(variant) - {"normalization", "coefficients"}
    if unknown:
        raise SystemExit("NS_VARIANT keys must be normalization/coefficients; "
                         f"got {sorted(unknown)}")
    if variant:
        step_rules.orthogonal_direction = functools.partial(step_rules.orthogonal_direction,
                                                            **variant)
    print(f"NS_VARIANT {variant}", flush=True)
    run.main()


if __name__ == "__main__":
    main()
