#!/usr/bin/env bash
# GPU benchmark of PixArt-α 512 (real architecture, random weights): training iteration in lora and
# full modes (batch 4, bf16, gradient checkpointing) and 4-step vs 25-step CFG sampling.
#   bash scripts/bench_gpu.sh [out.md]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_gpu.md}
python scripts/bench_train.py --size full --batch 4 --mixed_precision bf16 --gradient_checkpointing \
  --iterations 10 --markdown "$out"
python scripts/bench_infer.py --size full --dtype bf16 | tee -a "$out"
echo "results in $out"
