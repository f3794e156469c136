"""`python -m benchmarks.step_cost` with the orthogonal rule's Newton-Schulz variant from the
environment (`NS_VARIANT`, as in ns_run.py). Arguments are `benchmarks.step_cost`'s.

    NS_VARIANT='{"normalization": "gram", "coefficients": "tuned"}' \\
        python tools/step_efficiency/ns_step_cost.py --models autoencoder \\
        --kfac-options '{"orthogonal_iterations": 2}'
"""

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    from kfac_keras import step_rules
    from benchmarks import step_cost

    variant = json.loads(os.environ.get("NS_VARIANT", "{}"))
    unknown = set(variant) - {"normalization", "coefficients"}
    if unknown:
        raise SystemExit(f"NS_VARIANT keys must be normalization/coefficients; got {sorted(unknown)}")
    if variant:
        step_rules.orthogonal_direction = functools.partial(step_rules.orthogonal_direction,
                                                            **variant)
    print(f"NS_VARIANT {variant}; load {os.getloadavg()}", flush=True)
    step_cost.main()


if __name__ == "__main__":
    main()
