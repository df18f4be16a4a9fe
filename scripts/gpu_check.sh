#!/usr/bin/env bash
# The figures only a GPU gives, in one run (about 10 minutes on one H200): random weights in fp16 for SD1.5,
# SDXL, SD3-medium and SVD-XT -- generation of each method finite, ControlNeXt at scale 0 equal to the base,
# whole generation against diffusers' own ControlNet pipelines, step and mixed-precision training cost on the
# UNets, torch.compile with control attached. See scripts/README.md. Writes OUT/gpu-results.json and
# OUT/gpu-check.log; --report also rewrites BENCHMARKS.md.
# Usage: bash scripts/gpu_check.sh [OUT] [--report] [--architecture sd15 sdxl] [other controlnext.bench.gpu flags]
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
