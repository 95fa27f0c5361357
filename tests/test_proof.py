"""The static proof: what it refuses, with which exit code, before anything is written; and what it never claims."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, run_cli

from ckpt_migrate import load
from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.formats.checkpoint import load_state
from ckpt_migrate.planner import plan_checkpoint
from ckpt_migrate.proof import CAUSE_ADAPTER, CAUSE_BASE, FAILED, PROVEN, prove_adapter, prove_plan

LLAMA = FIXTURES / "llama_score"
BART = FIXTURES / "bart_lora_only_head"  # a base of another architecture for the llama adapter
CHECKPOINT = LLAMA / "run" / "checkpoint-2"


def _one_error_line(stderr: str) -> str:
    (line,) = stderr.strip().splitlines()
    assert line.startswith("ckpt-migrate: error: ")
    return line


@pytest.mark.parametrize("optimizer", ["drop", "remap"])
def test_fix_on_a_base_of_another_architecture_is_exit_5_and_writes_nothing(tmp_path, optimizer):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        "fix", CHECKPOINT, "--out", out, "--base-model", BART / "base", "--optimizer", optimizer, "--quiet"
    )
    assert code == 5, stderr
    line = _one_error_line(stderr)
    assert "does not fit the adapter" in line and "(+" in line  # the list is capped, with a count
    assert "fell back to drop" not in stdout + stderr  # remap must not quietly drop on a wrong base
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory left


def test_a_batch_on_the_wrong_base_publishes_nothing_and_exits_5(tmp_path):
    code, _, stderr = run_cli("fix", LLAMA / "run", "--out", tmp_path / "out", "--base-model", BART / "base")
    assert code == 5
    assert stderr.count("does not fit the adapter") == 2  # one line per checkpoint
    assert not (tmp_path / "out").exists()


def test_verify_and_load_on_the_wrong_base_are_exit_5(tmp_path):
    out = tmp_path / "out"
    assert run_cli("fix", CHECKPOINT, "--out", out, "--base-model", LLAMA / "base", "--quiet")[0] == 0
    code, _, stderr = run_cli("verify", out, "--base-model", BART / "base")
    assert code == 5 and "does not fit the adapter" in _one_error_line(stderr)
    with pytest.raises(UnreadableInputError, match="does not fit the adapter"):
        load(BART / "base", CHECKPOINT)


def test_without_a_base_the_output_is_written_but_never_called_repaired(tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run_cli("fix", CHECKPOINT, "--out", out, "--quiet")
    assert code == 0 and "written, NOT proven" in stdout and "repaired ->" not in stdout
    assert "exactly" not in stdout and "reproduces the trained model: not shown" in stdout
    assert f"ckpt-migrate verify {out} --base-model BASE --source {CHECKPOINT}" in stdout
    code, report, _ = run_cli("fix", CHECKPOINT, "--out", tmp_path / "again", "--quiet", "--format", "json")
    (entry,) = json.loads(report)["checkpoints"]
    assert entry["status"] == "written" and entry["proof"]["state"] == "not run"
    assert entry["reproduces"]["shown"] == "no" and entry["reproduces"]["check_with"]


def test_with_a_base_the_words_come_with_the_proof(tmp_path):
    code, report, _ = run_cli(
        "fix", CHECKPOINT, "--out", tmp_path / "out", "--base-model", LLAMA / "base", "--quiet", "--format", "json"
    )
    (entry,) = json.loads(report)["checkpoints"]
    assert code == 0 and entry["status"] == "repaired"
    assert entry["proof"]["state"] == "proven" and len(entry["proof"]["established"]) == 3
    assert "meta device" in entry["proof"]["how"] and "peft" in entry["proof"]["how"]
    # the base is tiny, so verify ran unasked and the claim is the measured one
    assert entry["verification"]["ok"] and entry["reproduces"]["shown"] == "numerically"


def test_the_proof_leaves_the_plan_as_it_was():
    base = BaseModel.open(LLAMA / "base")
    plan = plan_checkpoint(CHECKPOINT, ".", base)
    config = copy.deepcopy(plan.after.config)
    assert prove_plan(plan, base).state == PROVEN
    assert plan.after.config == config  # peft's task classes extend modules_to_save in place: not the plan's


def test_a_lora_only_head_over_a_base_without_it_is_random_and_named():
    case = FIXTURES / "bart_lora_only_head_nobase"
    state = load_state(next((case / "run").iterdir()))
    proof = prove_adapter(state, BaseModel.open(case / "base"))
    assert proof.state == FAILED and proof.cause == CAUSE_ADAPTER
    assert "classification_head would be random on every load" in proof.reason
    assert proof.error().exit_code == 4


def test_a_config_no_peft_loads_fails_with_peft_s_own_message():
    """A head-only repair whose config lost every target: peft itself refuses to inject it."""
    base = BaseModel.open(LLAMA / "base")
    state = plan_checkpoint(CHECKPOINT, ".", base).after.clone()
    state.config = {**state.config, "target_modules": []}
    for name in [n for n in state.tensors if "lora_" in n]:
        state.remove_tensor(name)
    proof = prove_adapter(state, base)
    assert proof.state == FAILED and proof.cause == CAUSE_ADAPTER
    assert "target_modules" in proof.reason and proof.error().exit_code == 4


def test_an_adapter_tensor_of_another_shape_blames_the_base():
    base = BaseModel.open(LLAMA / "base")
    state = plan_checkpoint(CHECKPOINT, ".", base).after.clone()
    name = next(n for n in state.tensors if n.endswith("q_proj.lora_A.weight"))
    tensor = state.tensors[name]
    state.add_tensor(type(tensor)(name, (tensor.shape[0], tensor.shape[1] * 2), tensor.dtype, tensor.source))
    proof = prove_adapter(state, base)
    assert proof.state == FAILED and proof.cause == CAUSE_BASE and name in proof.reason


def test_a_dry_run_with_a_base_promises_the_proof_without_importing_torch(tmp_path):
    script = (
        "import sys, json\n"
        "from ckpt_migrate import fix\n"
        "from ckpt_migrate.render import to_dict\n"
        f"report = fix({str(CHECKPOINT)!r}, dry_run=True, base_model={str(LLAMA / 'base')!r})\n"
        "entry = to_dict(report)['checkpoints'][0]\n"
        "print(json.dumps([entry['proof']['state'], 'torch' in sys.modules, 'transformers' in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == ["will run", False, False]


def test_export_proves_before_writing(tmp_path):
    shutil.copytree(CHECKPOINT, tmp_path / "src")
    code, report, _ = run_cli(
        "export", tmp_path / "src", "--out", tmp_path / "m", "--base-model", LLAMA / "base", "--format", "json"
    )
    assert code == 0 and json.loads(report)["checkpoints"][0]["proof"]["state"] == "proven"
    assert Path(tmp_path / "m" / "config.json").is_file()


@pytest.mark.parametrize("tied", [True, False])
def test_tied_weights_count_once_and_an_untied_missing_weight_is_named(tmp_path, tied):
    """transformers saves a tied lm_head once (as the embedding): the proof must not call it random; untied, the
    same file lacks lm_head.weight and the proof names it."""
    import transformers

    from ckpt_migrate.core.plan import CheckpointState, PlannedTensor, Source, SourceKind

    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=50, tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "tie_word_embeddings": tied}))
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{module}.{part}.weight": PlannedTensor(f"{module}.{part}.weight", shape, "F32", Source(SourceKind.ADAPTER))
        for part, shape in (("lora_A", (4, 16)), ("lora_B", (16, 4)))
    }
    adapter = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    proof = prove_adapter(CheckpointState(tmp_path, adapter, tensors, {}, "x"), BaseModel.open(tmp_path))
    if tied:
        assert proof.state == PROVEN, proof.reason
    else:
        assert proof.state == FAILED and "lm_head.weight" in proof.reason and "random" in proof.reason
