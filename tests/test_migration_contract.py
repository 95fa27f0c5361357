"""Every migration is one file in migrations/ that fulfils the contract, plus one test file of its own."""

from __future__ import annotations

import ast
from pathlib import Path

from ckpt_migrate.core.migration import Migration, RewritingMigration
from ckpt_migrate.migrations import MIGRATIONS

REPO = Path(__file__).resolve().parent.parent


def test_every_migration_file_is_discovered_in_number_order():
    files = sorted(p.stem for p in (REPO / "migrations").glob("m[0-9][0-9][0-9][0-9]_*.py"))
    assert [m.__name__.rsplit(".", 1)[-1] for m in MIGRATIONS] == files
    assert [m.ID for m in MIGRATIONS] == [f.removeprefix("m") for f in files]


def test_every_migration_fulfils_the_protocol_and_cites_its_cause():
    for migration in MIGRATIONS:
        assert isinstance(migration, Migration)
        assert migration.SUMMARY and "\n" not in migration.SUMMARY
        assert migration.CAUSED_BY and migration.__doc__


def test_every_migration_that_rewrites_files_has_a_writer():
    for migration in MIGRATIONS:
        source = Path(migration.__file__).read_text()
        plans_rewrites = "FileRewrite(" in source
        assert plans_rewrites == isinstance(migration, RewritingMigration), migration.ID


def test_every_migration_has_its_own_test_file():
    for migration in MIGRATIONS:
        assert (REPO / "tests" / f"test_m{migration.ID}.py").is_file(), f"add tests/test_m{migration.ID}.py"


def test_migrations_import_no_heavy_library_at_module_level():
    for migration in MIGRATIONS:
        tree = ast.parse(Path(migration.__file__).read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {"torch", "transformers", "peft", "numpy"}, migration.ID
