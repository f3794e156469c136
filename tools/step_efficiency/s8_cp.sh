#!/bin/bash
# S8-cp runs (RESULTS.md S8-cp): KFAC() with estimation_mode="curvature_propagation" vs the sampled
# Fisher, steps to target only (no timing). Usage: bash tools/step_efficiency/s8_cp.sh ae SEED | cnn | lm
set -e
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
PY=${PY:-/work/main/.venv/bin/python}
LOGS=tools/step_efficiency/logs/s8_cp
C='{"fisher": {"step_rule": "orthogonal"},
    "curvature_propagation": {"step_rule": "orthogonal", "estimation_mode": "curvature_propagation"}}'
case "$1" in
ae) ARGS="--task autoencoder --steps 200 --seed ${2:-0} --targets 150,120,100,90,80"; NAME=ae_s${2:-0} ;;
cnn) ARGS="--task cnn --steps 200 --seed 0 --targets 0.1,0.05,0.02"; NAME=cnn_s0 ;;
lm) ARGS="--task lm --steps 600 --seed 0 --targets 3.2447,2.9447,2.7447"; NAME=lm_s0 ;;
*) echo "usage: $0 ae SEED|cnn|lm" >&2; exit 2 ;;
esac
{
  echo "command: run.py $ARGS"
  echo "configs: $C"
  echo "load before: $(cat /proc/loadavg)"
  nice -n 5 "$PY" tools/step_efficiency/run.py $ARGS --configs "$C" --out "$LOGS/$NAME.jsonl"
  echo "load after: $(cat /proc/loadavg)"
} > "$LOGS/$NAME.txt" 2>&1
