#!/usr/bin/env bash
# Runs the test suite (installing what it needs on first use).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec "$PY" -m pytest -q "$@"
