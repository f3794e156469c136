#!/bin/bash
# Session-4 follow-up 2: VAE seed 1 (Adam, (a), (b)); BiLSTM on longer sequences (length 60: the
# length-20 task is solved by every candidate in one epoch). Usage: lanes3.sh vae_adam|vae_a|vae_b|bilstm60
cd "$(dirname "$0")/../.."
export PYTHONPATH=. KFAC_KERAS_DATA_DIR=/work/shared/data/mnist TF_CPP_MIN_LOG_LEVEL=2
P="nice /work/main/.venv/bin/python"
K=tools/keras_programs
L=$K/logs
ORTHO='{"step_rule": "ortho", "ns_steps": 3, "momentum_after": true, "learning_rate": 0.01}'
KLV='{"step_rule": "kl_velocity"}'
KLV2='{"step_rule": "kl_velocity", "kl_bound": 0.01}'
run() { log=$1; shift; { echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] $P $*"; } >> $L/$log.txt
        $P "$@" >> $L/$log.txt 2>&1
        echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] exit $?" >> $L/$log.txt; }
case $1 in
vae_adam) run vae_seed1_adam $K/vae.py --epochs 5 --seed 1 --optimizers adam;;
vae_a) run vae_seed1_a $K/vae.py --epochs 5 --seed 1 --optimizers kfac;;
vae_b) run vae_seed1_b $K/vae.py --epochs 5 --seed 1 --optimizers kfac --step-rule "$ORTHO";;
bilstm60)
  R="$K/recurrent_classifier.py --models bilstm --length 60 --epochs 2"
  run recurrent_len60 $R --optimizers adam,kfac
  run recurrent_len60 $R --optimizers kfac --step-rule "$ORTHO"
  run recurrent_len60 $R --optimizers kfac --kfac '{"momentum": 0.0}'
  run recurrent_len60 $R --optimizers kfac --step-rule "$KLV"
  run recurrent_len60 $R --optimizers kfac --step-rule "$KLV2";;
esac
# (appended) transformer seed 2 for Adam, (a), (b): run as  lanes3.sh tr2_adam|tr2_a|tr2_b
case $1 in
tr2_adam) run transformer_seed2 $K/transformer_classifier.py --train 4000 --epochs 2 --seed 2 --optimizer adam;;
tr2_a) run transformer_seed2 $K/transformer_classifier.py --train 4000 --epochs 2 --seed 2 --optimizer kfac;;
tr2_b) run transformer_seed2 $K/transformer_classifier.py --train 4000 --epochs 2 --seed 2 --optimizer kfac --step-rule "$ORTHO";;
esac
# (appended) (b) with a cosine decay to 10% over the 250 steps, transformer seeds 0-2: lanes3.sh trcos_0|trcos_1|trcos_2
ORTHO_COS='{"step_rule": "ortho", "ns_steps": 3, "momentum_after": true, "learning_rate": 0.01, "lr_schedule": {"kind": "cosine", "steps": 250, "final_fraction": 0.1}}'
case $1 in
trcos_*) run transformer_cos $K/transformer_classifier.py --train 4000 --epochs 2 --seed ${1#trcos_} --optimizer kfac --step-rule "$ORTHO_COS";;
esac
# (appended) Adam with the same cosine decay (1e-3 to 1e-4 over 250 steps): lanes3.sh adamcos_0|adamcos_1|adamcos_2
case $1 in
adamcos_*) run transformer_cos $K/transformer_classifier.py --train 4000 --epochs 2 --seed ${1#adamcos_} --optimizer adam --adam-cosine-steps 250;;
esac
