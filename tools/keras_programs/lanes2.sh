#!/bin/bash
# Session-4 follow-up: candidate (c') = KL clip on the velocity with bound 1e-2 (kl_velocity at c = 1e-4
# lost on the benchmark tasks; at c = 1e-2 it won on the CNN), queued after the first lanes (PIDs given).
# Usage: lanes2.sh transformer|vae|denoising|lm_recurrent WAIT_PID
cd "$(dirname "$0")/../.."
export PYTHONPATH=. KFAC_KERAS_DATA_DIR=/work/shared/data/mnist TF_CPP_MIN_LOG_LEVEL=2
P="nice /work/main/.venv/bin/python"
K=tools/keras_programs
L=$K/logs
KLV2='{"step_rule": "kl_velocity", "kl_bound": 0.01}'
while kill -0 "$2" 2>/dev/null; do sleep 10; done
run() { log=$1; shift; { echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] $P $*"; } >> $L/$log.txt
        $P "$@" >> $L/$log.txt 2>&1
        echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] exit $?" >> $L/$log.txt; }
case $1 in
transformer)
  for seed in 0 1; do
    run transformer $K/transformer_classifier.py --train 4000 --epochs 2 --seed $seed --optimizer kfac --step-rule "$KLV2"
  done;;
vae)
  run vae $K/vae.py --epochs 5 --optimizers kfac --step-rule "$KLV2";;
denoising)
  for seed in 0 1; do
    run denoising $K/denoising_autoencoder.py --seed $seed --optimizer kfac --step-rule "$KLV2"
  done;;
lm_recurrent)
  S=tools/step_efficiency
  echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] run.py --task lm --steps 400 --targets 3.2447,2.9447,2.7447 --configs klv_c1e-2" > $S/logs/s4_lm_klv.txt
  $P $S/run.py --task lm --steps 400 --targets 3.2447,2.9447,2.7447 \
      --configs '{"kl_velocity_c1e-2": {"step_rule": "kl_velocity", "kl_bound": 1e-2}}' --out $S/logs/lm.jsonl >> $S/logs/s4_lm_klv.txt 2>&1
  echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] exit $?" >> $S/logs/s4_lm_klv.txt
  run recurrent $K/recurrent_classifier.py --models bilstm --optimizers kfac --step-rule "$KLV2";;
esac
