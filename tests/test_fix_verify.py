"""``fix --verify`` checks the staged output and publishes only verified checkpoints."""

from __future__ import annotations

import json

from conftest import FIXTURES, run_cli

import ckpt_migrate.verification

CASE = FIXTURES / "distilbert_two_heads"


def test_fix_verify_publishes_a_verified_repair(tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        "fix", CASE / "run", "--out", out, "--base-model", CASE / "base", "--verify", "--format", "json"
    )
    assert code == 0
    (entry,) = json.loads(stdout)["checkpoints"]
    assert entry["status"] == "repaired"
    assert entry["verification"]["ok"] is True
    assert entry["verification"]["max_logit_diff_vs_source"] <= 1e-4
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists()


def test_fix_verify_publishes_nothing_when_verification_fails(tmp_path, monkeypatch):
    real = ckpt_migrate.verification.verify_checkpoint

    def failing(*args, **kwargs):
        verdict = real(*args, **kwargs)
        verdict.ok = False
        verdict.reasons.append("forced failure for the test")
        return verdict

    monkeypatch.setattr(ckpt_migrate.verification, "verify_checkpoint", failing)
    out = tmp_path / "out"
    code, _, stderr = run_cli("fix", CASE / "run", "--out", out, "--base-model", CASE / "base", "--verify")
    assert code == 8
    assert "forced failure" in stderr and len(stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_fix_verify_needs_a_base_model(tmp_path):
    """--verify asked for and no base model at hand (none given, none named by the adapter): a usage error (exit 2),
    and nothing is written."""
    code, _, stderr = run_cli("fix", CASE / "run", "--out", tmp_path / "out", "--verify")
    assert code == 2 and "--base-model" in stderr
    assert not (tmp_path / "out").exists()
