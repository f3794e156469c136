#!/bin/bash
# Session-4 lane A2: kl_velocity with larger bounds (the library's momentum-0.9 update can reach ~10x
# the clipped step, i.e. up to ~100x c in KL, so c = 1e-3 and 1e-2 bracket it) on the autoencoder and CNN.
cd "$(dirname "$0")/../.."
export PYTHONPATH=. KFAC_KERAS_DATA_DIR=/work/shared/data/mnist TF_CPP_MIN_LOG_LEVEL=2
R="nice /work/main/.venv/bin/python tools/step_efficiency/run.py"
L=tools/step_efficiency/logs
C=tools/step_efficiency/configs
run() { log=$1; shift; echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] $R $*" > $L/$log.txt; $R "$@" >> $L/$log.txt 2>&1; echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] exit $?" >> $L/$log.txt; }
run s4_ae_klv --task autoencoder --steps 160 --configs "$(cat $C/s4_klv_bounds.json)" --out $L/autoencoder.jsonl
run s4_cnn_klv --task cnn --steps 170 --configs "$(cat $C/s4_klv_bounds.json)" --out $L/cnn.jsonl
