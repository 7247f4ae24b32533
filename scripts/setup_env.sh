# Sourced by demo.sh and test.sh: create .venv and install the locked package set once.
# requirements.lock (scripts/lock.sh) pins every package, the CPU build of torch included, so
# CI and users get what was tested. TORCH_SPEC replaces its torch pin (e.g. a CUDA build:
# TORCH_SPEC="torch==2.14.1"). The stamp covers the lock, TORCH_SPEC and the Python: when any
# of them changes, .venv is built anew, so that it holds exactly the lock (a package that left
# the lock leaves the venv too).
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-$(grep -i '^torch==' requirements.lock)}
stamp="$VENV/.requirements.sha"
want=$( { cat requirements.lock; echo "$TORCH_SPEC"; python3 -V; } | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup_env: requirements.lock, TORCH_SPEC or Python changed: rebuilding $VENV" >&2
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip >/dev/null
  # the lock is complete: no dependency is resolved afresh (pip check below proves it consistent)
  locked=$(mktemp)
  grep -iv '^torch==' requirements.lock > "$locked"
  python -m pip install -q --no-deps -r "$locked"
  rm -f "$locked"
  python -m pip install -q "$TORCH_SPEC"
  python -m pip check >/dev/null || { python -m pip check; echo "requirements.lock is inconsistent" >&2; return 1 2>/dev/null || exit 1; }
  echo "$want" > "$stamp"
fi
python -m pip show -q tdm >/dev/null 2>&1 || python -m pip install -q --no-deps -e .   # `import tdm` anywhere
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
