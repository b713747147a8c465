#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the project with the pinned versions in
# requirements/constraints.txt. Usage: scripts/setup_env.sh [EXTRAS], default "eval".
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-eval}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q -U pip
fi
.venv/bin/pip install -q -c requirements/constraints.txt -e ".[$EXTRAS]"
