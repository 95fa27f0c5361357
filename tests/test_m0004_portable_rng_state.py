"""Migration 0004: Trainer's rng_state*.pth, rewritten, resumes identically under numpy 2 and numpy 1.

The numpy 2 side runs transformers' own ``Trainer._load_rng_state`` in this process; the numpy 1 side
runs the one in the old interpreter (transformers 4.44 + numpy 1, CKPT_MIGRATE_OLD_PYTHON) once, in a
subprocess, for every case. Malicious pickles must be refused without any of their code running.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.plan import CheckpointState, FileRewrite, Options
from ckpt_migrate.formats.pickles import pickle_globals
from ckpt_migrate.migrations import m0004_portable_rng_state as m0004
from ckpt_migrate.migrations.m0004_portable_rng_state import (
    TORCH_GLOBALS,
    check_rng_state,
    portable_rng_state_bytes,
    read_rng_state,
    references_numpy_core,
)

TESTS = Path(__file__).parent
FIXTURE_RNG_FILES = sorted((TESTS / "fixtures").glob("*/run/checkpoint-*/rng_state.pth"))
NUMPY2 = int(np.__version__.split(".")[0]) >= 2
NUMPY1_ERROR = "Unsupported global: GLOBAL numpy.core.multiarray._reconstruct was not an allowed global"
NUMPY2_ERROR = "Unsupported global: GLOBAL numpy._core.multiarray._reconstruct was not an allowed global"

# Draws taken after restoring a state; run verbatim here and in the old interpreter.
DRAWS_SOURCE = """
def draws():
    return {
        "python": [random.random() for _ in range(3)] + [random.getrandbits(64)],
        "numpy": np.random.random(3).tolist() + np.random.standard_normal(3).tolist()
        + np.random.randint(0, 2**31 - 1, 3).tolist(),
        "torch": torch.rand(3).tolist() + torch.randint(0, 2**31 - 1, (3,)).tolist(),
    }
"""
exec(DRAWS_SOURCE)  # defines draws() with this module's random/np/torch

OLD_SCRIPT = (
    """
import json, random, sys, types
import numpy as np, torch, transformers
from transformers import Trainer
from transformers.training_args import ParallelMode
"""
    + DRAWS_SOURCE
    + """
out = {"numpy": np.__version__, "transformers": transformers.__version__, "cases": {}}
for name, case in json.load(sys.stdin).items():
    args = types.SimpleNamespace(
        world_size=case["world_size"], process_index=case["rank"], parallel_mode=ParallelMode.NOT_PARALLEL
    )
    try:
        Trainer._load_rng_state(types.SimpleNamespace(args=args), case["checkpoint"])
        out["cases"][name] = {"draws": draws()}
    except Exception as exc:
        out["cases"][name] = {"error": type(exc).__name__ + ": " + str(exc)}
print(json.dumps(out))
"""
)


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """These tests reseed the global generators; give other tests theirs back."""
    saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.random.set_rng_state(saved[2])


def _distinct(paths: list[Path]) -> list[Path]:
    seen: dict[str, Path] = {}
    for path in paths:
        seen.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), path)
    return list(seen.values())


def _trusted_load(path: Path) -> dict:
    """Reference loader for files this test suite itself trusts (fixtures, files written here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, weights_only=False)


def _reference_draws(path: Path) -> dict:
    state = _trusted_load(path)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    return draws()  # noqa: F821 (defined by exec above)


def _trainer_state_with_cached_gaussian(extra: dict | None = None) -> dict:
    """What Trainer._save_rng_state saves, after a draw that leaves a cached gaussian (has_gauss=1)."""
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    np.random.standard_normal()
    torch.rand(5)
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    assert state["numpy"][3] == 1
    return {**state, **(extra or {})}


def _rewrite(source: Path, checkpoint: Path, name: str = "rng_state.pth") -> Path:
    checkpoint.mkdir(parents=True, exist_ok=True)
    target = checkpoint / name
    m0004.write(FileRewrite(m0004.ID, m0004.REASON), source, target)()  # what fix writes (without torch)
    return target


