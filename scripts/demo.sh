#!/usr/bin/env bash
# The README's default job: TDM on a 2-D Gaussian mixture, on CPU in a few minutes.
#   bash scripts/demo.sh [--ablations] [train_tdm.py flags ...]
# Pre-trains the teacher (cached in outputs/toy2d/teacher), distils a 4-step student through
# train_tdm.py, evaluates both by sliced Wasserstein distance and unbiased MMD², and prints where the results are
# (scripts/toy_benchmark.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
start=$SECONDS
python scripts/toy_benchmark.py --config configs/toy2d.yaml "$@"
echo "demo finished in $((SECONDS - start)) s (figure and table: see the two lines above)"
