#!/usr/bin/env bash
# Create .venv with ckpt-migrate and its test tools. With --with-peft012, also create
# .venv-peft012 holding the buggy release (peft 0.12.0 + transformers 4.44.2 + numpy<2) that the
# tests use to prove repaired checkpoints load there too. Idempotent: reruns are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

installed() {  # installed VENV PACKAGE VERSION (a local label such as +cpu aside): from the package's metadata,
    # without importing it (torch: 3 s of CPU)
    "$1/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$2').split('+')[0] != '$3')" \
        2>/dev/null
}

ensure_venv() {  # ensure_venv DIR: a venv with the CPU torch wheel installed first
    [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
    # A bare `torch` requirement could pull a multi-GB CUDA build: pin the local CPU wheel first.
    installed "$1" torch 2.13.0 || "$1/bin/pip" install -q torch==2.13.0
}

ensure_venv .venv
# The editable install rebuilds an editable wheel every time (13 s of CPU): only when the checkout, or what it
# declares (pyproject.toml, setup.py), changed since the last one.
stamp=".venv/.ckpt-migrate-installed"
want="$PWD $(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/pip install -q -e ".[test]"
    echo "$want" >"$stamp"
fi
if [ "${1:-}" = "--with-peft012" ]; then
    ensure_venv .venv-peft012
    installed .venv-peft012 peft 0.12.0 && installed .venv-peft012 transformers 4.44.2 \
        || .venv-peft012/bin/pip install -q "peft==0.12.0" "transformers==4.44.2" "numpy<2" accelerate safetensors
fi
