#!/usr/bin/env bash
# Set up both venvs (see setup.sh), lint, check the built wheel alone in a fresh venv (wheel_check.sh), then run the
# whole test suite (tests/test_docs.py checks the generated docs: scripts/build_docs.py --check).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --with-peft012
export CKPT_MIGRATE_OLD_PYTHON="$PWD/.venv-peft012/bin/python"
.venv/bin/ruff check .
./scripts/wheel_check.sh
.venv/bin/python -m pytest -q "$@"
