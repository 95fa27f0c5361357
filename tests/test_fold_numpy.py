"""The numpy fold (fix without torch) writes the very bytes the torch fold wrote, on every fold of the real fixtures
(the head repairs, and export's fold of every Linear of the base, in the stored dtype and cast to float32, bfloat16
and float16), on large random folds, and on the values where a cast's rounding is decided; and a repair whose only
computed tensor is a fold never imports torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, LAYOUTS, TUNER_FIXTURES, case_dirs, load_case

from ckpt_migrate import export, inspect
from ckpt_migrate.core.errors import CkptMigrateError
from ckpt_migrate.core.plan import SourceKind
from ckpt_migrate.execute import fold_numpy
from ckpt_migrate.execute.tensors import TensorReader, fold, folded_bits, numpy_folds, tensor_bytes
from ckpt_migrate.formats.dtypes import to_torch

FOLD_CASES = [c for c in case_dirs(FIXTURES) + case_dirs(LAYOUTS)]
TORCH_OF = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _torch_bytes(reader: TensorReader, tensor, dtype: str) -> bytes:
    return bytes(tensor_bytes(fold(reader, tensor).to(to_torch(dtype))))


def _numpy_bytes(reader: TensorReader, tensor, dtype: str) -> bytes:
    bits = folded_bits(reader, tensor, dtype)
    assert bits is not None, f"numpy did not fold {tensor.name}"
    return np.ascontiguousarray(bits).tobytes()


def _checkpoint(case: Path) -> Path:
    return next((case / "run").glob("checkpoint-*"))


def _base(case: Path) -> Path | None:
    return case / "base" if (case / "base" / "config.json").is_file() else None


def test_the_fixtures_cover_float32_bfloat16_and_float16_folds():
    dtypes = {load_case(c).get("dtype", "float32") for c in FOLD_CASES}
    assert {"bfloat16", "float16"} <= dtypes, dtypes


@pytest.mark.parametrize("case", FOLD_CASES, ids=lambda c: c.name)
def test_head_folds_are_byte_identical_to_the_torch_fold(case):
    try:
        report = inspect(_checkpoint(case), base_model=_base(case))
    except CkptMigrateError as exc:
        pytest.skip(f"not plannable here: {exc}")
    compared = 0
    for result in report.checkpoints:
        if result.plan is None:
            continue
        for _, adapter in result.plan.rewritten_adapters:
            reader = TensorReader.of(adapter)
            for tensor in adapter.after.tensors.values():
                if tensor.source.kind is SourceKind.FOLD and numpy_folds(reader, tensor):
                    assert _numpy_bytes(reader, tensor, tensor.dtype) == _torch_bytes(reader, tensor, tensor.dtype)
                    compared += 1
    if not compared:
        pytest.skip("no LoRA fold in this repair")


@pytest.mark.parametrize("case", [c for c in FOLD_CASES if _base(c)], ids=lambda c: c.name)
def test_export_folds_of_every_linear_are_byte_identical_to_the_torch_fold(case):
    """Export folds every LoRA module into the base weight; the cast to another dtype is compared too."""
    try:
        plan = export(_checkpoint(case), base_model=_base(case), dry_run=True).export
    except CkptMigrateError as exc:
        pytest.skip(f"not exportable: {exc}")
    reader = TensorReader(plan.repair.before.source_dir / plan.repair.before.weights_file)
    folds = [t for t in plan.tensors if t.source.kind is SourceKind.FOLD and numpy_folds(reader, t)]
    if not folds:
        pytest.skip("no LoRA fold")
    for tensor in folds:
        for dtype in {tensor.dtype, "F32", "BF16", "F16"}:
            assert _numpy_bytes(reader, tensor, dtype) == _torch_bytes(reader, tensor, dtype), (tensor.name, dtype)


def _random_fold_case(rows: int, cols: int, r: int, seed: int, dora: bool):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64) * 0.02
    lora_a = torch.randn(r, cols, generator=generator, dtype=torch.float64) * 0.05
    lora_b = torch.randn(rows, r, generator=generator, dtype=torch.float64) * 0.05
    magnitude = torch.rand(rows, generator=generator, dtype=torch.float64) + 0.5 if dora else None
    return weight, lora_a, lora_b, magnitude


def _torch_reference(weight, lora_a, lora_b, scale, magnitude):
    """The arithmetic of tensors.fold on whole matrices (each output element is the same float64 expression)."""
    merged = weight.double()
    merged.addmm_(lora_b.double(), lora_a.double(), alpha=scale)
    if magnitude is not None:
        merged.mul_((magnitude.double() / torch.linalg.norm(merged, dim=1))[:, None])
    return merged.to(weight.dtype)


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("dora", [False, True])
def test_large_random_folds_are_byte_identical(dtype, dora):
    """1M-element folds (as big as one fold block) in each stored dtype, factors stored in that dtype too."""
    weight, lora_a, lora_b, magnitude = _random_fold_case(512, 2048, 16, seed=len(dtype) + dora, dora=dora)
    stored = [t.to(TORCH_OF[dtype]) if t is not None else None for t in (weight, lora_a, lora_b, magnitude)]
    expected = _torch_reference(*stored[:3], 2.0, stored[3]).view(-1).view(torch.uint8).numpy().tobytes()

    def bits(t: torch.Tensor) -> np.ndarray:
        return t.view(torch.int16).numpy().view(np.uint16) if dtype == "BF16" else t.numpy()

    wide = [fold_numpy.to_float64(bits(t), dtype) if t is not None else None for t in stored]
    got = fold_numpy.fold(bits(stored[0]), dtype, wide[1], wide[2], 2.0, magnitude=wide[3])
    assert got.tobytes() == expected


def _deciding_values() -> np.ndarray:
    """Values whose cast is decided by rounding: exact 16-bit midpoints, a float64 ulp either side of them (where
    rounding via float32, as torch does, differs from a direct cast), ties to even, the edges of the range."""
    rng = np.random.default_rng(0)
    singles = rng.standard_normal(20000).astype(np.float32)
    bits = singles.view(np.uint32)
    midpoints = []
    for keep in (16, 13):  # bfloat16 keeps 16 of float32's 32 bits; float16 the mantissa's top 10 (13 dropped)
        half_step = np.uint32(1 << (keep - 1))
        mid = ((bits >> np.uint32(keep)) << np.uint32(keep)) | half_step
        midpoints.append(mid.view(np.float32).astype(np.float64))
    middle = np.concatenate(midpoints)
    edges = np.array(
        [0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0, 65519.99, 6e-8, 3e-8, 1e-40, 3.4e38, 3.5e38, -1e-45]
    )
    return np.concatenate(
        [
            rng.standard_normal(20000) * 10.0 ** rng.integers(-8, 8, 20000),
            middle,
            np.nextafter(middle, np.inf),
            np.nextafter(middle, -np.inf),
            edges,
        ]
    )


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_casts_from_float64_round_as_torch_does(dtype):
    values = _deciding_values()
    expected = torch.from_numpy(values).to(TORCH_OF[dtype]).view(-1).view(torch.uint8).numpy().tobytes()
    assert fold_numpy.from_float64(values, dtype).tobytes() == expected


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_nan_stays_nan(dtype):
    """NaN's bits are not compared: torch itself writes bfloat16 NaN as 0xFFFF (vectorized) or 0x7FC0 (scalar)."""
    values = np.array([np.nan, -np.nan, 1.0])
    back = fold_numpy.to_float64(fold_numpy.from_float64(values, dtype), dtype)
    assert np.isnan(back[:2]).all() and back[2] == 1.0


