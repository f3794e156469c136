"""`run.py` with `nesterov.NesterovKFAC` for configurations that carry a `"nesterov"` entry.

A configuration `{"step_rule": "orthogonal", "nesterov": true, "momentum": 0.95}` builds
`NesterovKFAC` (nesterov.py); every other configuration is built by `run.py` as usual.
Arguments are `run.py`'s (RESULTS.md S8-nesterov, `s8_nesterov.sh`):

    python tools/step_efficiency/nesterov_run.py --task autoencoder --steps 200 --seed 0 \\
        --targets 150,120,100,90,80 --configs '{"default": {"step_rule": "orthogonal"},
        "nesterov": {"step_rule": "orthogonal", "nesterov": true}}'
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    import run
    from nesterov import NesterovKFAC

    return run.main_with_experiment_optimizer("nesterov", NesterovKFAC)


if __name__ == "__main__":
    sys.exit(main())
