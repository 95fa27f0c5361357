"""What a report looks like to the person or program reading it: JSON ends its line, Markdown keeps names."""

from __future__ import annotations

import json

from conftest import FIXTURES, LAYOUTS, run_cli

from ckpt_migrate import list_migrations

LLAMA = FIXTURES / "llama_score"


def test_json_reports_end_with_a_newline(tmp_path):
    for args in (
        ("fix", LLAMA / "run" / "checkpoint-4", "--dry-run"),
        ("fix", LLAMA / "run" / "checkpoint-4", "--out", tmp_path / "o", "--quiet"),
        ("inspect", LLAMA / "run"),
        ("migrations",),
    ):
        code, stdout, _ = run_cli(*args, "--format", "json")
        assert code in (0, 3), (args, code)
        assert stdout.endswith("}\n") or stdout.endswith("]\n"), (args, stdout[-20:])
        json.loads(stdout)  # one document, nothing after it


def test_migrations_as_markdown_is_a_table_of_every_migration():
    code, stdout, _ = run_cli("migrations", "--format", "markdown")
    lines = stdout.splitlines()
    assert code == 0
    assert lines[:2] == ["| id | summary | caused by |", "|---|---|---|"]
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| `{m.ID}`" for m in list_migrations()]


def test_markdown_labels_keep_file_names_as_written():
    code, stdout, _ = run_cli("fix", LLAMA / "run" / "checkpoint-4", "--dry-run", "--format", "markdown")
    assert code == 0
    assert "- **rng_state.pth numpy_globals (3):**" in stdout  # was "Rng_state.pth"
    assert "**Tensors removed (7)**" in stdout and "- **Warning:**" in stdout  # words are still capitalised
    code, stdout, _ = run_cli(
        "fix", LAYOUTS / "llama_two_adapters" / "run" / "checkpoint-2", "--dry-run", "--format", "markdown"
    )
    assert code == 0
    assert "**task_b/tensors removed (" in stdout and "Task_b" not in stdout


def test_remap_is_named_remap_in_the_report():
    src, base = LLAMA / "run" / "checkpoint-4", LLAMA / "base"
    code, remapped, _ = run_cli("fix", src, "--dry-run", "--optimizer", "remap", "--base-model", base)
    assert code == 0
    assert "0003_drop_stale_optimizer (--optimizer remap)" in remapped
    (row,) = [line for line in remapped.splitlines() if line.startswith("  optimizer.pt ")]
    assert "rewritten" in row and "remapped (--optimizer remap)" in row and "dropped  " not in row
    code, dropped, _ = run_cli("fix", src, "--dry-run")
    assert code == 0 and "--optimizer remap" not in dropped
    (row,) = [line for line in dropped.splitlines() if line.startswith("  optimizer.pt ")]
    assert "dropped" in row
