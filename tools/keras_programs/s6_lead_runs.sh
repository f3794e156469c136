#!/bin/bash
cd /work/wt/measure
export PYTHONPATH=/work/wt/measure
PY=/work/main/.venv/bin/python
L=tools/keras_programs/logs/s6_lead
( $PY tools/keras_programs/s6_classifier.py --seed 0 --kfac '{"orthogonal_step_bound": 10.0}' > $L/transformer_bound10_seed0.txt 2>&1
  $PY tools/keras_programs/s6_classifier.py --seed 1 --kfac '{"orthogonal_step_bound": 10.0}' > $L/transformer_bound10_seed1.txt 2>&1 ) &
( $PY tools/keras_programs/bilstm_growth.py --epochs 12 --seed 0 --kfac-options '{"orthogonal_step_bound": 10.0}' --out $L/bilstm_bound10_seed0.jsonl > $L/bilstm_bound10_seed0.txt 2>&1
  $PY tools/keras_programs/s6_classifier.py --seed 0 > $L/transformer_default_seed0.txt 2>&1 ) &
wait
