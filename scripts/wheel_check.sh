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

# Build from the files a clone has (tracked, plus new files not ignored): a stale ckpt_migrate.egg-info left in the
# working tree by an earlier build lists every module, and setuptools would ship modules the package list leaves
# out as package data, hiding exactly the fault this check is for.
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$WORK/src"
.venv/bin/python -m build --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 \
    || { cat "$WORK/build.log" >&2; fail "build"; }
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
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

repo = Path(sys.argv[1]).resolve()
assert not any(Path(p or ".").resolve() == repo for p in sys.path), f"the checkout is on sys.path: {sys.path}"


def sources(directory: str, installed_as: str) -> dict[str, str]:
    """Installed file (as the wheel's RECORD names it) -> module name, for every .py below ``directory``."""
    files = {}
    for path in (repo / directory).rglob("*.py"):
        relative = path.relative_to(repo / directory).as_posix()
        parts = [*installed_as.split("/"), *Path(relative).with_suffix("").parts]
        files[f"{installed_as}/{relative}"] = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return files


expected = sources("ckpt_migrate", "ckpt_migrate") | sources("migrations", "ckpt_migrate/migrations")
installed = {f.as_posix() for f in importlib.metadata.files("ckpt-migrate")}
absent = sorted(set(expected) - installed)
problems = []
if absent:
    folders = sorted({str(Path(f).parent) for f in absent})
    problems.append(f"the wheel lacks {len(absent)} of {len(expected)} modules, in {', '.join(f + '/' for f in folders)}")
errors = {}
for name in sorted(expected.values()):
    try:
        if name.endswith(".__main__"):  # importing it would run the CLI: found, not imported
            spec = importlib.util.find_spec(name)
            if spec is None:
                raise ImportError(f"No module named {name!r}")
            origin = spec.origin
        else:
            origin = importlib.import_module(name).__file__
    except ImportError as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"
        continue
    assert repo not in Path(origin).resolve().parents, f"{name} was imported from the checkout: {origin}"
if errors:
    first = next(iter(errors))
    problems.append(f"{len(errors)} modules do not import from the wheel, the first: {first} ({errors[first]})")
if problems:
    sys.exit("\n".join(problems))
print(f"wheel_check: imported all {len(expected)} modules from {Path(importlib.import_module('ckpt_migrate').__file__).parent}")
PY

"$WORK/venv/bin/ckpt-migrate" --help >help.txt 2>&1 || { cat help.txt >&2; fail "ckpt-migrate --help"; }
grep -q "Commands:" help.txt || fail "ckpt-migrate --help printed no command list"
say "ckpt-migrate --help: ok"

cp -r "$REPO/tests/fixtures/llama_score" case
code=0
"$WORK/venv/bin/ckpt-migrate" fix case/run/checkpoint-4 --out fixed --base-model case/base --format json --quiet >fix.json 2>fix.err || code=$?
[ "$code" = 0 ] || { cat fix.err >&2; fail "ckpt-migrate fix exited $code"; }
"$WORK/venv/bin/python" - <<'PY' || fail "the fix report or output is not what a repair gives"
import json
from pathlib import Path

report = json.loads(Path("fix.json").read_text())
entry = report["checkpoints"][0]
assert report["exit_code"] == 0 and entry["status"] == "repaired", (report["exit_code"], entry["status"])
assert "0001_fold_double_wrapped_head" in entry["migrations"], entry["migrations"]
assert entry["proof"]["state"] == "proven" and entry["reproduces"]["shown"] == "numerically", entry
manifest = json.loads(Path("fixed/ckpt_migrate_manifest.json").read_text())
assert "0001_fold_double_wrapped_head" in manifest["migrations_applied"], manifest
print(f"wheel_check: fix: repaired with {', '.join(entry['migrations'])}; reproduces: {entry['reproduces']['text']}")
PY
code=0
"$WORK/venv/bin/ckpt-migrate" verify fixed --base-model case/base --source case/run/checkpoint-4 >verify.txt 2>&1 || code=$?
[ "$code" = 0 ] && grep -q "^OK: " verify.txt || { cat verify.txt >&2; fail "ckpt-migrate verify exited $code"; }
say "verify: $(head -1 verify.txt)"
say "passed"
