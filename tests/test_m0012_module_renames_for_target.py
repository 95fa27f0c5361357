"""Migration 0012: adapters trained on transformers 4.x whose modules transformers 5.x renamed (ViT, DINOv2).

Fixtures from scripts/make_fixtures_renames.py (peft 0.12.0 + transformers 4.44.2). A repair is right when the
newest peft on the newest transformers, loading it onto the 4.44.2-saved base with a random head, reproduces the
trained logits; and a repair for ``--target-transformers 4.44.2`` does so under peft 0.12.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TESTS, load_case, old_python, run_cli
from pixel_logits_check import max_logit_error, outcome
from safetensors import safe_open

from ckpt_migrate.migrations import m0012_module_renames_for_target as m0012

RENAMES = TESTS / "fixtures_renames"
VIT, DINOV2 = RENAMES / "vit_all_linear", RENAMES / "dinov2_query_value"


def fix(case_dir: Path, out: Path, *extra: str) -> tuple[int, str]:
    result = run_cli("fix", case_dir / "run" / "checkpoint-2", "--out", out, "--base-model", case_dir / "base", *extra)
    return result.exit_code, result.stdout + result.stderr


def tensor_names(directory: Path) -> list[str]:
    with safe_open(directory / "adapter_model.safetensors", "pt") as f:
        return sorted(f.keys())


@pytest.mark.parametrize("case_dir", [VIT, DINOV2], ids=lambda p: p.name)
def test_newest_peft_on_newest_transformers_reproduces_the_trained_logits(case_dir: Path, tmp_path: Path) -> None:
    code, output = fix(case_dir, tmp_path / "out")
    assert code == 0, output
    assert m0012.ID in output
    names = tensor_names(tmp_path / "out")
    assert not [n for n in names if "encoder.layer." in n and "attention.attention" in n], names
    assert any(".attention.q_proj.lora_A.weight" in n for n in names), names
    error = max_logit_error(case_dir, tmp_path / "out", "checkpoint-2")
    assert error <= load_case(case_dir)["tolerance"], error


def test_without_the_renames_the_newest_stack_targets_nothing(tmp_path: Path) -> None:
    # peft 0.21 converts adapter keys only for model types with a conversion mapping of their own (not dinov2/vit):
    # the untouched checkpoint, and one repaired for transformers 4.x, do not load on transformers 5.x.
    code, output = fix(DINOV2, tmp_path / "for4", "--target-transformers", "4.44.2")
    assert code == 0 and m0012.ID not in output.split("not needed")[0], output
    for adapter in (DINOV2 / "run" / "checkpoint-2", tmp_path / "for4"):
        assert str(outcome(DINOV2, adapter, "checkpoint-2")).startswith("NoMatchingPeftModuleError"), adapter


def test_rank_pattern_follows_the_renamed_module(tmp_path: Path) -> None:
    code, output = fix(DINOV2, tmp_path / "out")
    assert code == 0, output
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["rank_pattern"] == {"dinov2.encoder.layer.0.attention.v_proj": 2}
    assert config["modules_to_save"] == ["classifier"]


@pytest.mark.parametrize("case_dir", [VIT, DINOV2], ids=lambda p: p.name)
def test_a_4x_target_keeps_the_4x_names_and_peft_012_reproduces_the_logits(case_dir: Path, tmp_path: Path) -> None:
    python = old_python()
    if python is None:
        pytest.skip("no peft 0.12 interpreter: set CKPT_MIGRATE_OLD_PYTHON")
    out = tmp_path / "out"
    code, output = fix(case_dir, out, "--target-transformers", "4.44.2", "--target-peft", "0.12.0")
    assert code == 0, output
    assert not [n for n in tensor_names(out) if "q_proj" in n]
    check = [python, str(TESTS / "pixel_logits_check.py"), str(case_dir), str(out), "checkpoint-2"]
    proc = subprocess.run(check, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    error = json.loads(proc.stdout.strip().splitlines()[-1])[str(out)]
    assert isinstance(error, float) and error <= load_case(case_dir)["tolerance"], error


def test_a_target_other_than_the_installed_5x_is_refused_in_one_line(tmp_path: Path) -> None:
    code, output = fix(VIT, tmp_path / "out", "--target-transformers", "5.0.0")
    assert code == 4, output
    reasons = [line for line in output.splitlines() if line.startswith("ERROR:")]
    assert len(reasons) == 1 and "vit models" in reasons[0] and "install transformers 5.0.0" in reasons[0], output
    assert not (tmp_path / "out").exists()


def test_what_the_tool_cannot_map_is_refused(tmp_path: Path) -> None:
    case = tmp_path / "case"
    shutil.copytree(DINOV2, case)
    config_file = case / "run" / "checkpoint-2" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "layers_to_transform": [0], "layers_pattern": "layer"}))
    code, output = fix(case, tmp_path / "out")
    assert code == 4 and "layers_to_transform" in output, output
    assert not (tmp_path / "out").exists()


DRY_RUN_IMPORTS = """
import sys
from ckpt_migrate import inspect
inspect(sys.argv[1], base_model=sys.argv[2], target_transformers=sys.argv[3])
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("case_dir", "target", "imports"),
    [
        (TESTS / "fixtures" / "llama_score", "5.24.0", []),  # a model type the sweep found unchanged
        (VIT, "4.44.2", []),  # a 4.x target renames nothing
        (VIT, "5.24.0", ["torch", "transformers"]),  # the renames come from transformers itself
    ],
    ids=["llama", "vit-for-4x", "vit-for-5x"],
)
def test_only_a_renamed_architecture_imports_transformers_to_plan(case_dir: Path, target: str, imports: list) -> None:
    checkpoint = sorted((case_dir / "run").iterdir())[-1]
    args = [sys.executable, "-c", DRY_RUN_IMPORTS, str(checkpoint), str(case_dir / "base"), target]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == repr(imports)
