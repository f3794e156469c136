#!/bin/bash
# S7-classgap / S7-shrink: runs the lines "TAG|ARGS" of a queue file one after another (one
# process at a time, nice 5) through $SCRIPT, each into $LOGS/TAG.jsonl (stdout) and TAG.err
# (stderr); a line is claimed by moving it to QUEUE.done first, so lines can be appended while it
# runs. Defaults: SCRIPT=tools/keras_programs/s7_classgap.py, LOGS=tools/keras_programs/logs/s7_classgap,
# PY=.venv/bin/python. Usage: s7_queue.sh [QUEUE]
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
PY=${PY:-$PWD/.venv/bin/python}
SCRIPT=${SCRIPT:-tools/keras_programs/s7_classgap.py}
L=${LOGS:-tools/keras_programs/logs/s7_classgap}
QUEUE=${1:-$L/queue.txt}
while true; do
  line=$(head -n 1 "$QUEUE")
  [ -z "$line" ] && break
  sed -i 1d "$QUEUE"
  echo "$line" >> "$QUEUE.done"
  tag=${line%%|*}; args=${line#*|}
  uptime > $L/$tag.uptime
  eval nice -n 5 $PY $SCRIPT --tag $tag $args > $L/$tag.jsonl 2> $L/$tag.err
  uptime >> $L/$tag.uptime
done
