#!/usr/bin/env bash
# Install the project into .venv (CPU torch) and run the test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# two workers (pytest-xdist): most tests are single-threaded (OMP_NUM_THREADS=1, subprocess start-up)
python -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
