"""Resume anywhere: whole Trainer checkpoints, fixed for the stack that will load them, resume and save there.

Checkpoints are real: written by the releases named in their case.json (scripts/make_fixtures.py --old-stack).
The old stack is peft 0.12.0 / transformers 4.44.2 / numpy 1 (CKPT_MIGRATE_OLD_PYTHON, as CI builds it).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import OLD_STACK, load_case, old_python, run_cli
from resume_check import resume

TESTS = Path(__file__).parent


def fixed(src: Path, out: Path, *extra: str) -> dict:
    result = run_cli("fix", src, "--out", out, "--quiet", "--format", "json", *extra)
    assert result.exit_code == 0, result.stdout + result.stderr
    return json.loads(result.stdout)["checkpoints"][0]


def resume_old(case_dir: Path, checkpoint: Path, extra_steps: int) -> dict:
    python = old_python()
    if python is None:
        pytest.skip("no peft 0.12 / transformers 4.44 interpreter: set CKPT_MIGRATE_OLD_PYTHON")
    command = [python, str(TESTS / "resume_check.py"), str(case_dir), str(checkpoint), str(extra_steps)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_resumed_and_saved(seen: dict, start: int, steps: int) -> None:
    assert "error" not in seen, seen.get("error")
    assert seen["global_step_at_start"] == start
    assert seen["steps"][-1] == start + steps and seen["saved_global_step"] == start + steps


# ------------------------------------------------------------------------------------ full fine-tune


FULL = OLD_STACK / "llama_full_finetune"


def test_a_full_fine_tune_is_accepted_and_only_its_rng_state_rewritten(tmp_path):
    assert load_case(FULL)["numpy_version"].startswith("1.")
    entry = fixed(FULL / "run" / "checkpoint-2", tmp_path / "fixed")
    assert entry["migrations"] == ["0004_portable_rng_state"]
    assert "0001_fold_double_wrapped_head" in entry["migrations_not_needed"]
    assert not entry["tensors_added"] and not entry["files_removed"]
    source = FULL / "run" / "checkpoint-2" / "model.safetensors"
    assert (tmp_path / "fixed" / "model.safetensors").read_bytes() == source.read_bytes()


def test_full_fine_tune_from_numpy_1_resumes_and_saves_under_the_newest_stack(tmp_path):
    out = tmp_path / "fixed"
    fixed(FULL / "run" / "checkpoint-2", out)
    assert_resumed_and_saved(resume(FULL, out, extra_steps=3), start=2, steps=3)


def test_full_fine_tune_from_numpy_1_resumes_and_saves_under_transformers_4_44(tmp_path):
    out = tmp_path / "fixed"
    fixed(FULL / "run" / "checkpoint-2", out, "--target-transformers", "4.44.2")
    before = resume_old(FULL, FULL / "run" / "checkpoint-2", 3)
    assert "numpy.core.multiarray._reconstruct" in before["error"], "the original cannot resume there"
    seen = resume_old(FULL, out, 3)
    assert seen["versions"]["transformers"] == "4.44.2" and seen["versions"]["numpy"].startswith("1.")
    assert_resumed_and_saved(seen, start=2, steps=3)


# ------------------------------------------------------------------------------ transformers 4.38 / 4.40


@pytest.mark.parametrize("case", ["llama_score_peft082", "bert_classifier_peft0100"])
def test_lora_checkpoints_from_transformers_4_38_and_4_40_resume_and_save_under_the_newest_stack(tmp_path, case):
    case_dir = OLD_STACK / case
    assert load_case(case_dir)["transformers_version"] in ("4.38.2", "4.40.2")
    out = tmp_path / "fixed"
    entry = fixed(case_dir / "run" / "checkpoint-2", out)
    (rewrite,) = [f for f in entry["files_rewritten"] if f["name"] == "trainer_state.json"]
    assert rewrite["added"] and "TrainerControl" in rewrite["added"][0]
    assert_resumed_and_saved(resume(case_dir, out, extra_steps=3), start=2, steps=3)


def test_without_the_trainer_control_state_the_newest_trainer_dies_at_its_first_save(tmp_path):
    case_dir = OLD_STACK / "llama_score_peft082"
    out = tmp_path / "fixed"
    entry = fixed(case_dir / "run" / "checkpoint-2", out, "--target-transformers", "4.44.2")
    assert "0005_trainer_state_for_target" not in entry["migrations"]  # 4.44 needs nothing added
    with pytest.raises(KeyError, match="TrainerControl"):
        resume(case_dir, out, extra_steps=3)


# ---------------------------------------------------------------------- today's stack -> peft 0.12 stack


NEWEST = OLD_STACK / "bart_lora_only_head_newest"


def test_a_checkpoint_of_todays_stack_resumes_on_peft_0_12_with_its_trained_logits(tmp_path):
    case = load_case(NEWEST)
    assert (case["peft_version"], case["transformers_version"]) == ("0.21.2", "5.24.0")
    out = tmp_path / "fixed"
    targets = ("--target-peft", "0.12.0", "--target-transformers", "4.44.2")
    entry = fixed(NEWEST / "run" / "checkpoint-2", out, "--base-model", str(NEWEST / "base"), *targets)
    assert {"0002_fold_lora_only_head", "0005_trainer_state_for_target", "0006_adapter_config_for_target"} <= set(
        entry["migrations"]
    )
    python = old_python()
    if python is None:
        pytest.skip("no peft 0.12 interpreter: set CKPT_MIGRATE_OLD_PYTHON")
    script = str(TESTS / "logits_check.py")
    errors = subprocess.run(
        [python, script, str(NEWEST), str(out), "checkpoint-2"], capture_output=True, text=True, check=True
    )
    assert json.loads(errors.stdout.strip().splitlines()[-1])[str(out)] <= case["tolerance"]
    seen = resume_old(NEWEST, out, 3)
    assert seen["versions"]["transformers"] == "4.44.2" and seen["versions"]["numpy"].startswith("1.")
    assert_resumed_and_saved(seen, start=2, steps=3)