def _fake_trainer(world_size: int = 1, rank: int = 0):
    from transformers.training_args import ParallelMode

    args = types.SimpleNamespace(world_size=world_size, process_index=rank, parallel_mode=ParallelMode.NOT_PARALLEL)
    return types.SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def trainer_load():
    """transformers' own Trainer._load_rng_state (imported once: importing Trainer is slow)."""
    from transformers import Trainer

    def load(checkpoint: Path, world_size: int = 1, rank: int = 0) -> dict:
        Trainer._load_rng_state(_fake_trainer(world_size, rank), str(checkpoint))
        return draws()  # noqa: F821

    return load


@pytest.fixture(scope="module")
def numpy2_file(tmp_path_factory) -> Path:
    """An rng_state.pth as Trainer writes it under numpy 2 (names numpy._core.multiarray._reconstruct)."""
    if not NUMPY2:
        pytest.skip("needs numpy 2 in the test interpreter")
    path = tmp_path_factory.mktemp("np2") / "rng_state.pth"
    torch.save(_trainer_state_with_cached_gaussian(), path)
    return path


def _malicious_file(path: Path, marker: Path, protocol: int) -> Path:
    """A Trainer-looking rng_state.pth whose pickle runs ``touch marker`` if it is ever unpickled."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(marker))}",))

    torch.save(_trainer_state_with_cached_gaussian({"evil": Payload()}), path, pickle_protocol=protocol)
    return path


def _raw_torch_archive(path: Path, pickle_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", "3\n")
    return path


def _state(directory: Path) -> CheckpointState:
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
    return CheckpointState(
        source_dir=directory, config={}, tensors={}, files=files, weights_file="adapter_model.safetensors"
    )


def _context(state: CheckpointState) -> Context:
    return Context(source=state, base_model=None, options=Options())


# ------------------------------------------------------------------------------- the bug, numpy 2


@pytest.mark.skipif(not NUMPY2, reason="needs numpy 2 in the test interpreter")
def test_original_fixture_fails_in_trainer_under_numpy2(trainer_load):
    import pickle

    with pytest.raises(pickle.UnpicklingError, match="numpy.core.multiarray._reconstruct was not an allowed"):
        trainer_load(FIXTURE_RNG_FILES[0].parent)


# ----------------------------------------------------------------------------- the fix, numpy 2


@pytest.mark.skipif(not NUMPY2, reason="needs numpy 2 in the test interpreter")
@pytest.mark.parametrize(
    "source", _distinct(FIXTURE_RNG_FILES), ids=lambda p: f"{p.parent.parent.parent.name}-{p.parent.name}"
)
def test_rewritten_fixture_restores_same_draws_under_numpy2(source, tmp_path, trainer_load):
    expected = _reference_draws(source)
    _rewrite(source, tmp_path / "checkpoint-2")
    assert trainer_load(tmp_path / "checkpoint-2") == expected


def test_rewritten_numpy2_file_with_cached_gaussian_restores_under_numpy2(numpy2_file, tmp_path, trainer_load):
    expected = _reference_draws(numpy2_file)
    assert references_numpy_core(numpy2_file)
    _rewrite(numpy2_file, tmp_path / "checkpoint-4", "rng_state_1.pth")
    assert trainer_load(tmp_path / "checkpoint-4", world_size=2, rank=1) == expected


def test_rewritten_file_is_portable_and_exact(tmp_path):
    source = FIXTURE_RNG_FILES[0]
    data = portable_rng_state_bytes(source)
    assert data == portable_rng_state_bytes(source), "rewrite must be deterministic"
    target = tmp_path / "rng_state.pth"
    target.write_bytes(data)
    seen = pickle_globals(target)
    assert set(seen) <= TORCH_GLOBALS
    assert not any(name.startswith("numpy") for name in seen)

    loaded = torch.load(target, weights_only=True)  # no safe globals needed at all
    original = _trusted_load(source)
    assert loaded.keys() == original.keys()
    assert loaded["python"] == original["python"]
    name, key, pos, has_gauss, gauss = loaded["numpy"]
    assert (name, pos, has_gauss, gauss) == (original["numpy"][0], *original["numpy"][2:])
    assert isinstance(key, list) and key == original["numpy"][1].tolist()
    assert torch.equal(loaded["cpu"], original["cpu"]) and loaded["cpu"].dtype == torch.uint8
    assert not references_numpy_core(target)
    assert read_rng_state(target).keys() == loaded.keys()


def test_cuda_states_and_shared_storages_are_preserved(tmp_path):
    generator = torch.Generator().manual_seed(0)
    storage = torch.randint(0, 256, (48,), dtype=torch.uint8, generator=generator)
    extra = {"cuda": [storage[:16], storage[16:32], storage[32:]], "npu": storage[8:24]}
    source = tmp_path / "rng_state.pth"
    torch.save(_trainer_state_with_cached_gaussian(extra), source)
    state = read_rng_state(source)
    original = _trusted_load(source)
    for got, want in zip(state["cuda"] + [state["npu"]], original["cuda"] + [original["npu"]], strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert state["numpy"][3:] == original["numpy"][3:]
    assert portable_rng_state_bytes(source)


# ---------------------------------------------------------------------------------- numpy 1 side


def _old_python() -> tuple[str | None, str]:
    configured = os.environ.get("CKPT_MIGRATE_OLD_PYTHON")
    if configured:
        if Path(configured).exists():
            return configured, ""
        return None, f"CKPT_MIGRATE_OLD_PYTHON={configured} does not exist"
    for candidate in ("/work/venvs/old/bin/python", str(TESTS.parent / ".venv-peft012" / "bin" / "python")):
        if Path(candidate).exists():
            return candidate, ""
    return None, "no numpy-1 interpreter: set CKPT_MIGRATE_OLD_PYTHON (transformers 4.44 + numpy 1)"


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, numpy2_file):
    """Run the old interpreter's Trainer._load_rng_state once over every case; return its results."""
    python, why = _old_python()
    if python is None:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("old")
    cases, expected = {}, {}
    for index, source in enumerate(_distinct(FIXTURE_RNG_FILES)):
        name = f"fixture-{source.parent.parent.parent.name}-{source.parent.name}"
        cases[name] = {"checkpoint": str(_rewrite(source, root / f"c{index}").parent), "world_size": 1, "rank": 0}
        expected[name] = _reference_draws(source)
    cases["numpy2-written-rank1"] = {
        "checkpoint": str(_rewrite(numpy2_file, root / "np2", "rng_state_1.pth").parent),
        "world_size": 2,
        "rank": 1,
    }
    expected["numpy2-written-rank1"] = _reference_draws(numpy2_file)
    cases["original-fixture"] = {"checkpoint": str(FIXTURE_RNG_FILES[0].parent), "world_size": 1, "rank": 0}
    cases["original-numpy2-written"] = {"checkpoint": str(numpy2_file.parent), "world_size": 1, "rank": 0}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [python, "-c", OLD_SCRIPT],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if int(result["numpy"].split(".")[0]) >= 2:
        pytest.skip(f"{python} has numpy {result['numpy']}, not numpy 1")
    return result, expected


