"""Every migration is one file in migrations/ that fulfils the contract, plus one test file of its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import ModuleType

import pytest

from ckpt_migrate.core.migration import (
    CONTRACT,
    OPTIONAL_HOOKS,
    REQUIRED_HOOKS,
    Migration,
    RewritingMigration,
    check_migration,
)
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


def _read_from_migrations(path: Path) -> set[str]:
    """Attributes the code at ``path`` reads from a migration module (bound as ``m`` or ``migration``)."""
    tree = ast.parse(path.read_text())
    names = {"m", "migration"}
    attributes = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)]
    return {n.attr for n in attributes if n.value.id in names}


def test_the_runner_asks_a_migration_for_nothing_outside_the_contract():
    """The planner, the executors and the reports read only what check_migration checks, and every hook of the
    contract is called by someone."""
    package = REPO / "ckpt_migrate"
    runner = [p for p in package.rglob("*.py") if re.search(r"\bMIGRATIONS\b|\bby_id\(|\bMigration\]", p.read_text())]
    assert {"planner.py", "write.py", "tensors.py", "render.py"} <= {p.name for p in runner}
    read = set().union(*map(_read_from_migrations, runner))
    assert read <= set(CONTRACT), f"add {sorted(read - set(CONTRACT))} to the contract (core/migration.py)"
    assert set(REQUIRED_HOOKS) | set(OPTIONAL_HOOKS) <= read, "a hook of the contract that nothing calls"


def test_trainable_parameters_changing_is_declared_by_the_migration_and_set_by_the_planner_only():
    for path in [*(REPO / "migrations").glob("*.py"), *(REPO / "ckpt_migrate").rglob("*.py")]:
        if path.name != "planner.py":
            assert not re.search(r"trainable_parameters_changed\s*(\|?=)", path.read_text()), path
    assert {m.ID for m in MIGRATIONS if m.CHANGES_TRAINABLE_PARAMETERS} >= {
        "0001_fold_double_wrapped_head",
        "0007_fold_double_wrapped_tuner_head",
    }


def _module(name: str = "ckpt_migrate.migrations.m9999_demo", **attrs) -> ModuleType:
    module = ModuleType(name)
    contract = {"ID": "9999_demo", "SUMMARY": "s", "CAUSED_BY": "c", "CHANGES_TRAINABLE_PARAMETERS": False}
    hooks = {"detect": lambda state, context: False, "plan": lambda state, context: None}
    module.__dict__.update({**contract, **hooks, **attrs})
    return module


def test_check_migration_refuses_what_the_runner_could_not_use():
    assert check_migration(_module()) is not None
    undeclared = _module()
    del undeclared.CHANGES_TRAINABLE_PARAMETERS
    refused = {
        "lacks CHANGES_TRAINABLE_PARAMETERS": undeclared,
        "must be True or False": _module(CHANGES_TRAINABLE_PARAMETERS="yes"),
        "compute must be a function of (tensor, read)": _module(compute=lambda tensor: None),
        "write must be a function of (rewrite, source, target, on_bytes)": _module(
            write=lambda rewrite, source, target: None
        ),
        "must be named m9999_demo.py": _module("ckpt_migrate.migrations.m9999_other"),
    }
    for message, module in refused.items():
        with pytest.raises(TypeError, match=re.escape(message)):
            check_migration(module)
