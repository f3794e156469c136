#!/bin/bash
# Session-4 lane A3: ortho every k steps with a warm-started Newton-Schulz iteration in between
# (the plain reuse of the polar scaling diverged), then their step-time ratios on the autoencoder.
cd "$(dirname "$0")/../.."
export PYTHONPATH=. KFAC_KERAS_DATA_DIR=/work/shared/data/mnist TF_CPP_MIN_LOG_LEVEL=2
R="nice /work/main/.venv/bin/python tools/step_efficiency/run.py"
L=tools/step_efficiency/logs
C=tools/step_efficiency/configs
run() { log=$1; shift; echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] $R $*" > $L/$log.txt; $R "$@" >> $L/$log.txt 2>&1; echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] exit $?" >> $L/$log.txt; }
W="$(cat $C/s4_ae_warm.json)"
run s4_ae_warm --task autoencoder --steps 160 --configs "$(echo "$W" | /work/main/.venv/bin/python -c "import json,sys; d=json.load(sys.stdin); d.pop(\"ortho_ns3_after_lr1e-2\"); print(json.dumps(d))")" --out $L/autoencoder.jsonl
run s4_ae_ratio_warm --task autoencoder --steps 160 --configs "$W" --ratio-only \
    --ratio ortho_ns3_after_lr1e-2_every2_warm1,ortho_ns3_after_lr1e-2_every3_warm1,ortho_ns3_after_lr1e-2,muon:0.01 \
    --ratio-rounds 3 --ratio-warmup 22 --out $L/autoencoder.jsonl
