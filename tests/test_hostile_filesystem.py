"""Issue #5, hostile file systems: symlinks leaving the checkpoint, newlines in names, unreadable files.

Each is refused with one clean line (see ``assert_refused`` in tests/hostile_helpers.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_helpers import (
    CONFIG,
    WEIGHTS,
    Workspace,
    assert_refused,
    permissions_bind,
)

from ckpt_migrate.core.errors import EXIT_UNREADABLE

# ---------------------------------------------------------------- links and names


def _outside_file(ws: Workspace) -> Path:
    outside = ws.root / "outside.bin"
    outside.write_bytes(b"secret")
    return outside


def _outside_config(ws: Workspace) -> Path:
    """A perfectly valid config, but outside the checkpoint."""
    outside = ws.root / "config-copy.json"
    outside.write_bytes((ws.src / CONFIG).read_bytes())
    return outside


SYMLINK_CASES = {
    "file_to_outside": ("training_args.bin", _outside_file, "points outside the checkpoint"),
    "config_to_outside": (CONFIG, _outside_config, "points outside the checkpoint"),
    "weights_to_absolute_system_file": (WEIGHTS, lambda ws: Path("/etc/hostname"), "points outside the checkpoint"),
    "directory_to_outside": ("extra", lambda ws: Path("/etc"), "points outside the checkpoint"),
    "parent_escape": ("escape", lambda ws: Path(".."), "points outside the checkpoint"),
    "dangling": ("dangling.bin", lambda ws: ws.src / "does-not-exist", "cannot be resolved"),
    "loop": ("loop-a", lambda ws: ws.src / "loop-a", "cannot be resolved"),
}


@pytest.mark.parametrize("case", SYMLINK_CASES)
def test_symlink_leaving_the_checkpoint_is_refused(ws: Workspace, case: str):
    name, target, problem = SYMLINK_CASES[case]
    link, destination = ws.src / name, target(ws)
    if link.exists():
        link.unlink()
    link.symlink_to(destination)
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(link), problem)


def test_file_name_with_newline_stays_one_line(ws: Workspace):
    """A newline in a file name must not split the error line (nor forge a second 'ckpt-migrate:' line)."""
    link = ws.src / "evil\nckpt-migrate: forged line"
    link.symlink_to("/etc/hostname")
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, "points outside the checkpoint")


# ---------------------------------------------------------------- permissions


@pytest.mark.parametrize("name", ["training_args.bin", WEIGHTS, CONFIG, "subdir"])
def test_unreadable_file_is_refused(ws: Workspace, name: str):
    path = ws.src / name
    if name == "subdir":
        path.mkdir()
        (path / "global_step2.pt").write_bytes(b"state")
    ws.snapshot()
    mode = path.stat().st_mode
    path.chmod(0)
    try:
        preexec, skip = permissions_bind(path, "r")
        if skip:
            pytest.skip(skip)
        result = ws.fix(preexec_fn=preexec)
        path.chmod(mode)
        problem = "cannot list directory: Permission denied" if name == "subdir" else "permission denied"
        assert_refused(ws, result, EXIT_UNREADABLE, str(path), problem)
    finally:
        path.chmod(mode)
