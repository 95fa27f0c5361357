"""Migration 0002 on real checkpoints: a LoRA-only head is rebuilt from --base-model, or refused."""

from __future__ import annotations

from conftest import FIXTURES

from ckpt_migrate.core.plan import SourceKind, Status
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.planner import plan_checkpoint

CASE = FIXTURES / "bart_lora_only_head"


def test_without_base_model_the_head_is_refused_with_the_reason():
    plan = plan_checkpoint(CASE / "run" / "checkpoint-2")
    assert plan.status is Status.UNRECOVERABLE and plan.migrations == ("0002_fold_lora_only_head",)
    assert "pass --base-model DIR" in plan.after.unrecoverable[0]


def test_with_the_base_model_every_head_parameter_is_written_from_it():
    base = BaseModel.open(CASE / "base")
    plan = plan_checkpoint(CASE / "run" / "checkpoint-2", base_model=base)
    assert plan.status is Status.REPAIRABLE and "0002_fold_lora_only_head" in plan.migrations
    head = {n: t for n, t in plan.after.tensors.items() if ".classification_head." in n}
    assert set(head) == {f"base_model.model.{name}" for name in base.names_under("classification_head")}
    folded = head["base_model.model.classification_head.out_proj.weight"].source
    assert folded.kind is SourceKind.FOLD and folded.base_file == (CASE / "base" / "model.safetensors")
    copied = head["base_model.model.classification_head.dense.weight"].source
    assert copied.kind is SourceKind.BASE and copied.tensor == "classification_head.dense.weight"
    assert not any(".lora_" in n for n in head)
    assert "classification_head" in plan.after.config["modules_to_save"]
    assert any("rebuilt from" in w for w in plan.warnings)


def test_a_base_without_the_head_weights_is_refused():
    case = FIXTURES / "bart_lora_only_head_nobase"
    plan = plan_checkpoint(case / "run" / "checkpoint-2", base_model=BaseModel.open(case / "base"))
    assert plan.status is Status.UNRECOVERABLE
    assert "cannot be reconstructed" in plan.after.unrecoverable[0]
