#!/bin/bash
# S7-shrink: what a ShrinkKFAC candidate costs on the step-efficiency autoencoder and LM
# (run.py through shrink_run.py, seed 0), against the library default in the same process,
# as s7_cost.sh does. Usage: s7_shrink_cost.sh 'NAME-TO-KWARGS-JSON'
#   e.g. s7_shrink_cost.sh '{"shrink_p1": {"shrink": {"power": 1}}}'   ("default": {} is added first)
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
PY=/work/main/.venv/bin/python
L=tools/keras_programs/logs/s7_shrink
CONFIGS="{\"default\": {}, ${1#\{}"
run() { task=$1; shift; uptime > $L/cost_$task.txt
  nice -n 5 $PY tools/keras_programs/shrink_run.py --task $task --seed 0 --configs "$CONFIGS" \
      --out $L/cost_$task.jsonl "$@" >> $L/cost_$task.txt 2>&1; uptime >> $L/cost_$task.txt; }
run autoencoder --steps 60
run lm --steps 400 --targets 3.2447,2.9447,2.7447
