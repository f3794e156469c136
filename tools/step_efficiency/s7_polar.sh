#!/bin/bash
# S7-polar runs (RESULTS.md S7-polar). Usage: bash tools/step_efficiency/s7_polar.sh main|seed1|ratio
# One process at a time, nice 5; logs under tools/step_efficiency/logs/s7_polar/.
set -e
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD KFAC_KERAS_DATA_DIR=${KFAC_KERAS_DATA_DIR:-/work/shared/data/mnist}
PY=${PY:-/work/main/.venv/bin/python}
LOGS=tools/step_efficiency/logs/s7_polar
O='"step_rule": "orthogonal"'
case "$1" in
main)
  C="{\"default\": {$O},
   \"cached5\": {$O, \"polar\": {\"kind\": \"cached\", \"refresh_every\": 5}},
   \"cached10\": {$O, \"polar\": {\"kind\": \"cached\", \"refresh_every\": 10}},
   \"cached20\": {$O, \"polar\": {\"kind\": \"cached\", \"refresh_every\": 20}},
   \"cached10_polish\": {$O, \"polar\": {\"kind\": \"cached\", \"refresh_every\": 10, \"polish\": true}},
   \"split_large2\": {$O, \"polar\": {\"kind\": \"split\", \"large_iterations\": 2}},
   \"split_large1\": {$O, \"polar\": {\"kind\": \"split\", \"large_iterations\": 1}},
   \"exact_every_step\": {$O, \"polar\": {\"kind\": \"cached\", \"refresh_every\": 1}}}"
  RATIO=default,cached10,cached20,split_large2,split_large1,exact_every_step
  NAME=ae_main; SEED=0 ;;
seed1)
  C="{\"default\": {$O},
   \"split_large2\": {$O, \"polar\": {\"kind\": \"split\", \"large_iterations\": 2}}}"
  RATIO=default,split_large2
  NAME=ae_seed1; SEED=1 ;;
ratio)
  # Ratios only (5 rounds), with the Newton-Schulz-free kl_clip step as the floor.
  C="{\"default\": {$O}, \"kl_clip\": {\"step_rule\": \"kl_clip\"},
   \"split_large2\": {$O, \"polar\": {\"kind\": \"split\", \"large_iterations\": 2}},
   \"cached20\": {$O, \"polar\": {\"kind\": \"cached\", \"refresh_every\": 20}}}"
  RATIO=default,kl_clip,split_large2,cached20
  NAME=ae_ratio5; SEED=0; EXTRA="--ratio-only" ;;
*) echo "usage: $0 main|seed1|ratio" >&2; exit 2 ;;
esac
ROUNDS=${EXTRA:+5}; ROUNDS=${ROUNDS:-3}
{
  echo "command: polar_run.py --task autoencoder --steps 200 --seed $SEED --targets 150,120,100,90,80 --ratio $RATIO --ratio-rounds $ROUNDS --ratio-period 20 --ratio-warmup 25 $EXTRA"
  echo "configs: $C"
  echo "load before: $(cat /proc/loadavg)"
  nice -n 5 $PY tools/step_efficiency/polar_run.py --task autoencoder --steps 200 --seed $SEED \
    --targets 150,120,100,90,80 --configs "$C" --ratio "$RATIO" --ratio-rounds $ROUNDS $EXTRA \
    --ratio-period 20 --ratio-warmup 25 --out $LOGS/$NAME.jsonl 2>&1 \
    | grep -v '^\(I0000\|E0000\|W0000\|WARNING\|To enable\)'
  echo "load after: $(cat /proc/loadavg)"
} > $LOGS/$NAME.txt
