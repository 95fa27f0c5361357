"""Migration 0009: optimizer/engine state of DeepSpeed, FSDP and accelerate is dropped once the repair changed the
trainable parameters, with the consequence stated; every file of the checkpoint gets a verdict.

accelerate: REAL ``Accelerator.save_state`` output written with peft 0.12 (tests/fixtures_layouts/
llama_accelerate_state). DeepSpeed and FSDP: PLACEHOLDERS, not real engine state. Their engines cannot run on
this CPU-only machine without their launchers, so these tests add files named exactly as those backends name
them (DeepSpeed through Trainer: ``latest``, ``global_step2/mp_rank_00_model_states.pt``,
``global_step2/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt``, ``zero_to_fp32.py``; FSDP through accelerate:
``pytorch_model_fsdp.bin``, ``pytorch_model_fsdp_0/``, ``optimizer_0/``, ``optimizer.bin``) to a real peft 0.12
Trainer checkpoint. Their content is a few bytes of text that no reader would accept: the tool decides by name
and never reads them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURES, LAYOUTS, OLD_STACK, run_cli

ACCELERATE = LAYOUTS / "llama_accelerate_state" / "run" / "checkpoint-2"
PLACEHOLDER = b"placeholder for layout, not real engine state\n"
DEEPSPEED = {
    "latest": b"global_step2",
    "global_step2/mp_rank_00_model_states.pt": PLACEHOLDER,
    "global_step2/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": PLACEHOLDER,
    "zero_to_fp32.py": b"# DeepSpeed's consolidation script (placeholder)\n",
}
FSDP = {
    "pytorch_model_fsdp.bin": PLACEHOLDER,
    "pytorch_model_fsdp_0/__0_0.distcp": PLACEHOLDER,
    "pytorch_model_fsdp_0/.metadata": PLACEHOLDER,
    "optimizer_0/__0_0.distcp": PLACEHOLDER,
    "optimizer_0/.metadata": PLACEHOLDER,
    "optimizer.bin": PLACEHOLDER,
}


def checkpoint_with(tmp_path: Path, source: Path, extra: dict[str, bytes]) -> Path:
    src = tmp_path / "checkpoint-2"
    shutil.copytree(source, src)
    for name, data in extra.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return src


def fixed(src: Path, out: Path) -> dict:
    code, dry, _ = run_cli("fix", src, "--dry-run", "--format", "json")
    assert code == 0
    code, real, _ = run_cli("fix", src, "--out", out, "--quiet", "--format", "json")
    assert code == 0
    dry_entry, entry = json.loads(dry)["checkpoints"][0], json.loads(real)["checkpoints"][0]
    assert dry_entry["files"] == entry["files"] and dry_entry["warnings"] == entry["warnings"]
    return entry


def verdicts(entry: dict) -> dict[str, str]:
    return {f["name"]: f["verdict"] for f in entry["files"]}


def test_deepspeed_engine_state_is_dropped_with_how_to_start_from_the_weights(tmp_path):
    src = checkpoint_with(tmp_path, FIXTURES / "llama_score" / "run" / "checkpoint-2", DEEPSPEED)
    entry = fixed(src, tmp_path / "out")
    found = verdicts(entry)
    assert {n: found[n] for n in DEEPSPEED} == {
        "latest": "dropped",
        "global_step2/mp_rank_00_model_states.pt": "dropped",
        "global_step2/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": "dropped",
        "zero_to_fp32.py": "copied",
    }
    assert not (tmp_path / "out" / "global_step2").exists() and not (tmp_path / "out" / "latest").exists()
    (warning,) = [w for w in entry["warnings"] if w.startswith("DeepSpeed")]
    assert "Can't find a valid checkpoint" in warning and "without resume_from_checkpoint" in warning
    assert "PeftModel.from_pretrained(base, DIR, is_trainable=True)" in warning


def test_fsdp_state_is_dropped_and_the_consequence_stated(tmp_path):
    src = checkpoint_with(tmp_path, FIXTURES / "llama_score" / "run" / "checkpoint-2", FSDP)
    entry = fixed(src, tmp_path / "out")
    assert {n: verdicts(entry)[n] for n in FSDP} == dict.fromkeys(FSDP, "dropped")
    assert [w for w in entry["warnings"] if w.startswith(("FSDP", "accelerate"))] == [
        w for w in entry["warnings"] if w.startswith("FSDP model/optimizer state was dropped")
    ]
    manifest = json.loads((tmp_path / "out" / "ckpt_migrate_manifest.json").read_text())
    assert set(FSDP) <= set(manifest["inputs_not_read_bytes"])


def test_real_accelerate_state_is_dropped_where_it_follows_the_parameters(tmp_path):
    out = tmp_path / "out"
    entry = fixed(ACCELERATE, out)
    assert verdicts(entry) == {
        "README.md": "copied",
        "adapter_config.json": "rewritten",
        "adapter_model.safetensors": "rewritten",
        "model.safetensors": "dropped",  # the whole PeftModel, broken head included
        "optimizer.bin": "dropped",
        "random_states_0.pkl": "copied",
        "scheduler.bin": "copied",
    }
    assert any(w.startswith("accelerate save_state's per-parameter state was dropped") for w in entry["warnings"])


def test_the_dropped_accelerate_state_does_not_fit_the_repaired_model(tmp_path):
    """What would happen without 0009: accelerator.load_state of the source into the repaired model fails."""
    import torch
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "out"
    assert run_cli("fix", ACCELERATE, "--out", out, "--quiet")[0] == 0
    base = AutoModelForSequenceClassification.from_pretrained(ACCELERATE.parents[1] / "base")
    model = PeftModel.from_pretrained(base, str(out), is_trainable=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    with pytest.raises(RuntimeError, match="score"):
        accelerator.load_state(str(ACCELERATE))


def test_a_pickled_model_file_beside_an_adapter_is_copied_unexamined(tmp_path):
    """accelerate save_state(safe_serialization=False) writes the whole PeftModel as pytorch_model.bin: a pickle is
    not read to tell, so it is copied unexamined and named in a warning (a placeholder file here)."""
    src = checkpoint_with(
        tmp_path, FIXTURES / "llama_score" / "run" / "checkpoint-2", {"pytorch_model.bin": PLACEHOLDER}
    )
    entry = fixed(src, tmp_path / "out")
    assert verdicts(entry)["pytorch_model.bin"] == "copied unexamined"
    assert any(w.startswith("copied unexamined: pytorch_model.bin") for w in entry["warnings"])


def test_per_parameter_state_is_copied_when_the_trainable_parameters_did_not_change(tmp_path):
    src = checkpoint_with(tmp_path, OLD_STACK / "llama_full_finetune" / "run" / "checkpoint-2", DEEPSPEED)
    entry = fixed(src, tmp_path / "out")
    assert "0009_drop_stale_engine_state" in entry["migrations_not_needed"]
    reasons = {f["name"]: f["reason"] for f in entry["files"]}
    assert {n: verdicts(entry)[n] for n in DEEPSPEED} == dict.fromkeys(DEEPSPEED, "copied")
    assert reasons["latest"].endswith("the trainable parameters did not change")
    assert reasons["optimizer.pt"].endswith("the trainable parameters did not change")
    assert reasons["model.safetensors"] == "model weights: independent of the trainable parameters"


def test_unknown_files_are_copied_unexamined_and_said_so(tmp_path):
    extra = {"my_state/custom_optimizer.pt": PLACEHOLDER, "notes.txt": b"mine\n"}
    src = checkpoint_with(tmp_path, FIXTURES / "llama_score" / "run" / "checkpoint-2", extra)
    entry = fixed(src, tmp_path / "out")
    assert {n: verdicts(entry)[n] for n in extra} == dict.fromkeys(extra, "copied unexamined")
    (warning,) = [w for w in entry["warnings"] if w.startswith("copied unexamined")]
    assert "my_state/custom_optimizer.pt" in warning and "no longer matches" in warning
    for name, data in extra.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    code, text, _ = run_cli("fix", src, "--dry-run")
    assert code == 0 and "copied unexamined" in text
