#!/bin/bash
# S7-classgap / S7-shrink: what a classifier candidate costs on the step-efficiency autoencoder
# and LM ($RUNNER, default tools/step_efficiency/run.py; seed 0), against the library default in
# the same process; logs in $LOGS (default tools/keras_programs/logs/s7_classgap).
# Usage: s7_cost.sh 'NAME-TO-KWARGS-JSON'   e.g. s7_cost.sh '{"wd0.01": {"weight_decay": 0.01}}'
# ("default": {} is added first).
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
PY=${PY:-$PWD/.venv/bin/python}
RUNNER=${RUNNER:-tools/step_efficiency/run.py}
L=${LOGS:-tools/keras_programs/logs/s7_classgap}
CONFIGS="{\"default\": {}, ${1#\{}"
run() { task=$1; shift; uptime > $L/cost_$task.txt
  nice -n 5 $PY $RUNNER --task $task --seed 0 --configs "$CONFIGS" \
      --out $L/cost_$task.jsonl "$@" >> $L/cost_$task.txt 2>&1; uptime >> $L/cost_$task.txt; }
run autoencoder --steps 60
run lm --steps 400 --targets 3.2447,2.9447,2.7447
