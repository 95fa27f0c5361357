"""Issue #5, hostile pickles: adapter_model.bin, optimizer.pt, rng_state.pth and the other Trainer pickles.

A pickle's code must never run: a hostile adapter is refused cleanly (see ``assert_refused`` in
tests/hostile_helpers.py for the contract), the Trainer's own pickles are copied as opaque bytes or dropped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tree_digest
from hostile_helpers import (
    Workspace,
    assert_complete_checkpoint,
    assert_refused,
    bart_workspace,
    make_workspace,
    staging_dirs,
    stderr_lines,
    write_hostile_pickle,
)

from ckpt_migrate.core.errors import EXIT_OK, EXIT_UNREADABLE

# ---------------------------------------------------------------- pickles


def test_hostile_pickle_payload_is_live(tmp_path: Path):
    """Control: the payload used below really runs when unpickled unsafely, so its absence later means something."""
    import pickle

    import torch

    for fmt in ("torch-zip", "torch-legacy", "pickle"):
        marker = tmp_path / f"ran-{fmt}"
        path = tmp_path / f"payload-{fmt}.bin"
        write_hostile_pickle(path, marker, fmt)
        if fmt == "pickle":
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
        assert marker.exists(), fmt


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "pickle"])
def test_hostile_adapter_model_bin_is_refused_without_running_it(tmp_path: Path, fmt: str):
    ws = make_workspace(tmp_path, "bert_bin")
    write_hostile_pickle(ws.src / "adapter_model.bin", ws.marker, fmt)
    # one format through a real process, the others in-process (same code path, no second torch import)
    result = ws.fix(inproc=fmt != "torch-zip")
    line = assert_refused(ws, result, EXIT_UNREADABLE, str(ws.src / "adapter_model.bin"), "pickle")
    assert "refused to load pickle safely" in line
    assert "\x1b" not in line and "weights_only" not in line, "torch's advice to load unsafely leaked through"


def test_hostile_adapter_model_bin_inspect(tmp_path: Path):
    ws = make_workspace(tmp_path, "bert_bin")
    write_hostile_pickle(ws.src / "adapter_model.bin", ws.marker)
    ws.snapshot()
    assert_refused(ws, ws.run("inspect", ws.src, inproc=True), EXIT_UNREADABLE, "adapter_model.bin")


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin"])
def test_hostile_trainer_pickles_are_never_unpickled(ws: Workspace, name: str):
    """training_args.bin, scheduler.pt, rng_state.pth: opaque bytes, copied byte for byte; optimizer.pt: dropped."""
    write_hostile_pickle(ws.src / name, ws.marker)
    result = ws.fix(inproc=True)
    assert result.returncode == EXIT_OK, result.stderr
    assert stderr_lines(result.stderr) == []
    assert not ws.marker.exists(), "pickle code ran"
    assert tree_digest(ws.src) == ws.digest
    manifest = assert_complete_checkpoint(ws.out)
    if name == "optimizer.pt":  # dropped by 0003 (stale parameter groups), unread
        assert not (ws.out / name).exists()
        assert name in manifest["files_removed"]
    else:
        assert (ws.out / name).read_bytes() == (ws.src / name).read_bytes()
    assert staging_dirs(ws.root) == []


def _numpy_rng_payload(path: Path, marker: Path) -> None:
    """An rng_state.pth that names numpy's ndarray global (what a real one does) and carries the payload."""
    import numpy as np
    import torch
    from hostile_helpers import Payload

    torch.save({"numpy": np.random.get_state(), "python": Payload(marker)}, path)


def test_hostile_rng_state_naming_numpy_is_never_unpickled(ws: Workspace):
    """A real-looking RNG state (the kind a migration may parse to rewrite) with a payload: never executed.

    Either copied untouched, or refused cleanly by whatever parses it; never loaded.
    """
    _numpy_rng_payload(ws.src / "rng_state.pth", ws.marker)
    result = ws.fix(inproc=True)
    assert not ws.marker.exists(), "pickle code ran"
    if result.returncode == EXIT_OK:
        assert stderr_lines(result.stderr) == []
        assert_complete_checkpoint(ws.out)
        assert (ws.out / "rng_state.pth").read_bytes() == (ws.src / "rng_state.pth").read_bytes()
        assert tree_digest(ws.src) == ws.digest
    else:
        assert_refused(ws, result, EXIT_UNREADABLE, str(ws.src / "rng_state.pth"))


def test_hostile_optimizer_with_remap_is_refused_cleanly(tmp_path: Path):
    ws = bart_workspace(tmp_path)
    write_hostile_pickle(ws.src / "optimizer.pt", ws.marker)
    result = ws.fix("--optimizer", "remap", inproc=True)
    assert not ws.marker.exists(), "pickle code ran"
    assert_refused(ws, result, EXIT_UNREADABLE, str(ws.src / "optimizer.pt"))
