"""Migration 0010 on real peft 0.12 checkpoints whose head a non-LoRA tuner wrapped alone (LoHa, IA3 on BART's
classification_head, scripts/make_fixtures.py --tuners): rebuilt from --base-model, the trained logits come back under
the newest peft and peft 0.12; without the head's base weights the checkpoint is refused, never called clean."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import TUNER_FIXTURES, load_case, old_python, run_cli, tree_digest
from logits_check import max_logit_error

from ckpt_migrate.core.errors import EXIT_UNRECOVERABLE
from ckpt_migrate.core.plan import SourceKind, Status
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.planner import plan_checkpoint

ID = "0010_fold_tuner_only_head"
REBUILT = ["loha_bart_tuner_only_head", "ia3_bart_tuner_only_head"]
NO_BASE = TUNER_FIXTURES / "lokr_bart_tuner_only_head_nobase"


@pytest.fixture(scope="module")
def fixed(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tuner_only")
    for name in REBUILT:
        case = TUNER_FIXTURES / name
        code, stdout, stderr = run_cli("fix", case / "run", "--out", root / name, "--base-model", case / "base")
        assert code == 0, stdout + stderr
    return {name: root / name / "checkpoint-2" for name in REBUILT}


def test_the_cases_really_carry_the_tuner_on_the_head_only():
    for name in [*REBUILT, NO_BASE.name]:
        case = load_case(TUNER_FIXTURES / name)
        assert case["shape"] == "lora_only" and case["peft_version"] == "0.12.0"
        assert case["sanity"]["max_abs_diff_trained_vs_trained_with_init_head"] > 20 * case["tolerance"]


@pytest.mark.parametrize("name", REBUILT)
def test_inspect_never_calls_it_clean_and_names_the_failure(name):
    result = run_cli("inspect", TUNER_FIXTURES / name / "run" / "checkpoint-2", "--format", "json")
    (checkpoint,) = json.loads(result.stdout)["checkpoints"]
    assert checkpoint["status"] == "unrecoverable" and ID in checkpoint["migrations"]
    assert any("re-initialised at random" in line for line in checkpoint["fails_on"])
    assert any("pass --base-model DIR" in error for error in checkpoint["errors"])


@pytest.mark.parametrize("name", REBUILT)
def test_with_the_base_model_the_head_is_merged_by_peft_and_moves_to_modules_to_save(name):
    case = TUNER_FIXTURES / name
    base = BaseModel.open(case / "base")
    plan = plan_checkpoint(case / "run" / "checkpoint-2", base_model=base)
    assert plan.status is Status.REPAIRABLE and ID in plan.migrations
    head = {n: t for n, t in plan.after.tensors.items() if ".classification_head." in n}
    assert set(head) == {f"base_model.model.{n}" for n in base.names_under("classification_head")}
    merged = head["base_model.model.classification_head.out_proj.weight"].source
    assert merged.kind is SourceKind.COMPUTED and merged.migration == ID
    assert head["base_model.model.classification_head.dense.weight"].source.kind is SourceKind.BASE
    assert "classification_head" in plan.after.config["modules_to_save"]


@pytest.mark.parametrize("name", REBUILT)
def test_repaired_head_reproduces_trained_logits_with_installed_peft(fixed, name):
    error = max_logit_error(TUNER_FIXTURES / name, fixed[name], "checkpoint-2")
    print(f"{name}: max |logit error| {error:.3g} (newest peft)")
    assert error <= load_case(TUNER_FIXTURES / name)["tolerance"]


def test_the_unrepaired_head_is_random_on_load():
    name = REBUILT[0]
    error = max_logit_error(TUNER_FIXTURES / name, TUNER_FIXTURES / name / "run" / "checkpoint-2", "checkpoint-2")
    assert error > 20 * load_case(TUNER_FIXTURES / name)["tolerance"]


@pytest.mark.skipif(old_python() is None, reason="no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
def test_repaired_heads_reproduce_trained_logits_with_peft_0_12(fixed):
    args = [str(a) for name in REBUILT for a in (TUNER_FIXTURES / name, fixed[name], "checkpoint-2")]
    script = str(Path(__file__).parent / "logits_check.py")
    result = subprocess.run([old_python(), script, *args], capture_output=True, text=True, check=True)
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == len(REBUILT)
    for name in REBUILT:
        assert errors[str(fixed[name])] <= load_case(TUNER_FIXTURES / name)["tolerance"], (name, errors)


def test_without_base_model_or_head_weights_it_is_refused_and_nothing_written(tmp_path):
    src = NO_BASE / "run"
    before = tree_digest(src)
    code, _, stderr = run_cli("fix", src, "--out", tmp_path / "a")
    assert code == EXIT_UNRECOVERABLE and "pass --base-model DIR" in stderr
    code, _, stderr = run_cli("fix", src, "--out", tmp_path / "b", "--base-model", NO_BASE / "base")
    assert code == EXIT_UNRECOVERABLE and "cannot be reconstructed" in stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and tree_digest(src) == before
