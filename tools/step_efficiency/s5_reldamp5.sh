#!/bin/bash
# S5-reldamp, fifth part: the LM at the absolute default and lambda_rel = 0.1; the x1000
# autoencoder at lambda_rel = 1.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
L=tools/step_efficiency/logs/s5_reldamp
PY=/work/main/.venv/bin/python
uptime >> $L/lm.txt
nice -n 5 $PY tools/step_efficiency/run.py --task lm --steps 400 --targets 3.2447,2.9447,2.7447 \
  --configs '{"abs": {"step_rule": "library"},
  "rel1e-1": {"step_rule": "library", "damping_mode": "relative", "damping": 0.1}}' \
  --out $L/lm.jsonl >> $L/lm.txt 2>&1
uptime >> $L/autoencoder_sum.txt
nice -n 5 $PY tools/step_efficiency/run.py --task autoencoder_sum --steps 160 \
  --configs '{"rel1": {"step_rule": "library", "damping_mode": "relative", "damping": 1.0}}' \
  --out $L/autoencoder_sum.jsonl >> $L/autoencoder_sum.txt 2>&1