@pytest.mark.parametrize(("source", "target"), [("F32", "BF16"), ("F32", "F16"), ("F16", "BF16"), ("BF16", "F16")])
def test_casts_between_stored_dtypes_round_as_torch_does(source, target):
    values = torch.from_numpy(_deciding_values()).to(TORCH_OF[source])
    bits = values.view(torch.int16).numpy().view(np.uint16) if source == "BF16" else values.numpy()
    expected = values.to(TORCH_OF[target]).view(-1).view(torch.uint8).numpy().tobytes()
    assert fold_numpy.convert(bits, source, target).tobytes() == expected


def _modules_imported_by_fix(source: Path, out: Path) -> set[str]:
    argv = [sys.executable, "-X", "importtime", "-m", "ckpt_migrate", "fix", str(source), "--out", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time")}


def _torch(modules: set[str]) -> list[str]:
    return [m for m in modules if m == "torch" or m.startswith("torch.")]  # the CLI may exit before "torch" completes


def test_a_repair_that_only_folds_never_imports_torch(tmp_path):
    """The LoRA head fold (numpy) and the rng_state.pth rewrite (migration 0004, a restricted unpickler) must not
    import torch (about 3 CPU-s); a LoHa head, which peft's own layer merges, does (which shows the check sees an
    import)."""
    loha = tmp_path / "loha"
    shutil.copytree(TUNER_FIXTURES / "loha_llama_score" / "run" / "checkpoint-2", loha)
    assert _torch(_modules_imported_by_fix(loha, tmp_path / "loha-fixed"))
    source = tmp_path / "checkpoint-2"
    shutil.copytree(FIXTURES / "mistral_bf16" / "run" / "checkpoint-2", source)
    assert (source / "rng_state.pth").is_file()
    imported = _modules_imported_by_fix(source, tmp_path / "out")
    assert "numpy" in imported and "ckpt_migrate.execute.fold_numpy" in imported
    assert not _torch(imported)
