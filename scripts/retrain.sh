#!/usr/bin/env bash
# Retrain the embedded default model and its controls, then copy them into the package.
#   bash scripts/retrain.sh            # the base model from scratch, its continuation, the three controls, quality.py
#   bash scripts/retrain.sh continue   # the continuation of the base in controlnext/assets/base, then the controls
#   bash scripts/retrain.sh controls   # only the controls, on the base model already in controlnext/assets/base
#   THREADS=1 STEPS=300 KINDS="canny mask" bash scripts/retrain.sh controls   # threads, steps and kinds of the controls
#   BASE_FLAGS="--unet-steps 4000" bash scripts/retrain.sh   # more flags of the first train_base.py run
# The base trains in two runs: 8,000 steps of 32 from scratch (about 2 hours on 2 CPU cores), then 2,100 steps of
# 128 on 30,000 scenes from those weights (4 minutes on one GPU; hours on a CPU). On a GPU every stage runs there
# by itself (train_base.py --device auto, controlnext train through accelerate, quality.py --device auto);
# BASE_THREADS sets the base runs' torch threads and rendering processes, WORKERS the controls' data-loading
# processes. Each control trains in two stages, runs/control-KIND (the module and the attention projections) and
# runs/control-KIND-fine (from those weights, the UNet's two finest up levels too; shipped), each keeping a checkpoint
# every 200 steps in its checkpoints/ (each with control/, loadable); canny has a third, runs/control-canny-pixel
# (the same weights with --pixel-loss-weight; shipped). Same seeds and thread counts give the same
# weights on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
THREADS=${THREADS:-2}  # torch threads of each control's training
STEPS=${STEPS:-}  # optimizer steps of every control stage (default: each kind's own, below)
WORKERS=${WORKERS:-0}  # data-loading processes of each control's training
BASE_THREADS=${BASE_THREADS:-2}  # torch threads and rendering processes of the base runs
ASSETS=controlnext/assets
MODULE='{"stem_channels": [16, 16, 32], "block_out_channels": [32, 64], "block_groups": [4, 8], "time_proj_dim": 32, "time_embed_dim": 64}'

STAGE=${1:-all}
case $STAGE in all | continue | controls) ;; *) echo "unknown stage '$STAGE': use all, continue or controls" >&2; exit 2 ;; esac
if [ "$STAGE" = all ]; then
  python scripts/train_base.py --output "$RUNS/base" --log "$RUNS/base.log" --threads "$BASE_THREADS" ${BASE_FLAGS:-}
  rm -rf "$ASSETS/base" && cp -r "$RUNS/base" "$ASSETS/base"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = continue ]; then  # the same model, longer, on larger batches of more scenes
  python scripts/train_base.py --output "$RUNS/base-continued" --log "$RUNS/base-continued.log" \
    --init-from "$ASSETS/base" --train-images 30000 --unet-steps 2100 --unet-batch 128 --unet-lr 3e-4 \
    --eval-every 525 --threads "$BASE_THREADS"
  rm -rf "$ASSETS/base" && cp -r "$RUNS/base-continued" "$ASSETS/base"
fi

train_control() {  # kind, output folder, steps, then more `controlnext train` flags
  local kind=$1 output=$2 steps=$3 metric guidance
  shift 3
  case $kind in canny) metric=edge_f1 ;; mask) metric=mask_iou ;; *) metric=none ;; esac  # quality.py scores skeletons
  # validation guidance, recorded in control.json as the guidance `generate` uses with the control (scripts/README.md)
  case $kind in canny) guidance=1.5 ;; *) guidance=3 ;; esac
  rm -rf "$output"
  OMP_NUM_THREADS=$THREADS controlnext train --data "shapes-$kind" --resolution 128 \
    --generated-examples 6400 --latent-cache "$RUNS/latent-cache" --lr-scheduler cosine --batch-size 16 \
    --max-steps "${STEPS:-$steps}" --checkpoint-every 200 --validation-every 200 --validation-examples 8 \
    --guidance-scale "$guidance" --validation-metric "$metric" --num-workers "$WORKERS" --no-progress-bar \
    --no-tensorboard --output-dir "$output" "$@"
}

for kind in ${KINDS:-canny mask skeleton}; do
  case $kind in canny) steps=1600 ;; mask) steps=600 ;; *) steps=800 ;; esac  # the shipped controls' steps
  train_control "$kind" "$RUNS/control-$kind" "$steps" --module-config "$MODULE" --trainable 'attn[12]\.' \
    --learning-rate 1e-3 --module-learning-rate 1e-3
  # then the UNet's two finest up levels too, from those weights at 1e-4, stored in fp16 (scripts/README.md)
  case $kind in canny) steps=1600 ;; *) steps=800 ;; esac
  fine=(--trainable 'attn[12]\.' 'up_blocks\.[23]\.' conv_out conv_norm_out --learning-rate 1e-4
        --module-learning-rate 1e-4 --save-precision fp16)
  train_control "$kind" "$RUNS/control-$kind-fine" "$steps" --init-control "$RUNS/control-$kind" "${fine[@]}"
  shipped="$RUNS/control-$kind-fine"
  if [ "$kind" = canny ]; then  # then the same weights with the decoded-image loss too, which puts edges on the pixel
    train_control canny "$RUNS/control-canny-pixel" 800 --init-control "$shipped" "${fine[@]}" --pixel-loss-weight 10
    shipped="$RUNS/control-canny-pixel"
  fi
  rm -rf "$ASSETS/controls/$kind" && mkdir -p "$ASSETS/controls/$kind"
  cp "$shipped"/{config.json,control.json,diffusion_pytorch_model.safetensors,unet.safetensors} "$ASSETS/controls/$kind/"
done
[ -n "${KINDS:-}" ] || python scripts/quality.py --count 200 --json "$RUNS/quality.json"
