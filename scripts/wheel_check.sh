#!/usr/bin/env bash
# Prove the package as users get it: build the sdist and, from it, the wheel (as `python -m build` does), install
# the wheel alone into a fresh venv (CPU torch first; no -e), then, from a directory outside the checkout and with
# the checkout not on sys.path: import every module the source tree has, run `ckpt-migrate --help`, repair a copy
# of a committed fixture and verify the repair with real peft. Every venv of the test suite is editable, so this
# is the only check that the wheel holds every subpackage. Needs .venv (scripts/setup.sh) for `build`.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ckpt-migrate-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say() { echo "wheel_check: [${SECONDS}s] $*"; }
fail() { echo "wheel_check: FAILED: $*" >&2; exit 1; }

.venv/bin/python -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; fail "build"; }
SDIST=$(ls "$WORK"/dist/*.tar.gz)
WHEEL=$(ls "$WORK"/dist/*.whl)
say "built $(basename "$SDIST") and $(basename "$WHEEL")"

"$PYTHON" -m venv "$WORK/venv"
# A bare `torch` requirement could pull a multi-GB CUDA build: pin the CPU wheel first. --no-compile: byte-compiling
# all of torch takes longer than the whole check needs; modules compile as they are imported.
pip_install() { "$WORK/venv/bin/pip" install -q --no-compile "$@" >>"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log" >&2; fail "pip install $*"; }; }
pip_install torch==2.13.0
pip_install "$WHEEL"
say "installed $(basename "$WHEEL") alone into a fresh venv"

cd "$WORK"  # nothing of the checkout is importable from here
export PYTHONPATH= PYTHONSAFEPATH=1
# Every module the source tree has (ckpt_migrate/**.py, and migrations/**.py as ckpt_migrate.migrations.*) must be
# importable from the installed package, and be imported from there.
"$WORK/venv/bin/python" - "$REPO" <<'PY' || fail "the installed package lacks modules of the source tree"
import importlib
import importlib.util
import sys
from pathlib import Path

repo = Path(sys.argv[1]).resolve()
assert not any(Path(p or ".").resolve() == repo for p in sys.path), f"the checkout is on sys.path: {sys.path}"


def modules(root: Path, package: str) -> set[str]:
    names = set()
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.add(".".join([package, *parts]))
    return names


expected = sorted(modules(repo / "ckpt_migrate", "ckpt_migrate") | modules(repo / "migrations", "ckpt_migrate.migrations"))
missing = []
for name in expected:
    try:
        if name.endswith(".__main__"):  # importing it would run the CLI: found, not imported
            spec = importlib.util.find_spec(name)
            if spec is None:
                raise ImportError(f"No module named {name!r}")
            origin = spec.origin
        else:
            origin = importlib.import_module(name).__file__
    except ImportError as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
        continue
    assert repo not in Path(origin).resolve().parents, f"{name} was imported from the checkout: {origin}"
if missing:
    sys.exit("not importable from the wheel: " + "; ".join(missing))
print(f"wheel_check: imported all {len(expected)} modules from {Path(importlib.import_module('ckpt_migrate').__file__).parent}")
PY

"$WORK/venv/bin/ckpt-migrate" --help >help.txt 2>&1 || { cat help.txt >&2; fail "ckpt-migrate --help"; }
grep -q "Commands:" help.txt || fail "ckpt-migrate --help printed no command list"
say "ckpt-migrate --help: ok"

cp -r "$REPO/tests/fixtures/llama_score" case
code=0
"$WORK/venv/bin/ckpt-migrate" fix case/run/checkpoint-4 --out fixed --format json --quiet >fix.json 2>fix.err || code=$?
[ "$code" = 0 ] || { cat fix.err >&2; fail "ckpt-migrate fix exited $code"; }
"$WORK/venv/bin/python" - <<'PY' || fail "the fix report or output is not what a repair gives"
import json
from pathlib import Path

report = json.loads(Path("fix.json").read_text())
entry = report["checkpoints"][0]
assert report["exit_code"] == 0 and entry["status"] == "repaired", (report["exit_code"], entry["status"])
assert "0001_fold_double_wrapped_head" in entry["migrations"], entry["migrations"]
manifest = json.loads(Path("fixed/ckpt_migrate_manifest.json").read_text())
assert "0001_fold_double_wrapped_head" in manifest["migrations_applied"], manifest
print(f"wheel_check: fix: repaired with {', '.join(entry['migrations'])}")
PY
code=0
"$WORK/venv/bin/ckpt-migrate" verify fixed --base-model case/base --source case/run/checkpoint-4 >verify.txt 2>&1 || code=$?
[ "$code" = 0 ] && grep -q "^OK: " verify.txt || { cat verify.txt >&2; fail "ckpt-migrate verify exited $code"; }
say "verify: $(head -1 verify.txt)"
say "passed"
