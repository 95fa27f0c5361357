from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
HELDOUT = TESTS / "heldout"
OLD_STACK = TESTS / "fixtures_old_stack"  # written by peft 0.8.2-0.11.1 / transformers 4.38-4.44
LAYOUTS = TESTS / "fixtures_layouts"  # peft 0.12: named/several adapters, lossy bias, fp16, accelerate save_state
TUNER_FIXTURES = TESTS / "fixtures_tuners"  # non-LoRA tuners, written by peft 0.12.0 (migration 0007)
sys.path.insert(0, str(TESTS))


def load_case(case_dir: Path) -> dict:
    return json.loads((case_dir / "case.json").read_text())


def case_dirs(root: Path = FIXTURES) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "case.json").exists())


def adapter_cases() -> list[Path]:
    """Every fixture holding an adapter: peft 0.12 fixtures, held-out architectures, older releases' cases."""
    old = [c for c in case_dirs(OLD_STACK) if load_case(c)["shape"] != "full"]
    return case_dirs(FIXTURES) + case_dirs(HELDOUT) + old


def needs_base(case: dict) -> bool:
    return case["shape"] == "lora_only"


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry below ``root``, with its mode bits, to prove a tree was not modified.

    A file gives its sha256; a directory its mode; a symlink its target as written (it is not followed
    into directories) and, when it resolves to a regular file, that file's mode and sha256 as well, so a
    change made through a link is seen too.
    """
    digest: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                digest[rel] = f"link:{os.readlink(path)}"
                try:
                    target = path.stat()
                except OSError:  # dangling, or a loop
                    continue
                if stat.S_ISREG(target.st_mode):
                    digest[rel] += f" -> file:{target.st_mode:o}:{_sha256(path, target.st_mode)}"
            elif stat.S_ISDIR(st.st_mode):
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


class CliResult(NamedTuple):
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str | os.PathLike) -> CliResult:
    """Run the CLI in-process with click's CliRunner: ``(exit_code, stdout, stderr)``.

    An exception escaping the CLI is not caught: it fails the test with its traceback. The SIGTERM
    handler the CLI installs is put back afterwards.
    """
    from click.testing import CliRunner

    from ckpt_migrate.cli import main

    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return CliResult(result.exit_code, result.stdout, result.stderr)


def old_python() -> str | None:
    """An interpreter with peft 0.12 / transformers 4.44 / numpy 1 (CI builds it), if available."""
    candidate = os.environ.get("CKPT_MIGRATE_OLD_PYTHON") or str(TESTS.parent / ".venv-peft012" / "bin" / "python")
    return candidate if Path(candidate).exists() else None


@pytest.fixture(scope="session")
def repaired(tmp_path_factory) -> dict[str, Path]:
    """Every repairable fixture, repaired once through the public API: case name -> output dir."""
    from ckpt_migrate import fix

    root = tmp_path_factory.mktemp("repaired")
    outputs = {}
    for case_dir in adapter_cases():
        case = load_case(case_dir)
        if needs_base(case) and not case["head_in_base"]:
            continue
        src = tmp_path_factory.mktemp("src") / case_dir.name
        shutil.copytree(case_dir / "run", src)
        out = root / case_dir.name
        report = fix(src, out, base_model=case_dir / "base" if needs_base(case) else None, progress=False)
        assert report.exit_code == 0, report.checkpoints
        outputs[case_dir.name] = out
    return outputs


@pytest.fixture
def ws(tmp_path: Path):
    """A hostile-input workspace (tests/hostile_helpers.py): a copy of llama_score's checkpoint-2."""
    from hostile_helpers import make_workspace

    return make_workspace(tmp_path)
