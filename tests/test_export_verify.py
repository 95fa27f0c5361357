"""export says what it showed: the staged model is verified (plain transformers against the source computed
unmerged by peft) before it is published, unasked for bases up to 1 GB; without that, the report claims nothing and
names the command that checks it; a failed verdict publishes nothing."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, run_cli

import ckpt_migrate
from ckpt_migrate.render import to_dict
from ckpt_migrate.verbs import exporting
from ckpt_migrate.verification import VerifyResult

CASE = FIXTURES / "llama_score"
SRC, BASE = CASE / "run" / "checkpoint-4", CASE / "base"


def test_export_is_verified_before_it_is_published_and_says_so(tmp_path):
    out = tmp_path / "merged"
    result = run_cli("export", SRC, "--out", out, "--base-model", BASE, "--format", "json")
    assert result.exit_code == 0, result.stderr
    entry = json.loads(result.stdout)["checkpoints"][0]
    assert entry["verification"]["ok"] and entry["verification"]["checkpoint"] == str(out)  # not the staging dir
    assert entry["verification"]["max_logit_diff_vs_source"] < 1e-6
    assert entry["reproduces"]["shown"] == "numerically" and "plain transformers" in entry["reproduces"]["text"]

    text = run_cli("export", SRC, "--out", tmp_path / "merged2", "--base-model", BASE).stdout
    assert "verify: OK (max |logit diff|" in text
    assert "reproduces the trained model: shown numerically" in text
    assert "reproduces the trained model's outputs" not in text  # no claim in a warning that no run showed


def test_export_without_verify_claims_nothing_and_names_the_check(tmp_path):
    out = tmp_path / "merged"
    report = ckpt_migrate.export(SRC, out, base_model=BASE, verify=False)
    entry = to_dict(report)["checkpoints"][0]
    assert "verification" not in entry
    assert entry["reproduces"]["shown"] == "no"
    assert entry["reproduces"]["check_with"] == f"ckpt-migrate verify {out} --base-model {BASE} --source {SRC}"
    checked = run_cli(*entry["reproduces"]["check_with"].split()[1:])  # the named command shows it
    assert checked.exit_code == 0, checked.stderr


def test_a_failed_verdict_publishes_nothing(tmp_path, monkeypatch):
    def failing(staged, base, *, source):
        assert (staged / "model.safetensors").is_file()  # judged once written, before it is published
        reason = "logits differ from the source by 3.1 (tolerance 0.0001)"
        return VerifyResult(False, [reason], 0.0, [], [], [], 3.1)

    monkeypatch.setattr(exporting, "verify_after_proof", failing)
    out = tmp_path / "merged"
    with pytest.raises(ckpt_migrate.CkptMigrateError) as raised:
        ckpt_migrate.export(SRC, out, base_model=BASE)
    assert raised.value.exit_code == 8 and "not published" in str(raised.value.message)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no output, no staging left
