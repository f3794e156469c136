#!/bin/bash
# Session-8 step-efficiency runs (RESULTS.md S8-nesterov, S8-lead), steps to target only (no
# timing), one process at a time, nice 5, through run.py and the library's own options.
#   bash tools/step_efficiency/s8_runs.sh nesterov ae|cnn|lm [SEED]   # S8-nesterov's grid
#   bash tools/step_efficiency/s8_runs.sh library lm|mlp              # KFAC() vs nesterov=False
#   bash tools/step_efficiency/s8_runs.sh cp ae|cnn [SEED]            # estimation modes
# S8-nesterov ran before the library had `nesterov` and the size rule (in a subclass, since
# removed): its grid pins the session-start rule, 3 Newton-Schulz iterations and heavy ball as
# the default. The library reproduces its CNN and LM rows exactly (RESULTS.md S8-lead).
set -e
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
PY=${PY:-/work/main/.venv/bin/python}
O='"step_rule": "orthogonal"'
SEED=${3:-0}
case "$1" in
nesterov)
  LOGS=tools/step_efficiency/logs/s8_nesterov; P="$O, \"orthogonal_iterations\": 3"
  C="{\"default\": {$P, \"nesterov\": false}, \"nesterov\": {$P, \"nesterov\": true},
      \"nesterov_m95\": {$P, \"nesterov\": true, \"momentum\": 0.95},
      \"m95\": {$P, \"nesterov\": false, \"momentum\": 0.95}}" ;;
library)
  LOGS=tools/step_efficiency/logs/s8_nesterov; SEED=0
  C="{\"default\": {$O}, \"heavy_ball\": {$O, \"nesterov\": false}}" ;;
cp)
  LOGS=tools/step_efficiency/logs/s8_cp
  C="{\"fisher\": {$O}, \"curvature_propagation\": {$O, \"estimation_mode\": \"curvature_propagation\"}}" ;;
*) echo "usage: $0 nesterov|library|cp TASK [SEED]" >&2; exit 2 ;;
esac
case "$2" in
ae) ARGS="--task autoencoder --steps 200 --targets 150,120,100,90,80"; NAME=ae ;;
cnn) ARGS="--task cnn --steps 200 --targets 0.1,0.05,0.02"; NAME=cnn ;;
lm) ARGS="--task lm --steps $([ "$1" = library ] && echo 1000 || echo 600) --targets 3.2447,2.9447,2.7447"; NAME=lm ;;
mlp) ARGS="--task mlp --steps 150 --targets 0.1,0.03"; NAME=mlp ;;
*) echo "usage: $0 nesterov|library|cp ae|cnn|lm|mlp [SEED]" >&2; exit 2 ;;
esac
NAME=$([ "$1" = library ] && echo lib_)${NAME}_s$SEED
{
  echo "command: run.py $ARGS --seed $SEED"
  echo "configs: $C"
  echo "load before: $(cat /proc/loadavg)"
  nice -n 5 "$PY" tools/step_efficiency/run.py $ARGS --seed $SEED --configs "$C" --out "$LOGS/$NAME.jsonl"
  echo "load after: $(cat /proc/loadavg)"
} > "$LOGS/$NAME.txt" 2>&1
