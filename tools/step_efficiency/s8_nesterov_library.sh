#!/bin/bash
# S8-nesterov, library check: KFAC() (nesterov=None -> True with the orthogonal rule) against
# KFAC(nesterov=False) on the three step-efficiency tasks and the MLP, steps only (no timing).
# Usage: bash tools/step_efficiency/s8_nesterov_library.sh ae SEED | cnn | lm | mlp
set -e
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
PY=${PY:-/work/main/.venv/bin/python}
LOGS=tools/step_efficiency/logs/s8_nesterov
C='{"default": {"step_rule": "orthogonal"}, "heavy_ball": {"step_rule": "orthogonal", "nesterov": false}}'
case "$1" in
ae) ARGS="--task autoencoder --steps 200 --seed ${2:-0} --targets 150,120,100,90,80"; NAME=lib_ae_s${2:-0} ;;
cnn) ARGS="--task cnn --steps 200 --seed 0 --targets 0.1,0.05,0.02"; NAME=lib_cnn_s0 ;;
lm) ARGS="--task lm --steps 1000 --seed 0 --targets 3.2447,2.9447,2.7447"; NAME=lib_lm_s0 ;;
mlp) ARGS="--task mlp --steps 150 --seed 0 --targets 0.1,0.03"; NAME=lib_mlp_s0 ;;
*) echo "usage: $0 ae SEED|cnn|lm|mlp" >&2; exit 2 ;;
esac
{
  echo "command: run.py $ARGS"
  echo "configs: $C"
  echo "load before: $(cat /proc/loadavg)"
  nice -n 5 "$PY" tools/step_efficiency/run.py $ARGS --configs "$C" --out "$LOGS/$NAME.jsonl"
  echo "load after: $(cat /proc/loadavg)"
} > "$LOGS/$NAME.txt" 2>&1
