#!/bin/bash
# S6-bilstm: the orthogonal rule's Newton bound (orthogonal_step_bound) on the step-efficiency tasks.
# Usage: s6_bilstm.sh LANE   (LANE a: autoencoder + CNN, LANE b: LM)
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
PY=/work/main/.venv/bin/python
L=tools/step_efficiency/logs/s6_bilstm
CONFIGS='{"bound1": {}, "bound_off": {"orthogonal_step_bound": null},
 "bound0.1": {"orthogonal_step_bound": 0.1}}'
run() { task=$1; shift; uptime > $L/$task.txt
  $PY tools/step_efficiency/run.py --task $task --configs "$CONFIGS" --out $L/$task.jsonl "$@" >> $L/$task.txt 2>&1; }
case $1 in
  a) run autoencoder --steps 60; run cnn --steps 85 ;;
  b) run lm --steps 400 --targets 3.2447,2.9447,2.7447 ;;
esac
