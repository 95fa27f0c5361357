"""Issue #5, the output location: --out refusals, write errors (disk full, file too large), interruptions.

Nothing is ever published half-written: refusals follow ``assert_refused`` (tests/hostile_helpers.py), an
interrupted run leaves no staging directory, and a run after a SIGKILL cleans up the one left behind.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import tree_digest
from hostile_helpers import (
    Workspace,
    assert_complete_checkpoint,
    assert_refused,
    fsize_limit_preexec,
    mount_small_tmpfs,
    permissions_bind,
    run_cli_subprocess,
    staging_dirs,
    stderr_lines,
    unmount,
)

from ckpt_migrate.core.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_OUTPUT

# ---------------------------------------------------------------- the output location


def test_out_existing_and_non_empty_is_refused(ws: Workspace):
    ws.out.mkdir()
    (ws.out / "precious.txt").write_text("keep me")
    ws.snapshot()
    result = ws.fix()
    (ws.out / "precious.txt").rename(ws.root / "precious.txt")
    ws.out.rmdir()
    assert_refused(ws, result, EXIT_OUTPUT, str(ws.out), "not an empty directory")
    assert (ws.root / "precious.txt").read_text() == "keep me"


def test_out_existing_file_is_refused(ws: Workspace):
    ws.out.write_text("a file")
    ws.snapshot()
    result = ws.fix()
    assert ws.out.read_text() == "a file"
    ws.out.unlink()
    assert_refused(ws, result, EXIT_OUTPUT, str(ws.out), "not an empty directory")


def test_out_equal_to_src_is_refused(ws: Workspace):
    ws.out = ws.src
    ws.snapshot()
    result = ws.run("fix", ws.src, "--out", ws.src)
    assert "Traceback" not in result.stderr
    assert result.returncode == EXIT_OUTPUT
    (line,) = stderr_lines(result.stderr)
    assert str(ws.src) in line and "must not be the source" in line
    assert tree_digest(ws.src) == ws.digest
    assert staging_dirs(ws.src.parent) == []


def test_out_inside_src_is_refused(ws: Workspace):
    ws.out = ws.src / "fixed"
    assert_refused(ws, ws.fix(), EXIT_OUTPUT, str(ws.out), "must not be the source or inside it")


def test_out_containing_src_is_refused(ws: Workspace):
    ws.snapshot()
    result = ws.run("fix", ws.src, "--out", ws.src.parent, "--quiet")
    assert result.returncode == EXIT_OUTPUT
    (line,) = stderr_lines(result.stderr)
    assert str(ws.src.parent) in line and "must not contain the source" in line
    assert tree_digest(ws.src) == ws.digest


def test_out_parent_is_a_file_is_refused(ws: Workspace):
    blocker = ws.root / "blocker"
    blocker.write_text("x")
    ws.out = blocker / "out"
    assert_refused(ws, ws.fix(), EXIT_OUTPUT, str(blocker), "not a directory")


def test_out_parent_missing_is_refused(ws: Workspace):
    ws.out = ws.root / "missing" / "out"
    assert_refused(ws, ws.fix(), EXIT_OUTPUT, str(ws.root / "missing"), "does not exist")


def test_out_symlink_loop_is_refused(ws: Workspace):
    ws.out.symlink_to(ws.out)
    ws.snapshot()
    result = ws.fix()
    ws.out.unlink()
    assert_refused(ws, result, EXIT_OUTPUT, str(ws.out))


def test_out_in_read_only_directory_is_refused(ws: Workspace):
    parent = ws.root / "read-only"
    parent.mkdir()
    ws.out = parent / "out"
    parent.chmod(0o555)
    try:
        preexec, skip = permissions_bind(parent, "w")
        if skip:
            pytest.skip(skip)
        assert_refused(ws, ws.fix(preexec_fn=preexec), EXIT_OUTPUT, str(parent), "not writable")
    finally:
        parent.chmod(0o755)


# ---------------------------------------------------------------- write errors


def _assert_write_failed(ws: Workspace, result: subprocess.CompletedProcess, problem: str) -> None:
    line = assert_refused(ws, result, EXIT_OUTPUT, str(ws.out.parent), problem)
    assert "writing failed" in line


def test_disk_full_mid_write_on_a_tiny_tmpfs(ws: Workspace):
    disk = ws.root / "disk"
    disk.mkdir()
    if not mount_small_tmpfs(disk, "16k"):  # four pages: the ~40 kB checkpoint cannot fit
        pytest.skip("cannot mount a tmpfs here (needs root); test_file_too_large_mid_write covers the write error")
    try:
        ws.out = disk / "out"
        _assert_write_failed(ws, ws.fix(inproc=True), "No space left on device")
        assert list(disk.iterdir()) == []
    finally:
        unmount(disk)


def test_file_too_large_mid_write(ws: Workspace):
    """RLIMIT_FSIZE below README.md's size: the first copied file fails with EFBIG, as on a full disk."""
    _assert_write_failed(ws, ws.fix(preexec_fn=fsize_limit_preexec(4096)), "File too large")


# ---------------------------------------------------------------- interrupted writes


def _start_paused_fix(ws: Workspace) -> tuple[subprocess.Popen, Path]:
    """Start ``fix`` and return once it is mid-write: a file half-copied into the staging directory."""
    ready = ws.root / "ready"
    ws.snapshot()

    proc = run_cli_subprocess(
        "fix",
        ws.src,
        "--out",
        ws.out,
        "--quiet",
        env={"HOSTILE_READY": str(ready)},
        pause_mid_write=True,
        wait=False,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"fix never reached the write: exit {proc.returncode}\n{err}")
        time.sleep(0.02)
    partial = Path(ready.read_text())
    (staging,) = staging_dirs(ws.root)
    assert partial.is_relative_to(staging) and partial.exists()
    return proc, staging


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_write_publishes_nothing(ws: Workspace, signum: int):
    proc, staging = _start_paused_fix(ws)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr
    assert proc.returncode == EXIT_INTERRUPTED
    (line,) = stderr_lines(stderr)
    assert line == "ckpt-migrate: interrupted; nothing was published"
    assert not staging.exists() and staging_dirs(ws.root) == []
    assert not ws.out.exists()
    assert tree_digest(ws.src) == ws.digest


def test_sigkill_mid_write_then_next_run_cleans_up_and_succeeds(ws: Workspace):
    proc, staging = _start_paused_fix(ws)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert staging.is_dir(), "a killed run cannot clean up; the next one must"
    assert not ws.out.exists()

    result = ws.run("fix", ws.src, "--out", ws.out, "--quiet", inproc=True)
    assert result.returncode == EXIT_OK, result.stderr
    assert stderr_lines(result.stderr) == []
    assert not staging.exists() and staging_dirs(ws.root) == []
    assert_complete_checkpoint(ws.out)
    assert tree_digest(ws.src) == ws.digest
