"""`tools/step_efficiency/run.py` with `s7_shrink.ShrinkKFAC` for configurations carrying `"shrink"`.

A configuration `{"shrink": {"power": p}, ...KFAC options}` builds `ShrinkKFAC` (s7_shrink.py,
seed 0 unless given, as run.py does); every other configuration is built by run.py as usual
(`{}`: `kfac_keras.KFAC()`'s defaults). Arguments are run.py's:

    python tools/keras_programs/shrink_run.py --task autoencoder --steps 60 --seed 0 \\
        --configs '{"default": {}, "shrink_p1": {"shrink": {"power": 1}}}'
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "step_efficiency"))
sys.path.insert(1, HERE)
sys.path.insert(2, os.path.dirname(os.path.dirname(HERE)))


def main():
    import run
    from s7_shrink import ShrinkKFAC

    return run.main_with_experiment_optimizer("shrink", ShrinkKFAC)


if __name__ == "__main__":
    sys.exit(main())
