#!/bin/bash
# S5-reldamp, fourth part: lambda_rel = 1 on the LM, lambda_rel = 10 on the CNN.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
L=tools/step_efficiency/logs/s5_reldamp
PY=/work/main/.venv/bin/python
uptime >> $L/cnn.txt
nice -n 5 $PY tools/step_efficiency/run.py --task cnn --steps 170 \
  --configs '{"rel10": {"step_rule": "library", "damping_mode": "relative", "damping": 10.0}}' \
  --out $L/cnn.jsonl >> $L/cnn.txt 2>&1
uptime >> $L/lm.txt
nice -n 5 $PY tools/step_efficiency/run.py --task lm --steps 400 --targets 3.2447,2.9447,2.7447 \
  --configs '{"rel1": {"step_rule": "library", "damping_mode": "relative", "damping": 1.0}}' \
  --out $L/lm.jsonl >> $L/lm.txt 2>&1
