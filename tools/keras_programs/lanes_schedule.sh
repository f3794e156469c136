#!/bin/bash
# S5-schedule: the transformer classifier per window of 47 steps (schedule_classifier.py), seeds 0-2:
# Adam, KFAC() defaults, KFACCallback(decay="cosine"), KFAC(learning_rate=3e-3). One process at a time.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD TF_CPP_MIN_LOG_LEVEL=2
PY=/work/main/.venv/bin/python
LOG=tools/keras_programs/logs/logs_schedule_classifier.jsonl
for seed in 0 1 2; do
  uptime >&2
  nice -n 5 $PY tools/keras_programs/schedule_classifier.py --optimizer adam --seed $seed >> $LOG
  nice -n 5 $PY tools/keras_programs/schedule_classifier.py --optimizer kfac --seed $seed >> $LOG
  nice -n 5 $PY tools/keras_programs/schedule_classifier.py --optimizer kfac --decay cosine --seed $seed >> $LOG
  nice -n 5 $PY tools/keras_programs/schedule_classifier.py --optimizer kfac --kfac '{"learning_rate": 0.003}' --seed $seed >> $LOG
done
uptime >&2