def test_rewritten_files_restore_same_draws_in_old_trainer_under_numpy1(old_run):
    result, expected = old_run
    for name, draws_expected in expected.items():
        assert result["cases"][name] == {"draws": draws_expected}, (name, result["transformers"], result["numpy"])


def test_original_files_fail_in_old_trainer_under_numpy1(old_run):
    """transformers 4.44 calls torch.load(rng_file) (weights_only=True since torch 2.6) with no numpy global
    allowed, so under numpy 1 both the numpy-1 and the numpy-2 original are refused."""
    result, _ = old_run
    assert NUMPY1_ERROR in result["cases"]["original-fixture"]["error"]
    assert NUMPY2_ERROR in result["cases"]["original-numpy2-written"]["error"]


# ----------------------------------------------------------------------------------- the migration


def test_migration_detects_and_plans_rewrite(tmp_path):
    (tmp_path / "rng_state.pth").write_bytes(FIXTURE_RNG_FILES[0].read_bytes())
    (tmp_path / "rng_state_3.pth").write_bytes(FIXTURE_RNG_FILES[0].read_bytes())
    (tmp_path / "rng_state.pth.bak").write_bytes(FIXTURE_RNG_FILES[0].read_bytes())
    (tmp_path / "optimizer.pt").write_bytes(b"not read")
    state = _state(tmp_path)
    assert m0004.detect(state, _context(state))
    assert m0004.ID == "0004_portable_rng_state" and m0004.SUMMARY and "numpy._core" in m0004.CAUSED_BY
    m0004.plan(state, _context(state))
    assert sorted(state.rewritten_files) == ["rng_state.pth", "rng_state_3.pth"]
    rewrite = state.rewritten_files["rng_state.pth"]
    assert rewrite.migration == m0004.ID
    assert dict(rewrite.listed) == {
        "numpy_globals": ("numpy.core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray")
    }
    assert state.files == _state(tmp_path).files  # nothing dropped; sizes are the input's


