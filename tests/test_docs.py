"""The docs say what the code does: generated regions are current, links resolve, the README stays short."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
BUILD = ROOT / "scripts" / "build_docs.py"
COMMAND = ".venv/bin/python scripts/build_docs.py"
QUICKSTART = [
    "./scripts/setup.sh && .venv/bin/ckpt-migrate fix tests/fixtures/llama_score/run/checkpoint-4 --out example-fixed"
    " --base-model tests/fixtures/llama_score/base",
    "./scripts/test.sh",
]


def build_docs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, BUILD, *map(str, args)], capture_output=True, text=True, check=False)


def test_generated_docs_match_the_code():
    proc = build_docs("--check")
    assert proc.returncode == 0, f"the docs drifted from the code: run `{COMMAND}` and commit.\n{proc.stderr}"


def test_a_stale_region_fails_the_check_and_names_the_command(tmp_path):
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    stale = text.replace("| `0001_fold_double_wrapped_head` |", "| `0001_renamed_meanwhile` |", 1)
    assert stale != text, "the README has no generated migrations table"
    readme.write_text(stale)
    proc = build_docs("--check", readme)
    assert proc.returncode == 1 and COMMAND in proc.stderr and str(readme) in proc.stderr
    assert readme.read_text() == stale  # --check writes nothing
    assert build_docs(readme).returncode == 0
    assert readme.read_text() == text


def test_generated_regions_hold_every_migration_and_a_real_dry_run():
    sys.path.insert(0, str(ROOT))
    from ckpt_migrate import list_migrations

    readme = (ROOT / "README.md").read_text()
    for migration in list_migrations():
        summary = migration.SUMMARY.replace("|", "\\|")  # as a Markdown cell
        assert f"| `{migration.ID}` | {summary} |" in readme
    command = "$ ckpt-migrate fix llama_score/run/checkpoint-4 --dry-run --base-model llama_score/base"
    assert f"{command}\n== llama_score/run/checkpoint-4: repairable" in readme
    assert "proof: will run:" in readme


def test_an_unterminated_region_is_an_error(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- generated: migrations (scripts/build_docs.py) -->\nno end marker\n")
    proc = build_docs("--check", doc)
    assert proc.returncode != 0 and "no matching end marker" in proc.stderr


def test_readme_is_short_and_keeps_the_quickstart():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for command in QUICKSTART:
        assert f"\n{command}\n" in readme


def test_every_relative_link_in_the_docs_resolves():
    docs = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_build_docs_runs_from_a_copy_of_the_docs_only(tmp_path):
    """Regeneration needs nothing but the checkout: a copied doc with empty regions is filled in."""
    doc = tmp_path / "doc.md"
    shutil.copy(ROOT / "README.md", doc)
    text = doc.read_text()
    emptied = re.sub(
        r"(<!-- generated: [\w-]+ \(scripts/build_docs\.py\) -->\n).*?(<!-- end generated)",
        r"\1\2",
        text,
        flags=re.DOTALL,
    )
    doc.write_text(emptied)
    assert build_docs(doc).returncode == 0
    assert doc.read_text() == text
