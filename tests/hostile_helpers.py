"""Builders and assertions for the hostile-input tests (tests/test_hostile_*.py, tests/test_safetensors_fuzz.py).

Issue #5: hostile and broken inputs are refused cleanly. Every refusal must be: one line on stderr naming
the file and the problem, the documented exit code (ckpt_migrate/core/errors.py), no traceback, no pickle code
run, the source byte-identical afterwards, and no output: --out does not exist and no staging directory is
left beside it (``assert_refused``). The CLI runs in a real subprocess (``run_cli_subprocess``: ``python -m
ckpt_migrate``), so stderr is exactly what a user sees; runs that need torch (pickles, writes) go through
click's CliRunner in-process instead (``Workspace.fix(inproc=True)``, conftest's ``run_cli``), to keep the
suite fast, and an exception escaping the CLI there fails the test with its traceback.

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
from dataclasses import dataclass, field
from pathlib import Path

from conftest import run_cli, tree_digest

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


def staging_dirs(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if STAGING_MARK in p.name) if parent.is_dir() else []


# ---------------------------------------------------------------- workspaces and the refusal contract

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
HEAD = "base_model.model.score"
A, B, W = f"{HEAD}.lora_A.weight", f"{HEAD}.lora_B.weight", f"{HEAD}.base_layer.weight"


@dataclass
class Workspace:
    """A copy of one fixture checkpoint (``src``), a not-yet-existing ``out`` and a marker for pickles."""

    root: Path
    src: Path
    out: Path
    marker: Path
    extra_args: list[str] = field(default_factory=list)
    digest: dict[str, str] = field(default_factory=dict)

    def snapshot(self) -> None:
        """Record the source tree after the test made it hostile, before the tool runs."""
        self.digest = tree_digest(self.src)

    def fix(self, *args, inproc: bool = False, **kwargs) -> subprocess.CompletedProcess:
        if not self.digest:
            self.snapshot()
        argv = ["fix", self.src, "--out", self.out, "--quiet", *self.extra_args, *args]
        return self.run(*argv, inproc=inproc, **kwargs)

    @staticmethod
    def run(*argv, inproc: bool = False, **kwargs) -> subprocess.CompletedProcess:
        """The CLI in a real subprocess, or in-process (conftest's ``run_cli``) with ``inproc=True``."""
        if inproc:
            return subprocess.CompletedProcess(argv, *run_cli(*argv))
        return run_cli_subprocess(*argv, **kwargs)


def make_workspace(root: Path, case: str = "llama_score", checkpoint: str = "checkpoint-2") -> Workspace:
    src = root / "src" / checkpoint
    shutil.copytree(FIXTURES / case / "run" / checkpoint, src, symlinks=True)
    return Workspace(root, src, root / "out", root / "MARKER-pickle-code-ran")


def bart_workspace(tmp_path: Path) -> Workspace:
    """bart_lora_only_head's checkpoint, with a copy of its base model passed as --base-model."""
    ws = make_workspace(tmp_path, "bart_lora_only_head")
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "bart_lora_only_head" / "base", base)
    ws.extra_args = ["--base-model", str(base)]
    return ws


def assert_refused(ws: Workspace, result: subprocess.CompletedProcess, code: int, *mentions: str) -> str:
    """The shared contract of every refusal; returns the stderr line."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    line = lines[0]
    print(f"exit {result.returncode}: {line}")  # shown with -rP: the observed refusal, for review
    assert line.startswith("ckpt-migrate: error: "), line
    for mention in mentions:
        assert mention in line, f"{mention!r} not in {line!r}"
    assert result.returncode == code, f"exit {result.returncode}, expected {code}: {line}"
    assert tree_digest(ws.src) == ws.digest, "the source was modified"
    assert not ws.out.exists(), "--out was created"
    assert staging_dirs(ws.out.parent) == [], "a staging directory was left behind"
    assert not ws.marker.exists(), "pickle code ran"
    return line


def assert_complete_checkpoint(directory: Path) -> dict:
    """A published checkpoint: manifest hashes match, the adapter loads with the real safetensors library."""
    from safetensors import safe_open

    manifest = json.loads((directory / "ckpt_migrate_manifest.json").read_text())
    for name, digest in manifest["outputs_sha256"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest, name
    with safe_open(directory / WEIGHTS, framework="pt") as handle:
        for key in handle.keys():
            handle.get_tensor(key)
    json.loads((directory / CONFIG).read_text())
    return manifest


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


def zero_bytes(dtype: str, shape: list[int]) -> tuple[str, list[int], bytes]:
    """A tensor of ``shape`` and ``dtype`` holding zeros, as ``save_tensors`` takes it."""
    from math import prod

    from ckpt_migrate.formats.dtypes import DTYPES

    return dtype, shape, b"\0" * (prod(shape) * DTYPES[dtype].size)


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


def run_cli_subprocess(
    *args: str | os.PathLike,
    preexec_fn=None,
    timeout: float = 120,
    env: dict | None = None,
    pause_mid_write: bool = False,
    wait: bool = True,
):
    """Run ``python -m ckpt_migrate ARGS`` in a fresh process (the real entry point, real stderr).

    The only subprocess runner of the CLI. With ``wait`` (the default) it returns the finished
    ``CompletedProcess``; with ``wait=False`` the running ``Popen``. ``pause_mid_write`` runs
    ``PAUSING_CLI`` instead of ``-m ckpt_migrate`` (set ``HOSTILE_READY`` in ``env``), with SIGINT at its
    default action: a parent may run us with SIGINT ignored.
    """
    command = [sys.executable, "-c", PAUSING_CLI] if pause_mid_write else [sys.executable, "-m", "ckpt_migrate"]
    preexec = preexec_fn
    if pause_mid_write:

        def preexec() -> None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if preexec_fn is not None:
                preexec_fn()

    proc = subprocess.Popen(
        [*command, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )
    if not wait:
        return proc
    with proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


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
