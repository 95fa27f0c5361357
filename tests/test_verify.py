"""verify: repaired checkpoints pass (and match their broken source), broken ones fail with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import ckpt_migrate
from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.render import render_verdict
from ckpt_migrate.verification import EXIT_VERIFY_FAILED, VerifyResult, choose_auto_class, verify_checkpoint

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ["llama_score", "roberta_nested", "distilbert_two_heads", "bart_lora_only_head", "llama_dora", "mistral_bf16"]
DOUBLE_WRAPPED = ["llama_score", "roberta_nested", "distilbert_two_heads", "llama_dora", "mistral_bf16"]
ADAPTER = "adapter_model.safetensors"


def case_of(name: str) -> dict:
    return json.loads((FIXTURES / name / "case.json").read_text())


def checkpoint_of(name: str) -> Path:
    return FIXTURES / name / "run" / case_of(name)["checkpoints"][-1]


@pytest.fixture(scope="module")
def repaired(tmp_path_factory) -> dict[str, Path]:
    """The last checkpoint of each case, repaired through the public API into a tmp dir."""
    out = {}
    for name in CASES:
        target = tmp_path_factory.mktemp("verify") / name
        base = FIXTURES / name / "base"
        report = ckpt_migrate.fix(checkpoint_of(name), target, base_model=base, progress=False, verify=False)
        assert report.exit_code == 0 and report.checkpoints[0].status == "repaired", report.checkpoints
        out[name] = target
    return out


def copy_with(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` whose adapter tensors went through ``edit(dict) -> dict``."""
    shutil.copytree(src, dst)
    save_file(edit(load_file(dst / ADAPTER)), dst / ADAPTER, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("name", CASES)
def test_repaired_checkpoint_passes_and_matches_its_broken_source(repaired, name):
    result = verify_checkpoint(repaired[name], FIXTURES / name / "base", source_dir=checkpoint_of(name))
    tolerance = 1e-2 if case_of(name)["dtype"] == "bfloat16" else 1e-4
    assert result.ok, render_verdict(result, "text")
    assert result.reasons == [] and result.exit_code == 0
    assert result.max_logit_diff_between_loads == 0.0
    assert result.random_parameters == result.unused_tensors == result.missing_tensors == []
    assert result.max_logit_diff_vs_source is not None and result.max_logit_diff_vs_source <= tolerance
    assert result.tolerance == tolerance
    assert not any("not independently checked" in note for note in result.notes)


@pytest.mark.parametrize("name", DOUBLE_WRAPPED)
def test_double_wrapped_original_fails_to_load_under_current_peft(name):
    result = verify_checkpoint(checkpoint_of(name), FIXTURES / name / "base")
    assert not result.ok and result.exit_code == EXIT_VERIFY_FAILED
    assert len(result.reasons) == 1
    reason = result.reasons[0]
    assert reason.startswith("the adapter does not load with peft ")
    assert "wrapped by both LoRA and modules_to_save" in reason and "ckpt-migrate fix" in reason
    assert "Traceback" not in reason and "\n" not in reason
    assert result.max_logit_diff_vs_source is None


def test_lora_only_head_over_a_random_base_head_is_reported_random():
    name = "bart_lora_only_head_nobase"
    result = verify_checkpoint(checkpoint_of(name), FIXTURES / name / "base")
    assert not result.ok
    assert any(reason.startswith("random parameters found") for reason in result.reasons), result.reasons
    assert result.max_logit_diff_between_loads > 1e-3
    assert "classification_head.dense.weight" in result.random_parameters
    assert all(p.startswith("classification_head.") for p in result.random_parameters)
    assert result.unused_tensors == result.missing_tensors == []
    assert any("carries LoRA" in reason for reason in result.reasons)


def test_lora_only_head_over_the_saved_base_head_is_flagged_though_reproducible():
    """Right only with this exact base (a hub base lacks the head): a broken original all the same."""
    name = "bart_lora_only_head"
    result = verify_checkpoint(checkpoint_of(name), FIXTURES / name / "base")
    assert not result.ok
    assert result.exit_code == 8
    assert result.max_logit_diff_between_loads == 0.0
    assert any("carries LoRA (on classification_head.out_proj)" in reason for reason in result.reasons)


@pytest.mark.parametrize("name", ["llama_score", "bart_lora_only_head", "llama_dora", "mistral_bf16"])
def test_source_function_reproduces_the_trained_logits(name):
    """The independent (unmerged) computation of the broken source is the model as it was trained."""
    from ckpt_migrate.verification import compute_source_logits

    reference = load_file(FIXTURES / name / "reference.safetensors")
    checkpoint = case_of(name)["checkpoints"][-1]
    logits, why = compute_source_logits(checkpoint_of(name), FIXTURES / name / "base", reference["input_ids"])
    assert why == ""
    assert (logits - reference[f"logits/{checkpoint}"]).abs().max().item() <= case_of(name)["tolerance"]


def test_source_with_random_head_is_not_comparable():
    from ckpt_migrate.verification import compute_source_logits

    name = "bart_lora_only_head_nobase"
    logits, why = compute_source_logits(checkpoint_of(name), FIXTURES / name / "base", torch.tensor([[5, 6, 2]]))
    assert logits is None and "random" in why


def test_a_wrong_head_is_caught_by_the_source_comparison(repaired, tmp_path):
    name = "llama_score"

    def nudge(tensors):
        tensors["base_model.model.score.weight"] = tensors["base_model.model.score.weight"] + 0.05
        return tensors

    tampered = copy_with(repaired[name], tmp_path / "tampered", nudge)
    result = verify_checkpoint(tampered, FIXTURES / name / "base", source_dir=checkpoint_of(name))
    assert not result.ok
    assert result.max_logit_diff_between_loads == 0.0  # reproducible, just wrong
    assert result.max_logit_diff_vs_source > 1e-3
    assert result.reasons == [
        f"logits differ from the source checkpoint's by {result.max_logit_diff_vs_source:.3g} (tolerance 0.0001)"
    ]


def test_unused_tensor_is_reported(repaired, tmp_path):
    name = "llama_score"

    def add(tensors):
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(4, 32)
        return tensors

    extra = copy_with(repaired[name], tmp_path / "extra", add)
    result = verify_checkpoint(extra, FIXTURES / name / "base")
    assert not result.ok
    assert result.unused_tensors == ["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"]
    assert any(r.startswith("adapter tensors not used by the model: ") for r in result.reasons)


def test_missing_lora_tensor_is_reported_and_its_random_init_caught(repaired, tmp_path):
    name = "llama_score"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    dropped = copy_with(repaired[name], tmp_path / "dropped", lambda t: {k: v for k, v in t.items() if k != key})
    result = verify_checkpoint(dropped, FIXTURES / name / "base")
    assert not result.ok
    assert result.missing_tensors == [key]
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in result.random_parameters
    assert any(r.startswith("tensors the adapter config implies are missing: ") for r in result.reasons)
    assert any(r.startswith("random parameters found") for r in result.reasons)


def test_result_serialises_and_renders(repaired):
    name = "llama_score"
    result = verify_checkpoint(repaired[name], FIXTURES / name / "base", source_dir=checkpoint_of(name))
    data = json.loads(json.dumps(result.to_dict()))
    assert set(VerifyResult.__dataclass_fields__) <= set(data)
    assert data["ok"] is True and data["max_logit_diff_between_loads"] == 0.0
    text = render_verdict(result, "text")
    assert text.startswith("OK: ") and "between two loads" in text and "vs source" in text and "tolerance" in text

    failed = verify_checkpoint(checkpoint_of(name), FIXTURES / name / "base")
    assert json.loads(json.dumps(failed.to_dict()))["max_logit_diff_between_loads"] is None
    assert render_verdict(failed, "text").startswith("FAILED: ")


def test_user_errors_raise_unreadable_input(tmp_path):
    name = "llama_score"
    base = FIXTURES / name / "base"
    with pytest.raises(UnreadableInputError, match="checkpoint directory not found"):
        verify_checkpoint(tmp_path / "nope", base)
    with pytest.raises(UnreadableInputError, match="base model not found: no such directory"):
        verify_checkpoint(checkpoint_of(name), tmp_path / "nope")
    with pytest.raises(UnreadableInputError, match="source directory not found"):
        verify_checkpoint(checkpoint_of(name), base, source_dir=tmp_path / "nope")
    broken_base = tmp_path / "base"
    shutil.copytree(base, broken_base)
    (broken_base / "config.json").write_text("{not json")
    with pytest.raises(UnreadableInputError, match="invalid JSON") as info:
        verify_checkpoint(checkpoint_of(name), broken_base)
    assert "\n" not in str(info.value)
    with pytest.raises(UnreadableInputError, match="adapter_config.json"):
        verify_checkpoint(FIXTURES / name / "run", base)  # a run directory, not one checkpoint


def test_auto_class_choice():
    assert choose_auto_class({"architectures": ["BartForSequenceClassification"]}, {}) == (
        "AutoModelForSequenceClassification"
    )
    assert choose_auto_class({"architectures": ["BertForTokenClassification"]}, {}) == "AutoModelForTokenClassification"
    assert choose_auto_class({"architectures": ["BertForQuestionAnswering"]}, {}) == "AutoModelForQuestionAnswering"
    # a causal-LM base trained for classification: the adapter's task_type decides
    assert choose_auto_class({"architectures": ["LlamaForCausalLM"]}, {"task_type": "TOKEN_CLS"}) == (
        "AutoModelForTokenClassification"
    )
    with pytest.raises(UnreadableInputError, match="cannot tell which model to load"):
        choose_auto_class({"architectures": ["LlamaForCausalLM"]}, {"task_type": "CAUSAL_LM"})


def test_checkpoint_saved_by_current_peft_passes_and_is_its_own_source(tmp_path):
    """Any LoRA checkpoint, not only repaired ones: a correct modules_to_save setup saved by the installed peft."""
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "llama", num_labels=3, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trained = peft.get_peft_model(model, lora)
    with torch.no_grad():  # stand-in for training: move LoRA and the saved head away from their init
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    trained.save_pretrained(tmp_path / "adapter")

    result = verify_checkpoint(tmp_path / "adapter", tmp_path / "base", source_dir=tmp_path / "adapter")
    assert result.ok, render_verdict(result, "text")
    assert result.max_logit_diff_vs_source <= 1e-4


def test_the_public_verify_stays_a_function_after_its_package_is_imported():
    """A subpackage named like the verb would replace ``ckpt_migrate.verify`` once imported (as fix --verify does)."""
    import importlib

    import ckpt_migrate

    importlib.import_module("ckpt_migrate.verification.checks")
    assert callable(ckpt_migrate.verify) and ckpt_migrate.verify.__module__ == "ckpt_migrate.api"
