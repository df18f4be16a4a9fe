#!/usr/bin/env bash
# The figures only a GPU gives, in one run (about 5-8 minutes on one H100/H200): SD1.5 at 512 px and SDXL at
# 1024 px with random weights in fp16 -- generation of each method finite, ControlNeXt at scale 0 equal to
# the base, one denoising step of base / ControlNeXt / ControlNet, one mixed-precision training step of each
# (time and peak memory), a whole 30-step generation against diffusers' own ControlNet pipeline, and
# torch.compile of the UNet with control attached. Writes OUT/gpu-results.json and OUT/gpu-check.log; with
# --report also BENCHMARKS.md. Usage: bash scripts/gpu_check.sh [OUT] [extra flags for controlnext.bench.gpu]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
shift || true
mkdir -p "$out"
# Keep the machine's own CUDA torch: every pin but torch's.
grep -v '^torch==' constraints.txt > "$out/constraints-no-torch.txt"
python3 -m pip install --quiet --disable-pip-version-check -c "$out/constraints-no-torch.txt" -e .
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script measures a GPU'"
PYTHONUNBUFFERED=1 python3 -m controlnext.bench.gpu --output "$out/gpu-results.json" "$@" 2>&1 | tee "$out/gpu-check.log"
