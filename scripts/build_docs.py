"""Regenerate the parts of the docs that the code decides: `.venv/bin/python scripts/build_docs.py`.

A generated region sits between two marker comments, and only its inside is rewritten::

    <!-- generated: NAME (scripts/build_docs.py) -->
    ...
    <!-- end generated: NAME -->

NAME is one of :data:`GENERATORS`: the migrations table (ID and SUMMARY of ``ckpt_migrate.list_migrations()``)
and a dry-run report (the CLI run on a committed fixture). ``--check`` rewrites nothing and exits 1 when a region
differs from what the code gives now (tests/test_docs.py runs it), naming the command that brings it up to date.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DEFAULT_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = ".venv/bin/python scripts/build_docs.py"
# run from tests/fixtures: short paths
DRY_RUN_ARGS = ["fix", "llama_score/run/checkpoint-4", "--dry-run", "--base-model", "llama_score/base"]
BEGIN = re.compile(r"^<!-- generated: ", re.MULTILINE)
REGION = re.compile(
    r"(?P<begin>^<!-- generated: (?P<name>[\w-]+) \(scripts/build_docs\.py\) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- end generated: (?P=name) -->)",
    re.DOTALL | re.MULTILINE,
)


def migrations_table() -> str:
    """The known migrations in the order they run: the Markdown `ckpt-migrate migrations` prints, id and summary."""
    sys.path.insert(0, str(ROOT))
    from ckpt_migrate import list_migrations
    from ckpt_migrate.render import render_migrations

    return render_migrations(list_migrations(), "markdown", caused_by=False)


def dry_run_report() -> str:
    """`ckpt-migrate fix ... --dry-run` on the committed peft-0.12 Llama fixture, as the CLI prints it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "ckpt_migrate", *DRY_RUN_ARGS],
        cwd=FIXTURES,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"build_docs: `ckpt-migrate {' '.join(DRY_RUN_ARGS)}` exited {proc.returncode}: {proc.stderr}")
    return f"```text\n$ ckpt-migrate {' '.join(DRY_RUN_ARGS)}\n{proc.stdout}```\n"


GENERATORS: dict[str, Callable[[], str]] = {"migrations": migrations_table, "dry-run": dry_run_report}


def rebuild(text: str, outputs: dict[str, str], where: Path) -> str:
    """``text`` with every generated region's inside replaced by its generator's output."""

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in GENERATORS:
            sys.exit(f"build_docs: {where}: unknown generated region {name!r} (known: {', '.join(GENERATORS)})")
        if name not in outputs:
            outputs[name] = GENERATORS[name]()
        return match["begin"] + outputs[name] + match["end"]

    return REGION.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated region is stale")
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    outputs: dict[str, str] = {}
    stale: list[str] = []
    for path in args.files or DEFAULT_FILES:
        text = path.read_text()
        if len(BEGIN.findall(text)) != len(REGION.findall(text)):
            sys.exit(f"build_docs: {path}: a generated region has no matching end marker")
        new = rebuild(text, outputs, path)
        if new == text:
            continue
        stale.append(str(path))
        if not args.check:
            path.write_text(new)
            print(f"build_docs: regenerated {path}")
    if args.check and stale:
        print(
            f"build_docs: generated docs differ from what the code gives now: {', '.join(stale)}\n"
            f"run `{COMMAND}` and commit the result",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
