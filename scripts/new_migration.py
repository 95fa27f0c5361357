"""Start a migration: `.venv/bin/python scripts/new_migration.py <what_it_does>`.

Writes ``migrations/mNNNN_<what_it_does>.py`` (the next number) and ``tests/test_mNNNN_<what_it_does>.py`` from the
templates below, and nothing else: the index discovers the file, ``ckpt-migrate migrations`` lists it, dry runs
render it, and ``scripts/build_docs.py`` puts it in the docs' generated table. Both files pass ruff and the contract
check as written. The migration detects nothing until its ``detect`` is written (so the index may hold it safely);
the test fails until the author names the case the buggy release wrote and the migration repairs it.

A script of the source tree, not a ``ckpt-migrate`` verb: a migration is added to a checkout of this repository
(with its test and its fixture), never to an installed package.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MIGRATION = '''\
"""TODO: what broke, and why: which release wrote what, and which releases cannot load it (or load it wrong).

TODO: what this migration writes instead, why that computes the trained model, and what it refuses.
"""

from __future__ import annotations

from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.plan import CheckpointState

ID = "{id}"
SUMMARY = "TODO: one line, as `ckpt-migrate migrations` lists it"
CAUSED_BY = "TODO: the upstream release and issue (e.g. peft <= 0.12.0, huggingface/peft#2027)"
#: Whether the plan changes which tensors are trained, or their names: the planner then runs the migrations that
#: drop the stale optimizer and engine state (0003, 0009).
CHANGES_TRAINABLE_PARAMETERS = False


def detect(state: CheckpointState, context: Context) -> bool:
    """Whether the checkpoint is broken this way, from JSON, file sizes, safetensors headers and pickle opcodes."""
    return False  # TODO: detects nothing until written


def plan(state: CheckpointState, context: Context) -> None:
    """Edit ``state`` into what the repair writes (``add_tensor``, ``remove_tensor``, ``drop_file``, ``rewrite_file``,
    ``warn``), or append to ``state.unrecoverable`` the one-line reason to refuse (exit 4)."""
    raise NotImplementedError(f"{{ID}}: plan is not written yet")
'''

TEST = '''\
"""Migration {id}: a checkpoint the real buggy release wrote is detected and repaired.

The repair, loaded by real peft onto a base model whose head is random, reproduces the trained model's logits.
"""

from __future__ import annotations

from pathlib import Path

from conftest import load_case, run_cli
from logits_check import max_logit_error

from ckpt_migrate.migrations import m{id} as migration
from ckpt_migrate.planner import plan_checkpoint

#: TODO: the case the buggy release wrote (case.json, base/, run/checkpoint-N/, reference.safetensors), made by a
#: script kept in scripts/ (see scripts/make_fixtures.py) and committed under tests/.
CASE: Path | None = None
CHECKPOINT = "checkpoint-2"


def test_the_broken_checkpoint_is_detected_and_planned():
    assert CASE is not None, "name the case the buggy release wrote (CASE)"
    plan = plan_checkpoint(CASE / "run" / CHECKPOINT)
    assert migration.ID in plan.migrations and not plan.unrecoverable, plan.unrecoverable


def test_the_repair_reproduces_the_trained_logits(tmp_path):
    assert CASE is not None, "name the case the buggy release wrote (CASE)"
    out = tmp_path / CHECKPOINT
    result = run_cli("fix", CASE / "run" / CHECKPOINT, "--out", out, "--base-model", CASE / "base", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert max_logit_error(CASE, out, CHECKPOINT) <= load_case(CASE)["tolerance"]
'''


def next_number(migrations: Path) -> int:
    numbers = [int(p.name[1:5]) for p in migrations.glob("m[0-9][0-9][0-9][0-9]_*.py")]
    return max(numbers, default=0) + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", help="what the migration does, in snake_case (e.g. fold_double_wrapped_head)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to add it to (default: this one)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", args.what):
        parser.error(f"{args.what!r}: use snake_case letters and digits, e.g. drop_stale_optimizer")
    taken = sorted(p.name for p in (args.root / "migrations").glob(f"m[0-9][0-9][0-9][0-9]_{args.what}.py"))
    if taken:
        parser.error(f"{taken[0]} already does {args.what!r}: name the new step by what it does differently")
    migration_id = f"{next_number(args.root / 'migrations'):04d}_{args.what}"
    written = []
    for path, template in (
        (args.root / "migrations" / f"m{migration_id}.py", MIGRATION),
        (args.root / "tests" / f"test_m{migration_id}.py", TEST),
    ):
        with path.open("x", encoding="utf-8") as handle:  # never overwrite
            handle.write(template.format(id=migration_id))
        written.append(path)
    for path in written:
        print(f"wrote {path}")
    print(
        "next: write the fixture script and the case, fill in every TODO, then run "
        ".venv/bin/python scripts/build_docs.py (the migrations table and the example dry run are generated)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
