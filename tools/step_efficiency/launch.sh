#!/bin/bash
# launch.sh TASK STEPS CONFIG_JSON_FILE LOGNAME [more run.py args]: background run, log in logs/.
cd "$(dirname "$0")/../.."
task=$1; steps=$2; cfg=$3; log=$4; shift 4
export KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
nohup nice /work/main/.venv/bin/python tools/step_efficiency/run.py --task "$task" --steps "$steps" \
  --configs "$(cat "$cfg")" --out "tools/step_efficiency/logs/$task.jsonl" "$@" \
  > "tools/step_efficiency/logs/$log.txt" 2>&1 &
echo $!
