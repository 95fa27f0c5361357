"""Adding a migration is its file and its test: scripts/new_migration.py on a copy of the checkout writes those two
files and nothing else, and from them alone the migration is listed, checked, rendered by dry runs and named by the
docs drift check (which passes again after `scripts/build_docs.py`, the one command that regenerates the docs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import tree_digest

REPO = Path(__file__).resolve().parent.parent
WHAT = "demo_step"


def _checkout(tmp_path: Path) -> Path:
    """The checkout's source, tests and docs (the fixtures linked, not copied), importable from itself alone."""
    copy = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "fixtures*", "heldout")
    for name in ("ckpt_migrate", "migrations", "scripts", "tests", "docs"):
        shutil.copytree(REPO / name, copy / name, ignore=ignore)
    for name in ("README.md", "pyproject.toml", "setup.py"):
        shutil.copy2(REPO / name, copy / name)
    (copy / "tests" / "fixtures").symlink_to(REPO / "tests" / "fixtures")
    # the editable install maps ckpt_migrate.migrations to this repository's migrations/: the copy's own comes first
    (copy / "ckpt_migrate" / "migrations").symlink_to(copy / "migrations")
    return copy


def _run(copy: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    return subprocess.run([sys.executable, *map(str, args)], cwd=copy, env=env, capture_output=True, text=True)


def test_the_scaffold_writes_a_migration_and_its_test_and_nothing_else(tmp_path):
    copy = _checkout(tmp_path)
    before = tree_digest(copy)
    created = _run(copy, "scripts/new_migration.py", WHAT)
    assert created.returncode == 0, created.stderr
    number = max(int(p.name[1:5]) for p in (REPO / "migrations").glob("m[0-9]*.py")) + 1
    migration_id = f"{number:04d}_{WHAT}"
    new = {f"migrations/m{migration_id}.py", f"tests/test_m{migration_id}.py"}
    after = tree_digest(copy)
    assert set(after) - set(before) == new and all(after[n] == before[n] for n in before), "touched something else"
    again = _run(copy, "scripts/new_migration.py", WHAT)
    assert again.returncode == 2 and "already does" in again.stderr and tree_digest(copy) == after
    for lint in (("check",), ("format", "--check")):
        linted = _run(copy, "-m", "ruff", *lint, "--no-cache", *sorted(new))
        assert linted.returncode == 0, linted.stdout

    listed = _run(copy, "-m", "ckpt_migrate", "migrations")
    assert listed.returncode == 0 and migration_id in listed.stdout.splitlines(), listed.stderr
    contract = _run(copy, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_migration_contract.py")
    assert contract.returncode == 0, contract.stdout[-2000:]
    # an honest test: it fails until the author names the broken case and the migration repairs it
    own = _run(copy, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/test_m{migration_id}.py")
    assert own.returncode == 1 and "name the case the buggy release wrote" in own.stdout, own.stdout[-2000:]

    fixture = "tests/fixtures/llama_score/run/checkpoint-4"
    dry_run = _run(copy, "-m", "ckpt_migrate", "fix", fixture, "--dry-run", "--format", "json")
    assert dry_run.returncode == 0, dry_run.stderr
    assert migration_id in json.loads(dry_run.stdout)["checkpoints"][0]["migrations_not_needed"]  # checked, not needed

    stale = _run(copy, "scripts/build_docs.py", "--check")
    assert stale.returncode == 1 and "README.md" in stale.stderr and "scripts/build_docs.py" in stale.stderr
    docs = {n: d for n, d in tree_digest(copy).items() if n.endswith(".md")}
    assert _run(copy, "scripts/build_docs.py").returncode == 0
    assert _run(copy, "scripts/build_docs.py", "--check").returncode == 0
    rebuilt = {n: d for n, d in tree_digest(copy).items() if n.endswith(".md")}
    changed = {n for n in docs if rebuilt[n] != docs[n]}
    assert changed and all(migration_id in (copy / n).read_text() for n in changed)
