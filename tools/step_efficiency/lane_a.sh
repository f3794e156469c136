#!/bin/bash
# Session-4 experiments lane A (issue 12): steps to target of kl_velocity / momentum 0 on the three
# tasks, then the cheaper-orthogonalisation variants and the step-time ratios on the autoencoder.
cd "$(dirname "$0")/../.."
export PYTHONPATH=. KFAC_KERAS_DATA_DIR=/work/shared/data/mnist TF_CPP_MIN_LOG_LEVEL=2
R="nice /work/main/.venv/bin/python tools/step_efficiency/run.py"
L=tools/step_efficiency/logs
C=tools/step_efficiency/configs
run() { log=$1; shift; echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] $R $*" > $L/$log.txt; $R "$@" >> $L/$log.txt 2>&1; echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] exit $?" >> $L/$log.txt; }
run s4_ae_cand --task autoencoder --steps 160 --configs "$(cat $C/s4_candidates.json)" --out $L/autoencoder.jsonl
run s4_cnn_cand --task cnn --steps 170 --configs "$(cat $C/s4_candidates.json)" --out $L/cnn.jsonl
run s4_lm_cand --task lm --steps 400 --targets 3.2447,2.9447,2.7447 --configs "$(cat $C/s4_candidates.json)" --out $L/lm.jsonl
run s4_ae_cheap --task autoencoder --steps 160 --configs "$(cat $C/s4_ae_cheap.json)" --out $L/autoencoder.jsonl
run s4_ae_ratio --task autoencoder --steps 160 --configs "$(cat $C/s4_ratio_ae.json)" --ratio-only \
    --ratio ortho_ns3_after_lr1e-2,ortho_ns3_after_lr1e-2_every2,ortho_ns3_after_lr1e-2_every3,muon:0.01,library,kl_velocity \
    --ratio-rounds 3 --ratio-warmup 22 --out $L/autoencoder.jsonl
