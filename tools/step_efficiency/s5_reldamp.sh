#!/bin/bash
# S5-reldamp: the library default (orthogonal rule, LM damping) with absolute vs relative damping.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
PY=/work/main/.venv/bin/python
L=tools/step_efficiency/logs/s5_reldamp
CONFIGS='{"abs": {"step_rule": "library"},
 "rel1e-2": {"step_rule": "library", "damping_mode": "relative", "damping": 1e-2},
 "rel1e-1": {"step_rule": "library", "damping_mode": "relative", "damping": 1e-1},
 "rel1e-3": {"step_rule": "library", "damping_mode": "relative", "damping": 1e-3}}'
run() { task=$1; shift; uptime > $L/$task.txt
  nice -n 5 $PY tools/step_efficiency/run.py --task $task --configs "$CONFIGS" --out $L/$task.jsonl "$@" >> $L/$task.txt 2>&1; }
run autoencoder --steps 160
run autoencoder_sum --steps 160
run cnn --steps 170
run lm --steps 400 --targets 3.2447,2.9447,2.7447
