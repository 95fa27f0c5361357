from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
HELDOUT = TESTS / "heldout"
sys.path.insert(0, str(TESTS))


def load_case(case_dir: Path) -> dict:
    return json.loads((case_dir / "case.json").read_text())


def case_dirs(root: Path = FIXTURES) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "case.json").exists())


def needs_base(case: dict) -> bool:
    return case["shape"] == "lora_only"


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below root, plus its mode, to prove a tree was not modified."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digests[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest() + oct(
                path.stat().st_mode
            )
    return digests


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
    for case_dir in case_dirs(FIXTURES) + case_dirs(HELDOUT):
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
