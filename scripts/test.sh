#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (the README's test command; CI runs this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh eval,test,ref
exec .venv/bin/python -m pytest -q -n 2 tests "$@"
