#!/usr/bin/env bash
# Create .venv with ckpt-migrate and its test tools. With --with-peft012, also create
# .venv-peft012 holding the buggy release (peft 0.12.0 + transformers 4.44.2 + numpy<2) that the
# tests use to prove repaired checkpoints load there too. Idempotent: reruns are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

ensure_venv() {  # ensure_venv DIR: a venv with the CPU torch wheel installed first
    [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
    # A bare `torch` requirement could pull a multi-GB CUDA build: pin the local CPU wheel first.
    "$1/bin/python" -c "import torch" 2>/dev/null || "$1/bin/pip" install -q torch==2.13.0
}

ensure_venv .venv
.venv/bin/pip install -q -e ".[test]"
if [ "${1:-}" = "--with-peft012" ]; then
    ensure_venv .venv-peft012
    .venv-peft012/bin/python -c "import peft, transformers; assert peft.__version__ == '0.12.0'" 2>/dev/null \
        || .venv-peft012/bin/pip install -q "peft==0.12.0" "transformers==4.44.2" "numpy<2" accelerate safetensors
fi
