"""Unchanged bytes are copied by the kernel; where it refuses, the output is the same, byte for byte.

Also: the new adapter keeps the source's data alignment within 4 KiB blocks (so a reflinking filesystem
can share blocks), and stays a file that ``safetensors`` and our own reader accept, tensor for tensor.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from safetensors import safe_open

from ckpt_migrate import fix
from ckpt_migrate.formats import files
from ckpt_migrate.formats.safetensors import read_header

CHECKPOINT = FIXTURES / "llama_score" / "run" / "checkpoint-2"
WEIGHTS = "adapter_model.safetensors"


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def refuse(error: int):
    def refused(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    return refused


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kernel") / "out"
    assert fix(CHECKPOINT, out, progress=False).exit_code == 0
    return out


@pytest.mark.parametrize(
    "refused",
    [
        {"copy_file_range": errno.EXDEV},
        {"copy_file_range": errno.ENOSYS, "sendfile": errno.EINVAL},
        {"copy_file_range": errno.EOPNOTSUPP, "sendfile": errno.ENOTSOCK},
    ],
    ids=["no-copy_file_range", "no-kernel-copy", "sendfile-sockets-only"],
)
def test_output_is_identical_when_the_kernel_refuses_to_copy(tmp_path, monkeypatch, reference, refused):
    for name, error in refused.items():
        monkeypatch.setattr(os, name, refuse(error))
    out = tmp_path / "out"
    assert fix(CHECKPOINT, out, progress=False).exit_code == 0
    assert tree_bytes(out).keys() == tree_bytes(reference).keys()
    for name, data in tree_bytes(reference).items():
        if name != "ckpt_migrate_manifest.json":
            assert tree_bytes(out)[name] == data, name


def test_a_filesystem_that_copies_nothing_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)  # procfs / some FUSE filesystems do this
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(os.urandom(3 * files.BLOCK_BYTES + 5))
    assert files.copy_file(source, target) == hashlib.sha256(source.read_bytes()).hexdigest()
    assert target.read_bytes() == source.read_bytes()


def test_a_range_copy_lands_at_its_offsets(tmp_path):
    source = tmp_path / "source"
    source.write_bytes(os.urandom(10_000))
    target = tmp_path / "target"
    target.write_bytes(b"\0" * 12_000)
    with open(source, "rb") as src, open(target, "r+b") as dst:
        files.copy_range(src.fileno(), 1_000, dst.fileno(), 4_000, 8_000)
    data = target.read_bytes()
    assert data[4_000:12_000] == source.read_bytes()[1_000:9_000]
    assert data[:4_000] == b"\0" * 4_000


def test_manifest_hashes_are_the_files_as_written(reference):
    manifest = json.loads((reference / "ckpt_migrate_manifest.json").read_text())
    for name, digest in manifest["outputs_sha256"].items():
        assert hashlib.sha256((reference / name).read_bytes()).hexdigest() == digest, name
    for name, digest in manifest["inputs_sha256"].items():
        assert hashlib.sha256((CHECKPOINT / name).read_bytes()).hexdigest() == digest, name


def test_new_adapter_keeps_the_source_block_phase_and_loads_everywhere(reference):
    source, ours = read_header(CHECKPOINT / WEIGHTS), read_header(reference / WEIGHTS)
    assert ours.data_start % files.BLOCK_BYTES == source.data_start % files.BLOCK_BYTES
    with safe_open(reference / WEIGHTS, "pt") as handle:
        assert set(handle.keys()) == set(ours.tensors)
        for name, info in ours.tensors.items():
            tensor = handle.get_tensor(name)
            assert tuple(tensor.shape) == info.shape
            assert tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() == ours.read_bytes(name)


def test_an_early_writeback_error_is_raised_not_lost(tmp_path, monkeypatch):
    """The kernel reports a writeback error to a file descriptor once: if the background fdatasync got it, the
    writer must raise it (the final fsync would not see it again)."""
    import errno

    from ckpt_migrate.formats import files

    def failing(fd):
        raise OSError(errno.EIO, "simulated writeback failure")

    monkeypatch.setattr(files.os, "fdatasync", failing)
    with open(tmp_path / "f", "wb") as handle:
        writeback = files.EarlyWriteback(handle.fileno())
        writeback.wrote(files.EarlyWriteback.MIN_BYTES)
        writeback.pause()
        with pytest.raises(OSError, match="simulated writeback failure"):
            writeback.join()


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 3 * 4096 + 17, 10 * 4096])
def test_mapped_hashes_equal_sha256_across_window_edges(tmp_path, monkeypatch, size):
    """Hashes read the page cache through maps of WINDOW_BYTES: every window edge, aligned or not, and
    a file followed while it grows in uneven steps give hashlib's digest of the whole file."""
    from ckpt_migrate.formats import digests

    monkeypatch.setattr(digests, "WINDOW_BYTES", 3 * 4096)
    data = os.urandom(size)
    expected = hashlib.sha256(data).hexdigest()
    (tmp_path / "whole").write_bytes(data)
    assert digests.sha256_file(tmp_path / "whole") == expected
    with open(tmp_path / "grown", "wb", buffering=0) as handle:
        following = digests.FollowingSha256(tmp_path / "grown")
        for start in range(0, size, 5000):
            following.advance(handle.write(data[start : start + 5000]))
        assert following.hexdigest() == expected


def test_writeback_starts_while_a_big_file_is_still_being_copied(tmp_path, monkeypatch):
    """Dirty pages go to disk from the first STEP_BYTES on, not only at the end (the final fsync then has
    little left, as with cp's background writeback)."""
    synced = []
    monkeypatch.setattr(files.os, "fdatasync", synced.append)
    with open(tmp_path / "f", "wb") as handle:
        writeback = files.EarlyWriteback(handle.fileno())
        writeback.wrote(files.EarlyWriteback.STEP_BYTES - 1)
        writeback.join()
        assert synced == []
        writeback.wrote(1)
        writeback.join()
        assert synced == [handle.fileno()]


def test_a_source_truncated_while_hashed_is_an_input_error_not_a_crash(tmp_path, monkeypatch):
    """Reading a map past a truncated file's end would kill the process (SIGBUS): the size is checked
    before every window, and the change is reported as the input's fault."""
    from ckpt_migrate.core.errors import UnreadableInputError
    from ckpt_migrate.formats import digests

    monkeypatch.setattr(digests, "WINDOW_BYTES", 4096)
    source = tmp_path / "adapter_model.safetensors"
    source.write_bytes(os.urandom(5 * 4096))

    def truncate_after_first_window(count: int) -> None:
        os.truncate(source, 4096)

    with pytest.raises(UnreadableInputError, match="changed while it was read"):
        digests.sha256_file(source, truncate_after_first_window)
