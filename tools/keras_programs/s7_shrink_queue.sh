#!/bin/bash
# S7-shrink: runs the lines "TAG|ARGS" of a queue file one after another (one process at a time,
# nice 5) through s7_shrink.py, each into logs/s7_shrink/TAG.jsonl (stdout) and TAG.err (stderr);
# a line is claimed by moving it to QUEUE.done first, so lines can be appended while it runs.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
PY=/work/main/.venv/bin/python
L=tools/keras_programs/logs/s7_shrink
QUEUE=${1:-$L/queue.txt}
while true; do
  line=$(head -n 1 "$QUEUE")
  [ -z "$line" ] && break
  sed -i 1d "$QUEUE"
  echo "$line" >> "$QUEUE.done"
  tag=${line%%|*}; args=${line#*|}
  uptime > $L/$tag.uptime
  eval nice -n 5 $PY tools/keras_programs/s7_shrink.py --tag $tag $args > $L/$tag.jsonl 2> $L/$tag.err
  uptime >> $L/$tag.uptime
done
