"""Builders and assertions for the hostile-input tests (tests/test_hostile_inputs.py, tests/test_safetensors_fuzz.py).

Everything here works on copies of the real peft 0.12 fixtures under ``tests/fixtures``; the fixtures
themselves are never modified.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent
STAGING_MARK = ".ckpt-migrate-staging-"

#: Runs the CLI with ``writer.copy_file`` wrapped so that, after the first chunk of the first copied file
#: has been written into the staging directory, it creates ``$HOSTILE_READY`` and sleeps: a deterministic
#: "mid-write" moment to deliver a signal at. Nothing in the package is changed.
PAUSING_CLI = """
import os, sys, time
from pathlib import Path
import ckpt_migrate.formats.files as files

_copy_file = files.copy_file

def copy_file(source, target, on_bytes=None):
    def pause(n):
        if on_bytes:
            on_bytes(n)
        Path(os.environ["HOSTILE_READY"]).write_text(str(target))
        time.sleep(120)
    return _copy_file(source, target, pause)

files.copy_file = copy_file
from ckpt_migrate.cli import main
sys.argv[0] = "ckpt-migrate"
main()
"""


# ---------------------------------------------------------------- checkpoints


def copy_checkpoint(case: str, dest: Path, checkpoint: str = "checkpoint-2") -> Path:
    """Copy ``tests/fixtures/<case>/run/<checkpoint>`` to ``dest`` and return ``dest``."""
    shutil.copytree(FIXTURES / case / "run" / checkpoint, dest, symlinks=True)
    return dest


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry below ``root``: file sha256, symlink target, or directory, with its mode bits."""
    digest: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if path.is_symlink():
                digest[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                digest[rel] = f"dir:{st.st_mode:o}"
            else:
                digest[rel] = f"file:{st.st_mode:o}:{_sha256(path, st.st_mode)}"
    return digest


def _sha256(path: Path, mode: int) -> str:
    if mode & 0o444 == 0 and os.geteuid() != 0:
        return "unreadable"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except PermissionError:
        return "unreadable"


def staging_dirs(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if STAGING_MARK in p.name) if parent.is_dir() else []


# ---------------------------------------------------------------- safetensors


def read_safetensors_raw(path: Path) -> tuple[dict, bytes]:
    """The parsed JSON header and the raw data section of a (valid) safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors_raw(path: Path, header: dict | bytes | str, data: bytes) -> None:
    """Write a length prefix, ``header`` (a dict is JSON-encoded as is, never validated) and ``data``."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def load_tensors(path: Path) -> tuple[dict[str, tuple[str, list[int], bytes]], dict]:
    """name -> (dtype, shape, bytes) for a valid file, plus its ``__metadata__``."""
    header, data = read_safetensors_raw(path)
    metadata = header.pop("__metadata__", {})
    tensors = {
        name: (e["dtype"], e["shape"], data[e["data_offsets"][0] : e["data_offsets"][1]]) for name, e in header.items()
    }
    return tensors, metadata


def save_tensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None) -> None:
    """Encode tensors contiguously (no validation of shape against bytes: callers may lie on purpose)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    chunks, offset = [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    write_safetensors_raw(path, header, b"".join(chunks))


def edit_tensors(path: Path, edit: Callable[[dict[str, tuple[str, list[int], bytes]]], None]) -> None:
    tensors, metadata = load_tensors(path)
    edit(tensors)
    save_tensors(path, tensors, metadata)


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value, indent=2))


# ---------------------------------------------------------------- pickles


class Payload:
    """Unpickling this with plain ``pickle`` (or ``torch.load(weights_only=False)``) creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_hostile_pickle(path: Path, marker: Path, fmt: str = "torch-zip") -> None:
    """A pickle that creates ``marker`` when unpickled unsafely, in one of the formats torch.load reads."""
    import pickle

    state = {"base_model.model.classifier.lora_A.weight": Payload(marker)}
    if fmt == "pickle":
        path.write_bytes(pickle.dumps(state, protocol=2))
        return
    import torch

    torch.save(state, path, _use_new_zipfile_serialization=fmt == "torch-zip")


# ---------------------------------------------------------------- running


def run_cli(*args: str | os.PathLike, preexec_fn=None, timeout: float = 120, env: dict | None = None):
    """Run ``python -m ckpt_migrate ARGS`` in a fresh process (the real entry point, real stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "ckpt_migrate", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def stderr_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# ---------------------------------------------------------------- privileges and limits

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


def _drop_dac_capabilities() -> None:
    """preexec_fn: as root, give up the capabilities that bypass file permissions, for the child only.

    Dropping them from the bounding set (inheritable is empty) means the exec'd child has neither in its
    permitted nor effective set, so chmod 000 and read-only directories apply to it as to any user.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def permission_preexec():
    """A preexec_fn under which file permissions bind (None when not root), or None plus a skip reason."""
    if os.geteuid() != 0:
        return None, None
    return _drop_dac_capabilities, None


def permissions_bind(path: Path, mode: str = "r") -> tuple[object, str | None]:
    """(preexec_fn, skip_reason): check a child process really is refused ``mode`` access to ``path``."""
    preexec, _ = permission_preexec()
    probe = f"import os, sys; sys.exit(0 if os.access({str(path)!r}, os.{'R' if mode == 'r' else 'W'}_OK) else 3)"
    try:
        result = subprocess.run([sys.executable, "-c", probe], preexec_fn=preexec, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:  # prctl refused (no CAP_SETPCAP, seccomp, ...)
        return None, f"cannot drop DAC capabilities for the child process: {exc}"
    if result.returncode != 3:
        return None, "running with privileges that bypass file permissions (root without droppable caps)"
    return preexec, None


def fsize_limit_preexec(limit: int):
    """preexec_fn: cap file size at ``limit`` bytes and make oversize writes fail with EFBIG, not SIGXFSZ."""

    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def mount_small_tmpfs(directory: Path, size: str = "64k") -> bool:
    """Mount a tiny tmpfs at ``directory`` (root only); False if that is not possible here."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        timeout=30,
    )
    return result.returncode == 0


def unmount(directory: Path) -> None:
    subprocess.run(["umount", str(directory)], capture_output=True, timeout=30)
