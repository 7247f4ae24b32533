# Sourced by demo.sh and test.sh: create .venv and install requirements once.
# On a machine without CUDA it installs the CPU build of torch first (TORCH_SPEC overrides).
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.requirements.sha"
want=$(cat requirements.txt requirements-dev.txt | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip >/dev/null
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q -r requirements.txt -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
