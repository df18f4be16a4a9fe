#!/usr/bin/env bash
# Retrain the shapes-world SD3 (MMDiT, two small CLIP encoders, no T5) and its canny ControlNeXt control.
#   bash scripts/retrain_sd3.sh            # base model, then the canny control, then the quality figures
#   bash scripts/retrain_sd3.sh controls   # only the control, on the base already in $RUNS/sd3-base
# One thread, as on the shared machine it was made on; same seeds and threads give the same weights.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MODULE='{"stem_channels": [16, 16, 32], "block_out_channels": [32, 64], "block_groups": [4, 8], "time_proj_dim": 32, "time_embed_dim": 64}'

if [ "${1:-all}" != controls ]; then
  python scripts/train_base_sd3.py --output "$RUNS/sd3-base" --layers 4 --steps 3000 --lr 1e-3 --warmup-steps 100 \
    --log "$RUNS/sd3-base.log"
fi

rm -rf "$RUNS/sd3-control-canny"
python -m controlnext train --base "$RUNS/sd3-base" --data shapes-canny --resolution 64 --module-config "$MODULE" \
  --learning-rate 1e-3 --module-learning-rate 1e-3 --lr-scheduler cosine --batch-size 16 --max-steps 800 \
  --checkpoint-every 0 --validation-every 200 --validation-examples 8 --guidance-scale 5 \
  --validation-metric edge_f1 --no-progress-bar --no-tensorboard --output-dir "$RUNS/sd3-control-canny"
python scripts/quality.py --base "$RUNS/sd3-base" --controls "canny=$RUNS/sd3-control-canny" --count 100 --threads 1 \
  --json "$RUNS/sd3-quality.json"
