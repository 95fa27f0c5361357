"""ckpt_migrate.guard catches a classification head that would be lost after saving, before training starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_migrate.guard import HeadWrappedError, check_model, find_head_problems

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TESTS = Path(__file__).parent

BART = dict(
    vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
)  # fmt: skip
LLAMA = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
GOOD = dict(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"], modules_to_save=["score"])


def tiny(arch: str, **overrides):
    torch.manual_seed(0)
    sizes = {**(BART if arch == "bart" else LLAMA), **overrides}
    config = transformers.AutoConfig.for_model(arch, num_labels=3, **sizes)
    return transformers.AutoModelForSequenceClassification.from_config(config)


def peft_model(model, **lora):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **lora))


def test_import_stays_light():
    code = (
        "import sys, ckpt_migrate.guard, ckpt_migrate.verification; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bart_all_linear_seq_cls_is_caught_with_current_peft():
    model = peft_model(tiny("bart"), task_type="SEQ_CLS", target_modules="all-linear")
    with pytest.raises(HeadWrappedError) as info:
        check_model(model)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.heads == ["classification_head"]
    assert error.modules == ["classification_head.dense", "classification_head.out_proj"]
    message = str(error)
    assert "classification_head.dense, classification_head.out_proj" in message
    assert "carries LoRA" in message and "modules_to_save" in message


def test_llama_without_task_type_is_caught():
    model = peft_model(tiny("llama"), target_modules="all-linear")
    with pytest.raises(HeadWrappedError, match=r"head 'score' carries LoRA layers \(score\)") as info:
        check_model(model)
    assert [p.kind for p in info.value.problems] == ["lora"]


def test_correct_config_passes():
    model = peft_model(tiny("llama"), **GOOD)
    check_model(model)
    assert find_head_problems(model) == []


def test_plain_model_without_adapters_passes():
    check_model(tiny("bart"))


def test_frozen_head_is_fine_only_when_the_base_checkpoint_holds_it(tmp_path):
    from safetensors.torch import load_file, save_file

    with_head, without_head = tmp_path / "with_head", tmp_path / "without_head"
    tiny("llama").save_pretrained(with_head)
    tiny("llama").save_pretrained(without_head)
    weights = load_file(without_head / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("score.")}, without_head / "model.safetensors")

    # no task_type, head not targeted: frozen, not saved, taken from the base at load time
    frozen = dict(target_modules=["q_proj", "v_proj"])
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(with_head)
    check_model(peft_model(loaded, **frozen))  # name_or_path is a local dir holding score.weight

    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(without_head)
    with pytest.raises(HeadWrappedError, match="score.weight are not saved by save_pretrained and are not in"):
        check_model(peft_model(loaded, **frozen))

    unknown = peft_model(tiny("llama"), **frozen)  # built from a config: nowhere to look the head up
    with pytest.raises(HeadWrappedError, match="cannot be checked") as info:
        check_model(unknown)
    assert "list 'score' in modules_to_save" in str(info.value)
    check_model(unknown, base_model_dir=with_head)


def test_trainable_head_that_is_not_saved_is_caught():
    model = peft_model(tiny("llama"), target_modules=["q_proj", "v_proj"])
    model.base_model.model.score.weight.requires_grad_(True)
    with pytest.raises(HeadWrappedError, match="training is lost") as info:
        check_model(model)
    assert info.value.modules == ["score.weight"]


class _Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        ids = torch.arange(3 + index, 11 + index)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(index % 3)}


def _trainer(model, tmp_path, callback):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[callback])


def test_callback_stops_trainer_train_before_the_first_step(tmp_path):
    from ckpt_migrate.guard import HeadGuardCallback

    assert issubclass(HeadGuardCallback, transformers.TrainerCallback)
    model = peft_model(tiny("bart"), task_type="SEQ_CLS", target_modules="all-linear")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = _trainer(model, tmp_path, HeadGuardCallback())
    with pytest.raises(HeadWrappedError, match="classification_head"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_callback_lets_a_correct_setup_train(tmp_path):
    from ckpt_migrate.guard import HeadGuardCallback

    trainer = _trainer(peft_model(tiny("llama"), **GOOD), tmp_path, HeadGuardCallback())
    trainer.train()
    assert trainer.state.global_step == 1


def test_callback_on_train_begin_with_model_kwarg():
    from ckpt_migrate.guard import HeadGuardCallback

    callback = HeadGuardCallback()
    args, state, control = object(), transformers.TrainerState(), transformers.TrainerControl()
    with pytest.raises(HeadWrappedError, match="score"):
        callback.on_train_begin(args, state, control, model=peft_model(tiny("llama"), target_modules="all-linear"))
    assert callback.on_train_begin(args, state, control, model=peft_model(tiny("llama"), **GOOD)) is control
