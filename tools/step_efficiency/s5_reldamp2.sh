#!/bin/bash
# S5-reldamp, second part (time-limited): the x1000 autoencoder and the CNN.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
PY=/work/main/.venv/bin/python
L=tools/step_efficiency/logs/s5_reldamp
run() { task=$1; configs=$2; shift 2; uptime >> $L/$task.txt
  nice -n 5 $PY tools/step_efficiency/run.py --task $task --configs "$configs" --out $L/$task.jsonl "$@" >> $L/$task.txt 2>&1; }
run autoencoder_sum '{"abs": {"step_rule": "library"},
 "rel1e-1": {"step_rule": "library", "damping_mode": "relative", "damping": 1e-1}}' --steps 160
run cnn '{"abs": {"step_rule": "library"},
 "rel1e-1": {"step_rule": "library", "damping_mode": "relative", "damping": 1e-1},
 "rel1": {"step_rule": "library", "damping_mode": "relative", "damping": 1.0}}' --steps 170
run autoencoder '{"rel1": {"step_rule": "library", "damping_mode": "relative", "damping": 1.0}}' --steps 160
