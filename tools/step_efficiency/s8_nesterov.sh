#!/bin/bash
# S8-nesterov runs (RESULTS.md S8-nesterov). Usage: bash tools/step_efficiency/s8_nesterov.sh ae0|ae1|cnn|cnn1|lm WINNER
# One process at a time, nice 5, steps only (no --ratio); logs under tools/step_efficiency/logs/s8_nesterov/.
set -e
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
PY=${PY:-/work/main/.venv/bin/python}
LOGS=tools/step_efficiency/logs/s8_nesterov
O='"step_rule": "orthogonal"'
ALL="{\"default\": {$O},
 \"nesterov\": {$O, \"nesterov\": true},
 \"nesterov_m95\": {$O, \"nesterov\": true, \"momentum\": 0.95},
 \"m95\": {$O, \"nesterov\": false, \"momentum\": 0.95}}"
case "$1" in
ae0) TASK=autoencoder; STEPS=200; SEED=0; TARGETS=150,120,100,90,80; C="$ALL"; NAME=ae_seed0 ;;
ae1) TASK=autoencoder; STEPS=200; SEED=1; TARGETS=150,120,100,90,80; C="$ALL"; NAME=ae_seed1 ;;
cnn) TASK=cnn; STEPS=200; SEED=0; TARGETS=0.1,0.05,0.02; C="$ALL"; NAME=cnn_seed0 ;;
cnn1)  # extra (not in the brief): default vs nesterov, CNN seed 1
  C="{\"default\": {$O}, \"nesterov\": {$O, \"nesterov\": true}}"
  TASK=cnn; STEPS=200; SEED=1; TARGETS=0.1,0.05,0.02; NAME=cnn_seed1 ;;
lm)
  W=${2:?winner config name}
  C=$(echo "$ALL" | $PY -c "import json,sys; a=json.load(sys.stdin); print(json.dumps({k: a[k] for k in ('default', '$W')}))")
  TASK=lm; STEPS=600; SEED=0; TARGETS=3.2447,2.9447,2.7447; NAME=lm_seed0 ;;
*) echo "usage: $0 ae0|ae1|cnn|cnn1|lm WINNER" >&2; exit 2 ;;
esac
{
  echo "command: nesterov_run.py --task $TASK --steps $STEPS --seed $SEED --targets $TARGETS --configs C --out $LOGS/$NAME.jsonl"
  echo "configs: $C"
  echo "python: $PY"
  echo "load before: $(cat /proc/loadavg)"
  nice -n 5 $PY tools/step_efficiency/nesterov_run.py --task $TASK --steps $STEPS --seed $SEED \
    --targets $TARGETS --configs "$C" --out $LOGS/$NAME.jsonl 2>&1 \
    | grep -v '^\(I0000\|E0000\|W0000\|WARNING\|To enable\)'
  echo "load after: $(cat /proc/loadavg)"
} > $LOGS/$NAME.txt
