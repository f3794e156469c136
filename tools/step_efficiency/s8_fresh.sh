#!/bin/bash
# S8-fresh: how much fresher curvature can give the orthogonal default at the start (lead 4's upper
# bound): statistics and inverses every step, and for the first 20 steps only (a warm-up, via a
# piecewise schedule is not available, so 20-step runs), against KFAC(). Steps only, no timing.
set -e
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
PY=${PY:-/work/main/.venv/bin/python}
LOGS=tools/step_efficiency/logs/s8_cp
C='{"default": {"step_rule": "orthogonal"},
    "every_step": {"step_rule": "orthogonal", "cov_update_every": 1, "inv_update_every": 1},
    "every_step_decay0.8": {"step_rule": "orthogonal", "cov_update_every": 1, "inv_update_every": 1, "factor_decay": 0.8}}'
ARGS="--task autoencoder --steps 60 --seed 0 --targets 150,120,100"
{
  echo "command: run.py $ARGS"
  echo "configs: $C"
  echo "load before: $(cat /proc/loadavg)"
  nice -n 5 "$PY" tools/step_efficiency/run.py $ARGS --configs "$C" --out "$LOGS/ae_fresh60.jsonl"
  echo "load after: $(cat /proc/loadavg)"
} > "$LOGS/ae_fresh60.txt" 2>&1
