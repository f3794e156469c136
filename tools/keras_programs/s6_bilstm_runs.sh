cd /work/wt/bilstm
export PYTHONPATH=$PWD
L=tools/keras_programs/logs/s6_bilstm
PY=/work/main/.venv/bin/python
for seed in 0 1; do
  uptime > $L/kfac_bound1_seed$seed.txt
  $PY tools/keras_programs/bilstm_growth.py --epochs 12 --seed $seed --out $L/kfac_bound1_seed$seed.jsonl >> $L/kfac_bound1_seed$seed.txt 2>&1
  uptime > $L/kfac_boundoff_seed$seed.txt
  $PY tools/keras_programs/bilstm_growth.py --epochs 12 --seed $seed --kfac-options '{"orthogonal_step_bound": null}' --out $L/kfac_boundoff_seed$seed.jsonl >> $L/kfac_boundoff_seed$seed.txt 2>&1
done
