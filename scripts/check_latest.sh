#!/usr/bin/env bash
# Drift check: does the suite pass with the newest versions that requirements.txt allows?
#   bash scripts/check_latest.sh [pytest args]
# Builds a separate venv (.venv-latest, rebuilt each time) from the unpinned ranges (torch stays
# at the lock's CPU build, or TORCH_SPEC: an unpinned torch is a multi-GB CUDA download), runs the suite in it
# and prints a short report: the versions that differ from requirements.lock and the tests that
# fail. Exit status: the suite's. When it passes, `bash scripts/lock.sh` moves the lock forward.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-latest
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
torch_spec=${TORCH_SPEC:-$(grep -i '^torch==' requirements.lock)}
"$VENV/bin/python" -m pip install -q "$torch_spec"
hold=$(mktemp)   # --upgrade would take torch too: hold it at the spec
echo "$torch_spec" > "$hold"
"$VENV/bin/python" -m pip install -q --upgrade -c "$hold" -r requirements.txt -r requirements-dev.txt
rm -f "$hold"
report=$(mktemp)
set +e
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  "$VENV/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" -p no:cacheprovider -rfE "$@" | tee "$report"
status=${PIPESTATUS[0]}
set -e
echo
echo "== drift report ($(date -u +%Y-%m-%d), $("$VENV/bin/python" -V)) =="
echo "versions that differ from requirements.lock (locked -> newest):"
"$VENV/bin/python" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' \
  | "$VENV/bin/python" scripts/lock_diff.py requirements.lock
echo "tests that fail:"
grep -E '^(FAILED|ERROR) ' "$report" || echo "  none"
tail -n 1 "$report"
rm -f "$report"
exit "$status"
