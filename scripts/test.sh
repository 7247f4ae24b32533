#!/usr/bin/env bash
# Install the locked package set into .venv (CPU torch) and run the test suite:
#   bash scripts/test.sh [--fast] [pytest args]
# --fast: the inner loop (-m "not slow": unit tests and the float64 equivalence proofs on the
# default paths, ~2 min); without it, everything CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
tier=()
if [ "${1:-}" = "--fast" ]; then
  tier=(-m "not slow")
  shift
fi
# two workers (pytest-xdist): most tests are single-threaded (OMP_NUM_THREADS=1, subprocess start-up)
python -m pytest -q -n "${TEST_WORKERS:-2}" "${tier[@]}" "$@"
