#!/bin/bash
# Session-4 experiments (issues 12/14/15): the keras programs with the candidate default step rules
# vs Adam at equal epochs. Usage: lanes.sh transformer|vae|recurrent_denoising
# (a) KFAC() defaults, (b) ortho ns3 momentum-after lr 1e-2, (c) KL clip on the velocity, (d) momentum 0.
cd "$(dirname "$0")/../.."
export PYTHONPATH=. KFAC_KERAS_DATA_DIR=/work/shared/data/mnist TF_CPP_MIN_LOG_LEVEL=2
P="nice /work/main/.venv/bin/python"
K=tools/keras_programs
L=$K/logs
ORTHO='{"step_rule": "ortho", "ns_steps": 3, "momentum_after": true, "learning_rate": 0.01}'
KLV='{"step_rule": "kl_velocity"}'
run() { log=$1; shift; { echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] $P $*"; } >> $L/$log.txt
        $P "$@" >> $L/$log.txt 2>&1
        echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] exit $?" >> $L/$log.txt; }
case $1 in
transformer)
  for seed in 0 1; do
    T="$K/transformer_classifier.py --train 4000 --epochs 2 --seed $seed"
    run transformer $T --optimizer adam
    run transformer $T --optimizer kfac
    run transformer $T --optimizer kfac --step-rule "$ORTHO"
    run transformer $T --optimizer kfac --step-rule "$KLV"
    run transformer $T --optimizer kfac --kfac '{"momentum": 0.0}'
  done;;
vae)
  V="$K/vae.py --epochs 5"
  run vae $V --optimizers adam
  run vae $V --optimizers kfac
  run vae $V --optimizers kfac --step-rule "$ORTHO"
  run vae $V --optimizers kfac --step-rule "$KLV"
  run vae $V --optimizers kfac --kfac-options '{"momentum": 0.0}';;
recurrent_denoising)
  R="$K/recurrent_classifier.py --models bilstm"
  run recurrent $R --optimizers adam,kfac
  run recurrent $R --optimizers kfac --step-rule "$ORTHO"
  run recurrent $R --optimizers kfac --step-rule "$KLV"
  run recurrent $R --optimizers kfac --kfac '{"momentum": 0.0}'
  for seed in 0 1; do
    D="$K/denoising_autoencoder.py --seed $seed"
    run denoising $D --optimizer adam
    run denoising $D --optimizer kfac
    run denoising $D --optimizer kfac --step-rule "$ORTHO"
    run denoising $D --optimizer kfac --step-rule "$KLV"
    run denoising $D --optimizer kfac --kfac '{"momentum": 0.0}'
  done;;
esac
