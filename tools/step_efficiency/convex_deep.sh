#!/bin/bash
# S5-convex: the deep tasks for the ortho_len candidates against the library default, one
# process at a time. Usage: convex_deep.sh CONFIGS_NAME [TASK ...] (tasks: ae cnn lm; default all).
# Run in session 5: `convex_deep.sh convex_deep2 ae`, then `convex_deep.sh convex_deep3 cnn lm`.
cd "$(dirname "$0")/../.."
export KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist} PYTHONPATH=$PWD
PY=${PY:-/work/main/.venv/bin/python}
CONFIGS="$(cat tools/step_efficiency/configs/${1:-convex_deep2}.json)"
shift
L=tools/step_efficiency/logs
for task in ${@:-ae cnn lm}; do
  case $task in
    ae) nice -n 5 $PY tools/step_efficiency/run.py --task autoencoder --steps 160 --configs "$CONFIGS" \
          --out $L/convex_ae.jsonl > $L/convex_ae.txt 2>&1 ;;
    cnn) nice -n 5 $PY tools/step_efficiency/run.py --task cnn --steps 170 --configs "$CONFIGS" \
          --out $L/convex_cnn.jsonl > $L/convex_cnn.txt 2>&1 ;;
    lm) nice -n 5 $PY tools/step_efficiency/run.py --task lm --steps 400 --targets 3.2447,2.9447,2.7447 \
          --configs "$CONFIGS" --out $L/convex_lm.jsonl > $L/convex_lm.txt 2>&1 ;;
  esac
done
