#!/bin/bash
# S5-convex: the deep tasks for the ortho_len candidates against the library default (one process at a time).
cd "$(dirname "$0")/../.."
export KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist} PYTHONPATH=$PWD
PY=${PY:-/work/main/.venv/bin/python}
CONFIGS="$(cat tools/step_efficiency/configs/${1:-convex_deep2}.json)"
L=tools/step_efficiency/logs
nice -n 5 $PY tools/step_efficiency/run.py --task autoencoder --steps 160 --configs "$CONFIGS" --out $L/convex_ae.jsonl > $L/convex_ae.txt 2>&1
nice -n 5 $PY tools/step_efficiency/run.py --task cnn --steps 170 --configs "$CONFIGS" --out $L/convex_cnn.jsonl > $L/convex_cnn.txt 2>&1
nice -n 5 $PY tools/step_efficiency/run.py --task lm --steps 400 --targets 3.2447,2.9447,2.7447 --configs "$CONFIGS" --out $L/convex_lm.jsonl > $L/convex_lm.txt 2>&1