def test_write_portable_rng_state_writes_verified_bytes(tmp_path):
    target = tmp_path / "rng_state.pth"
    rewrite = FileRewrite(m0004.ID, m0004.REASON)
    m0004.write(rewrite, FIXTURE_RNG_FILES[0], target)
    torch_saved = tmp_path / "torch" / "rng_state.pth"
    torch_saved.parent.mkdir()
    torch_saved.write_bytes(portable_rng_state_bytes(FIXTURE_RNG_FILES[0]))
    assert _records(target) == _records(torch_saved)  # (the archive's folder and serialization_id aside)
    with pytest.raises(FileExistsError):
        m0004.write(rewrite, FIXTURE_RNG_FILES[0], target)


def test_migration_does_not_detect_portable_or_foreign_files(tmp_path):
    _rewrite(FIXTURE_RNG_FILES[0], tmp_path)
    (tmp_path / "rng_state_0.pth").write_bytes(b"garbage, not a zip")
    assert not m0004.detect(_state(tmp_path), _context(_state(tmp_path)))
    with pytest.raises(UnreadableInputError, match="not a torch file"):
        check_rng_state(tmp_path / "rng_state_0.pth")


# -------------------------------------------------------------------------------------- security


@pytest.mark.parametrize("protocol", [2, 4], ids=["GLOBAL", "STACK_GLOBAL"])
def test_malicious_rng_state_is_refused_and_never_executed(tmp_path, protocol):
    marker = tmp_path / "pwned"
    live = _malicious_file(tmp_path / "live.pth", marker, protocol)
    _trusted_load(live)  # proves the payload is real: unpickling it runs the command
    assert marker.exists()
    marker.unlink()

    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    evil = checkpoint / "rng_state.pth"
    evil.write_bytes(live.read_bytes())
    assert references_numpy_core(evil)
    state = _state(checkpoint)
    assert m0004.detect(state, _context(state))
    for attempt in (
        lambda: m0004.plan(state, _context(state)),
        lambda: read_rng_state(evil),
        lambda: portable_rng_state_bytes(evil),
    ):
        with pytest.raises(UnreadableInputError, match=r"posix\.system, which is not an allowed global") as info:
            attempt()
        assert "\n" not in str(info.value)
    assert not state.rewritten_files
    assert not marker.exists()


