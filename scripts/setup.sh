#!/usr/bin/env bash
# Create .venv and install chexmask-stream with its test tools. Idempotent and quick
# when nothing changed. Torch is installed first and pinned, so that no resolver
# pulls another (multi-GB) build: TORCH_SPEC overrides it, e.g. "torch==2.14.1" for CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp="$VENV/.chexmask-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (first run takes a few minutes)..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
log="$VENV/setup.log"
: > "$log"
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >>"$log" 2>&1 \
    || { tail -n 40 "$log" >&2; echo "setup failed: pip install $* (full log: $log)" >&2; exit 1; }
}
pip install --upgrade pip
pip install "$TORCH_SPEC"
pip install -e ".[dev]"
"$VENV/bin/python" -c "import torch, torch_geometric, cv2, pydicom, celery, sqlmodel" || { echo "setup failed: imports do not work" >&2; exit 1; }
echo "$want" > "$stamp"
