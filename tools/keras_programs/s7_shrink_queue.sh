#!/bin/bash
# S7-shrink: s7_queue.sh through s7_shrink.py, logs in logs/s7_shrink. Usage: s7_shrink_queue.sh [QUEUE]
SCRIPT=tools/keras_programs/s7_shrink.py LOGS=tools/keras_programs/logs/s7_shrink \
  exec bash "$(dirname "$0")/s7_queue.sh" "$@"