@pytest.mark.parametrize(
    "pickle_bytes, message",
    [
        (b"cos\nsystem\n(S'touch pwned'\ntR.", "os.system, which is not an allowed global"),
        (b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x00openq\x00\x85R.", "builtins.eval, which is not"),
        (b"(ios\nsystem\nS'touch pwned'\no.", "opcode INST is not supported"),
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.", "not a Trainer RNG state"),
        (b"\x80\x02cnumpy\ndtype\n.", "not a Trainer RNG state"),
        (b"\x80\x02]q\x00h\x00a.", "not a Trainer RNG state"),
        (b"\x80\x02}q\x00(X\x01", "malformed pickle"),
    ],
    ids=["os.system", "eval", "INST", "codecs-misuse", "bare-global", "cycle", "truncated"],
)
def test_unexpected_pickles_are_refused(tmp_path, monkeypatch, pickle_bytes, message):
    monkeypatch.chdir(tmp_path)
    path = _raw_torch_archive(tmp_path / "rng_state.pth", pickle_bytes)
    with pytest.raises(UnreadableInputError, match=message.replace(".", r"\.")):
        check_rng_state(path)
    assert not (tmp_path / "pwned").exists()


def test_detection_refuses_nothing_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _raw_torch_archive(tmp_path / "rng_state.pth", b"cnumpy.core.multiarray\n_reconstruct\ncos\nsystem\n.")
    assert references_numpy_core(path)
    assert not (tmp_path / "pwned").exists()


def _records(path: Path) -> dict[str, bytes]:
    """Every record of a torch archive by its name under the prefix, but the random ``serialization_id``."""
    with zipfile.ZipFile(path) as archive:
        return {
            name.split("/", 1)[1]: archive.read(name)
            for name in archive.namelist()
            if not name.endswith("serialization_id")
        }


def _torch_free_cases(tmp_path: Path, numpy2_file: Path | None) -> list[Path]:
    generator = torch.Generator().manual_seed(0)
    storage = torch.randint(0, 256, (48,), dtype=torch.uint8, generator=generator)
    shared = tmp_path / "shared" / "rng_state.pth"  # cuda states viewing one storage, as torch saves them
    shared.parent.mkdir()
    views = {"cuda": [storage[:16], storage[16:]], "npu": storage[8:24]}
    torch.save(_trainer_state_with_cached_gaussian(views), shared)
    return [*FIXTURE_RNG_FILES, shared] + ([numpy2_file] if numpy2_file else [])


def test_the_rewrite_without_torch_pickles_torch_saves_bytes(tmp_path, request):
    """fix rewrites an RNG state without importing torch: its data.pkl is byte for byte what torch.save pickles for
    the state torch.load reads (every fixture, a numpy 2 file, shared cuda storages), every other record (storages
    copied, not decoded) equals torch.save's, and torch reloads it, with no global allowed, to exactly that state."""
    numpy2 = request.getfixturevalue("numpy2_file") if NUMPY2 else None
    for index, source in enumerate(_torch_free_cases(tmp_path, numpy2)):
        ours = tmp_path / f"ours{index}" / "rng_state.pth"
        ours.parent.mkdir()
        m0004.write(FileRewrite(m0004.ID, m0004.REASON), source, ours)()
        theirs = tmp_path / f"theirs{index}" / "rng_state.pth"
        theirs.parent.mkdir()
        torch.save(read_rng_state(source), theirs)
        assert _records(ours) == _records(theirs), source
        assert m0004._same(torch.load(ours, weights_only=True), read_rng_state(source)), source


def test_fix_of_a_checkpoint_whose_only_pickle_to_rewrite_is_its_rng_state_does_not_import_torch(tmp_path):
    checkpoint = TESTS / "fixtures" / "llama_score" / "run" / "checkpoint-2"  # a fold numpy computes
    script = (
        "import sys; from ckpt_migrate import fix; "
        f"report = fix({str(checkpoint)!r}, {str(tmp_path / 'out')!r}, progress=False); "
        "print(report.exit_code, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["0", "False"], proc.stderr[-2000:]
    assert (tmp_path / "out" / "rng_state.pth").read_bytes() != (checkpoint / "rng_state.pth").read_bytes()
    assert not references_numpy_core(tmp_path / "out" / "rng_state.pth")
