"""The repair reproduces the trained model: repaired adapters, loaded by real peft onto a base model
whose head is random, give the logits the model had when it was trained."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import FIXTURES, HELDOUT, OLD_STACK, adapter_cases, case_dirs, load_case, needs_base, old_python
from logits_check import max_logit_error, stack_versions
from packaging.version import Version

REPAIRABLE = [
    (case_dir, name)
    for case_dir in adapter_cases()
    for name in load_case(case_dir)["checkpoints"]
    if not (needs_base(load_case(case_dir)) and not load_case(case_dir)["head_in_base"])
]


WRITTEN_BY_OLD_PEFT = [(c, n) for c, n in REPAIRABLE if Version(load_case(c)["peft_version"]) <= Version("0.12.0")]


@pytest.mark.parametrize(("case_dir", "checkpoint"), REPAIRABLE, ids=lambda v: getattr(v, "name", v))
def test_repaired_adapter_reproduces_trained_logits_with_installed_peft(repaired, case_dir, checkpoint):
    tolerance = load_case(case_dir)["tolerance"]
    error = max_logit_error(case_dir, repaired[case_dir.name] / checkpoint, checkpoint)
    assert error <= tolerance


def test_broken_original_fails_with_installed_peft(tmp_path):
    """The bug is real: current peft cannot load the unrepaired double-wrapped adapter."""
    case_dir = FIXTURES / "llama_score"
    with pytest.raises(Exception, match="score"):
        max_logit_error(case_dir, case_dir / "run" / "checkpoint-2", "checkpoint-2")


@pytest.fixture(scope="module")
def peft_0_12_errors(repaired) -> dict[str, float]:
    """One start of the peft 0.12 interpreter for every check of this module: the repaired adapters written by peft
    <= 0.12, and llama_score's broken original. Adapter dir -> max |logit error|."""
    args = []
    for case_dir, checkpoint in WRITTEN_BY_OLD_PEFT:
        args += [str(case_dir), str(repaired[case_dir.name] / checkpoint), checkpoint]
    original = FIXTURES / "llama_score"
    args += [str(original), str(original / "run" / "checkpoint-2"), "checkpoint-2"]
    script = str(FIXTURES.parent / "logits_check.py")
    result = subprocess.run([old_python(), script, *args], capture_output=True, text=True, check=True)
    assert stack_versions(result.stderr)[0] == "0.12.0"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(old_python() is None, reason="no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
def test_repaired_adapters_reproduce_trained_logits_with_peft_0_12(repaired, peft_0_12_errors):
    """Without a target, adapters written by peft <= 0.12 stay loadable there (today's need --target-peft)."""
    for case_dir, checkpoint in WRITTEN_BY_OLD_PEFT:
        error = peft_0_12_errors[str(repaired[case_dir.name] / checkpoint)]
        assert error <= load_case(case_dir)["tolerance"], (case_dir.name, checkpoint, error)


@pytest.mark.skipif(old_python() is None, reason="no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
def test_peft_0_12_silently_loses_the_head_of_the_broken_original(peft_0_12_errors):
    case_dir = FIXTURES / "llama_score"
    error = peft_0_12_errors[str(case_dir / "run" / "checkpoint-2")]
    assert error > 1e-2


def test_folded_head_keeps_the_dtype_the_head_had(repaired):
    from safetensors import safe_open

    with safe_open(repaired["mistral_bf16"] / "checkpoint-2" / "adapter_model.safetensors", "pt") as handle:
        assert handle.get_tensor("base_model.model.score.weight").dtype.is_floating_point
        assert str(handle.get_tensor("base_model.model.score.weight").dtype) == "torch.bfloat16"


def test_bin_adapter_is_rewritten_as_safetensors(repaired):
    out = repaired["bert_bin"] / "checkpoint-2"
    assert (out / "adapter_model.safetensors").exists()
    assert not (out / "adapter_model.bin").exists()


def test_config_moves_heads_to_modules_to_save(repaired):
    config = json.loads((repaired["roberta_nested"] / "checkpoint-2" / "adapter_config.json").read_text())
    assert "classifier" in config["modules_to_save"]
    # "dense" also names classifier.dense, so the body modules are spelled out.
    assert all(not t.startswith("classifier") for t in config["target_modules"])
    assert any(t.endswith("attention.output.dense") for t in config["target_modules"])
    distil = json.loads((repaired["distilbert_two_heads"] / "checkpoint-2" / "adapter_config.json").read_text())
    # peft wraps every module whose name ends with a modules_to_save entry.
    assert all(any(head.endswith(e) for e in distil["modules_to_save"]) for head in ("pre_classifier", "classifier"))
    assert "pre_classifier" not in distil["target_modules"] and "classifier" not in distil["target_modules"]
    rslora = json.loads((repaired["llama_rslora_pattern"] / "checkpoint-2" / "adapter_config.json").read_text())
    assert "score" not in rslora["rank_pattern"] and "score" not in rslora["alpha_pattern"]


def test_source_fixtures_were_made_by_the_releases_they_name():
    for case_dir in case_dirs(FIXTURES) + case_dirs(HELDOUT):
        assert load_case(case_dir)["peft_version"] == "0.12.0"
    written_by = {(c["peft_version"], c["transformers_version"]) for c in map(load_case, case_dirs(OLD_STACK))}
    assert {("0.8.2", "4.38.2"), ("0.9.0", "4.38.2"), ("0.10.0", "4.40.2"), ("0.11.1", "4.42.4")} <= written_by


def test_dry_run_does_not_import_torch():
    code = (
        "import sys, ckpt_migrate; "
        f"r = ckpt_migrate.fix({str(FIXTURES / 'llama_score' / 'run')!r}, dry_run=True); "
        "assert r.checkpoints[0].status == 'repairable'; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
