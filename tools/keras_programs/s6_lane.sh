#!/bin/bash
# S6-classifier lane: each argument line "TAG|ARGS" runs s6_classifier.py once, appending to $LOG.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD TF_CPP_MIN_LOG_LEVEL=2
PY=/work/main/.venv/bin/python
LOG=${LOG:-tools/keras_programs/logs/s6_classifier/runs.jsonl}
while IFS='|' read -r tag rest; do
  [ -z "$tag" ] && continue
  echo "$(date -u +%H:%M:%S) $(uptime | sed 's/.*load/load/') $tag" >> "${LOG%.jsonl}_uptime.txt"
  eval "nice -n 5 $PY tools/keras_programs/s6_classifier.py --tag $tag $rest" >> "$LOG" 2>> "${LOG%.jsonl}_stderr.txt"
done
