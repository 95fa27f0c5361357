"""A repaired Trainer checkpoint resumes under the newest stack and under peft 0.12 / numpy 1;
with ``--optimizer remap`` Adam moments and the learning-rate schedule continue."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import FIXTURES, load_case, old_python
from resume_check import resume

from ckpt_migrate import fix

CASE = FIXTURES / "bert_resume"
CHECKPOINT = "checkpoint-4"


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """The mid-run checkpoint repaired with each optimizer policy: policy -> checkpoint dir."""
    outputs = {}
    for policy in ("drop", "remap"):
        out = tmp_path_factory.mktemp("resume") / policy
        report = fix(CASE / "run" / CHECKPOINT, out, base_model=CASE / "base", optimizer=policy, progress=False)
        assert report.exit_code == 0
        outputs[policy] = out
    return outputs


def schedule_lr(step: int) -> float:
    """Trainer's linear schedule with warmup, as configured for this fixture."""
    training = load_case(CASE)["training"]
    peak, warmup, total = training["learning_rate"], training["warmup_steps"], training["max_steps"]
    return peak * step / warmup if step < warmup else peak * max(0.0, (total - step) / (total - warmup))


def original_first_exp_avg() -> list[float]:
    saved = torch.load(CASE / "run" / CHECKPOINT / "optimizer.pt", weights_only=True)
    first = saved["param_groups"][0]["params"][0]
    return saved["state"][first]["exp_avg"].flatten()[:8].tolist()


def check_remap(seen: dict) -> None:
    assert seen["global_step_at_start"] == 4
    assert len(seen["steps"]) >= 3
    assert seen["first_decay_param_exp_avg"] == original_first_exp_avg()
    assert seen["learning_rates"][0] == pytest.approx(schedule_lr(4))
    assert schedule_lr(4) != pytest.approx(schedule_lr(0))


def check_drop(seen: dict) -> None:
    assert len(seen["steps"]) >= 3
    assert seen["first_decay_param_exp_avg"] is None
    assert seen["learning_rates"][0] == pytest.approx(schedule_lr(0)), "drop restarts the schedule"


def test_remap_keeps_moments_and_schedule_with_newest_stack(resumable):
    check_remap(resume(CASE, resumable["remap"]))


def test_drop_resumes_with_newest_stack_and_restarts_the_schedule(resumable):
    check_drop(resume(CASE, resumable["drop"]))


def test_remap_report_lists_kept_reset_and_dropped(resumable):
    manifest = json.loads((resumable["remap"] / "ckpt_migrate_manifest.json").read_text())
    assert "optimizer.pt" in manifest["outputs_sha256"]
    report = fix(CASE / "run" / CHECKPOINT, dry_run=True, base_model=CASE / "base", optimizer="remap")
    rewrite = dict(report.checkpoints[0].plan.files_rewritten)["optimizer.pt"]
    assert set(dict(rewrite.listed)["reset"]) == {"classifier.weight", "classifier.bias"}
    assert "classifier.lora_A" in dict(rewrite.listed)["dropped"]
    assert all(".lora_" in kept for kept in dict(rewrite.listed)["kept"])


def test_remap_without_base_model_falls_back_to_drop_with_a_warning():
    report = fix(CASE / "run" / CHECKPOINT, dry_run=True, optimizer="remap")
    plan = report.checkpoints[0].plan
    assert "optimizer.pt" in plan.after.dropped_files
    assert any("fell back to drop" in w for w in plan.warnings)


@pytest.mark.skipif(old_python() is None, reason="no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
@pytest.mark.parametrize("policy", ["remap", "drop"])
def test_resume_with_peft_0_12_and_numpy_1(resumable, policy):
    script = str(FIXTURES.parent / "resume_check.py")
    result = subprocess.run(
        [old_python(), script, str(CASE), str(resumable[policy])], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    check_remap(seen) if policy == "remap" else check_drop(seen)
