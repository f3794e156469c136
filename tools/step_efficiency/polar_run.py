"""`run.py` with `cheap_polar.CheapPolarKFAC` for configurations that carry a `"polar"` entry.

A configuration `{"polar": {"kind": "cached", "refresh_every": 10}, ...KFAC options}` builds
`CheapPolarKFAC` (cheap_polar.py); every other configuration is built by `run.py` as usual (`{}`
is `kfac_keras.KFAC()`'s defaults through `step_rule="library"`). Arguments are `run.py`'s, so
steps to target, `--ratio` (step time alternated with Adam in the same process) and `--out`
work unchanged:

    python tools/step_efficiency/polar_run.py --task autoencoder --steps 800 \\
        --targets 150,120,100,90,80 --configs '{"default": {"step_rule": "orthogonal"},
        "cached10": {"step_rule": "orthogonal", "polar": {"kind": "cached", "refresh_every": 10}}}' \\
        --ratio default,cached10
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    import run
    from cheap_polar import CheapPolarKFAC

    return run.main_with_experiment_optimizer("polar", CheapPolarKFAC)


if __name__ == "__main__":
    sys.exit(main())
