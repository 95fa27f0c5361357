"""Issue #5, batches: one bad checkpoint in a run directory is refused, the others are still repaired."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tree_digest
from hostile_helpers import (
    CONFIG,
    FIXTURES,
    WEIGHTS,
    assert_complete_checkpoint,
    edit_json,
    make_workspace,
    staging_dirs,
    stderr_lines,
    write_hostile_pickle,
)

from ckpt_migrate.core.errors import EXIT_PARTIAL

# ---------------------------------------------------------------- batches


def _break_truncate(ckpt: Path) -> Path:
    path = ckpt / WEIGHTS
    path.write_bytes(path.read_bytes()[:-7])
    return path


def _break_pickle(ckpt: Path) -> Path:
    import shutil

    shutil.rmtree(ckpt)
    shutil.copytree(FIXTURES / "bert_bin" / "run" / "checkpoint-2", ckpt)
    write_hostile_pickle(ckpt / "adapter_model.bin", ckpt.parent.parent / "MARKER-pickle-code-ran")
    return ckpt / "adapter_model.bin"


def _break_symlink(ckpt: Path) -> Path:
    link = ckpt / "rng_state.pth"
    link.unlink()
    link.symlink_to("/etc/hostname")
    return link


def _break_config(ckpt: Path) -> Path:
    edit_json(ckpt / CONFIG, lambda c: c.update(r="four"))
    return ckpt / CONFIG


BATCH_BREAKS = {
    "truncated_safetensors": _break_truncate,
    "hostile_pickle": _break_pickle,
    "symlink_outside": _break_symlink,
    "bad_config": _break_config,
}


@pytest.mark.parametrize("breakage", BATCH_BREAKS)
def test_batch_with_one_bad_checkpoint_repairs_the_others(tmp_path: Path, breakage: str):
    import shutil

    ws = make_workspace(tmp_path, "llama_score", "checkpoint-2")
    run = ws.src.parent
    shutil.copytree(FIXTURES / "llama_score" / "run" / "checkpoint-4", run / "checkpoint-4")
    shutil.copytree(FIXTURES / "llama_score" / "run" / "checkpoint-2", run / "checkpoint-3")
    bad_file = BATCH_BREAKS[breakage](run / "checkpoint-3")
    ws.src = run
    ws.snapshot()

    result = ws.fix(inproc=True)
    assert "Traceback" not in result.stderr
    assert result.returncode == EXIT_PARTIAL, result.stderr
    (line,) = stderr_lines(result.stderr)
    assert line.startswith("ckpt-migrate: error: ") and str(bad_file) in line
    assert "checkpoint-3" in result.stdout and "written, NOT proven" in result.stdout
    assert sorted(p.name for p in ws.out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    for good in ("checkpoint-2", "checkpoint-4"):
        assert_complete_checkpoint(ws.out / good)
    assert tree_digest(run) == ws.digest
    assert staging_dirs(tmp_path) == []
    assert not ws.marker.exists()
