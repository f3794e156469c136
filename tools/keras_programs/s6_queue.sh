#!/bin/bash
# S6-classifier worker: pops "TAG|ARGS" lines from $QUEUE (flock) and runs s6_classifier.py on each,
# appending its JSON line to $LOG, until the queue is empty. Start one worker per lane.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD TF_CPP_MIN_LOG_LEVEL=2
PY=/work/main/.venv/bin/python
QUEUE=${QUEUE:-tools/keras_programs/logs/s6_classifier/queue.txt}
LOG=${LOG:-tools/keras_programs/logs/s6_classifier/runs.jsonl}
while true; do
  line=$(flock "$QUEUE.lock" bash -c 'l=$(head -n1 "$0"); sed -i 1d "$0"; echo "$l"' "$QUEUE")
  [ -z "$line" ] && break
  tag=${line%%|*}; rest=${line#*|}
  echo "$(date -u +%H:%M:%S) $(uptime | sed 's/.*load/load/') $tag" >> "${LOG%.jsonl}_uptime.txt"
  eval "nice -n 5 $PY tools/keras_programs/s6_classifier.py --tag $tag $rest" >> "$LOG" 2>> "${LOG%.jsonl}_stderr.txt"
done
