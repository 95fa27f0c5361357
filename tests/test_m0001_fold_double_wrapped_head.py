"""Migration 0001 on real peft 0.12 checkpoints: which heads it finds, what it plans, nothing else touched.

That the folded heads reproduce the trained logits is proven for every fixture in tests/test_repair.py.
"""

from __future__ import annotations

from conftest import FIXTURES

from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.plan import Options, SourceKind
from ckpt_migrate.formats.checkpoint import load_state
from ckpt_migrate.migrations import m0001_fold_double_wrapped_head as m0001
from ckpt_migrate.planner import plan_checkpoint


def planned(case: str):
    before = load_state(FIXTURES / case / "run" / "checkpoint-2")
    after = before.clone()
    context = Context(source=before, base_model=None, options=Options())
    assert m0001.detect(after, context)
    m0001.plan(after, context)
    return before, after


def test_llama_score_head_is_folded_into_a_plain_modules_to_save_weight():
    before, after = planned("llama_score")
    removed = set(before.tensors) - set(after.tensors)
    assert removed == {
        f"base_model.model.score.{part}.weight"
        for part in (
            "base_layer",
            "lora_A",
            "lora_B",
            "modules_to_save.lora_A",
            "modules_to_save.lora_B",
            "original_module.lora_A",
            "original_module.lora_B",
        )
    }
    added = after.tensors["base_model.model.score.weight"]
    assert added.source.kind is SourceKind.FOLD and added.source.scale == 2.0  # lora_alpha 8 / r 4
    assert added.source.tensor == "base_model.model.score.base_layer.weight" and added.source.base_file is None
    assert added.shape == before.tensors["base_model.model.score.base_layer.weight"].shape
    body = {n: t for n, t in before.tensors.items() if ".score." not in n}
    assert {n: after.tensors[n] for n in body} == body, "body tensors must pass through untouched"
    assert "score" in after.config["modules_to_save"] and "score" not in after.config["target_modules"]
    # the trained parameters changed (0001 declares it), so the planner runs 0003 on the stale optimizer state
    whole = plan_checkpoint(FIXTURES / "llama_score" / "run" / "checkpoint-2")
    assert whole.after.trainable_parameters_changed and "0003_drop_stale_optimizer" in whole.migrations


def test_every_wrapped_head_is_found_two_heads_and_nested_ones():
    _, distilbert = planned("distilbert_two_heads")
    folded = {n for n, t in distilbert.tensors.items() if t.source.kind is SourceKind.FOLD}
    assert folded == {"base_model.model.pre_classifier.weight", "base_model.model.classifier.weight"}
    _, roberta = planned("roberta_nested")
    folded = {n for n, t in roberta.tensors.items() if t.source.kind is SourceKind.FOLD}
    assert folded == {"base_model.model.classifier.dense.weight", "base_model.model.classifier.out_proj.weight"}
    assert "base_model.model.classifier.dense.bias" in roberta.tensors  # bias kept, renamed out of base_layer


def test_failures_name_what_current_and_old_peft_do_with_it():
    lines = m0001.failures(load_state(FIXTURES / "llama_score" / "run" / "checkpoint-2"))
    assert lines[0].startswith("peft >= 0.13: the adapter does not load (KeyError: 'base_model.model.score.weight'")
    assert "peft 0.8 to 0.12: loads, but the trained head 'score' is silently replaced" in lines[1]


def test_not_detected_on_a_lora_only_head_nor_on_its_own_output(repaired):
    lora_only = load_state(FIXTURES / "bart_lora_only_head" / "run" / "checkpoint-2")
    assert not m0001.detect(lora_only, Context(source=lora_only, base_model=None, options=Options()))
    fixed = load_state(repaired["llama_score"] / "checkpoint-2")
    assert not m0001.detect(fixed, Context(source=fixed, base_model=None, options=Options()))
    assert plan_checkpoint(repaired["llama_score"] / "checkpoint-2").status == "clean"
