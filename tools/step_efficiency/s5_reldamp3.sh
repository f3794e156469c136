#!/bin/bash
# S5-reldamp, third part: a larger relative damping on the autoencoder.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
L=tools/step_efficiency/logs/s5_reldamp
uptime >> $L/autoencoder.txt
nice -n 5 /work/main/.venv/bin/python tools/step_efficiency/run.py --task autoencoder --steps 160 \
  --configs '{"rel10": {"step_rule": "library", "damping_mode": "relative", "damping": 10.0}}' \
  --out $L/autoencoder.jsonl >> $L/autoencoder.txt 2>&1
