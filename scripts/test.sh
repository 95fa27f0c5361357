#!/usr/bin/env bash
# Set up both venvs (see setup.sh), then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --with-peft012
export CKPT_MIGRATE_OLD_PYTHON="$PWD/.venv-peft012/bin/python"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
