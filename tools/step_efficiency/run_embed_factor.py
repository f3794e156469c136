"""`run.py` with the library's `EMBEDDING_LEARNING_RATE_FACTOR` set to `$EMBED_FACTOR` (S6-classifier).

    EMBED_FACTOR=10 python tools/step_efficiency/run_embed_factor.py --task lm --steps 400 ...

The factor is a module constant read when the step is traced, so setting it before `run.py`
builds anything changes every K-FAC run of the process (the library file is not edited).
"""
import os
import runpy
import sys

from kfac_keras import orthogonal_step

orthogonal_step.EMBEDDING_LEARNING_RATE_FACTOR = float(os.environ["EMBED_FACTOR"])
print(f"EMBEDDING_LEARNING_RATE_FACTOR = {orthogonal_step.EMBEDDING_LEARNING_RATE_FACTOR}",
      flush=True)
sys.argv[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
