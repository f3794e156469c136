#!/bin/bash
# S7-shrink: s7_cost.sh with ShrinkKFAC (shrink_run.py), logs in logs/s7_shrink.
# Usage: s7_shrink_cost.sh 'NAME-TO-KWARGS-JSON'
#   e.g. s7_shrink_cost.sh '{"shrink_p1": {"shrink": {"power": 1}}}'   ("default": {} is added first)
RUNNER=tools/keras_programs/shrink_run.py LOGS=tools/keras_programs/logs/s7_shrink \
  exec bash "$(dirname "$0")/s7_cost.sh" "$@"
