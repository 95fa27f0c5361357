"""Migration 0008 on a real peft 0.12 bias='lora_only' checkpoint (tests/fixtures_layouts/bert_lora_only_bias).

peft 0.12 trained the biases of the 7 LoRA-wrapped Linear layers and saved none: the trained model cannot be
reproduced (the fixture's logits move by ~2e-2 with those biases put back). Refused by default (exit 4, nothing
written, the lost biases named); with --allow-lossy the best repair is written and reproduces exactly the
trained model with those biases reset (reference ``logits_unsaved_biases_reset``), and the loss is in the report,
the manifest and the last warning; never the word "exactly".
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import FIXTURES, LAYOUTS, load_case, old_python, run_cli
from logits_check import max_logit_error

CASE = LAYOUTS / "bert_lora_only_bias"
SOURCE = CASE / "run" / "checkpoint-2"
LOST = {
    f"bert.encoder.layer.0.{m}.bias"
    for m in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
} | {"bert.pooler.dense.bias"}


@pytest.mark.parametrize("base", [False, True])
def test_refused_by_default_naming_what_is_lost_and_nothing_written(tmp_path, base):
    extra = ["--base-model", CASE / "base"] if base else []
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("fix", SOURCE, "--out", out, "--quiet", *extra)
    assert code == 4 and not out.exists() and list(tmp_path.iterdir()) == []
    assert all(name in stderr for name in LOST) and "huggingface/peft#3306" in stderr and "--allow-lossy" in stderr
    assert ("--base-model" in stderr) is not base
    assert "exactly" not in stdout
    assert run_cli("inspect", SOURCE, *extra)[0] == 4


@pytest.fixture(scope="module")
def lossy(tmp_path_factory):
    out = tmp_path_factory.mktemp("lossy") / "out"
    code, stdout, _ = run_cli("fix", SOURCE, "--out", out, "--quiet", "--allow-lossy", "--format", "json")
    assert code == 0
    code, text, _ = run_cli("fix", SOURCE, "--dry-run", "--allow-lossy")
    assert code == 0
    return out, json.loads(stdout)["checkpoints"][0], text


def test_allow_lossy_records_the_loss_in_report_manifest_and_final_warning(lossy):
    out, entry, text = lossy
    assert entry["status"] == "written" and "0008_refuse_unsaved_lora_only_bias" in entry["migrations"]
    assert entry["reproduces"]["shown"] == "no" and "lossy" in entry["reproduces"]["text"]
    (loss,) = entry["losses"]
    assert all(name in loss for name in LOST)
    manifest = json.loads((out / "ckpt_migrate_manifest.json").read_text())
    assert manifest["losses"] == entry["losses"]
    assert text.rstrip().splitlines()[-1].startswith("WARNING: LOSSY: this output does not reproduce the trained model")
    assert "exactly" not in text and "exactly" not in json.dumps(entry) and "exactly" not in json.dumps(manifest)


def test_the_lossy_output_stays_marked_lossy_for_inspect_fix_export_and_verify(lossy, tmp_path):
    """The output is clean (nothing left to repair) but never reads as the trained model: inspect, a later fix,
    export and verify all carry the manifest's losses (found by an acceptance run: verify said a bare "OK")."""
    out, entry, _ = lossy
    refixed = tmp_path / "refixed"  # a later fix that rewrites something (adapter_config.json for peft 0.8.2)
    code, report, _ = run_cli("fix", out, "--out", refixed, "--target-peft", "0.8.2", "--format", "json")
    assert code == 0 and json.loads(report)["checkpoints"][0]["migrations"] == ["0006_adapter_config_for_target"]
    assert json.loads((refixed / "ckpt_migrate_manifest.json").read_text())["losses"] == entry["losses"]
    code, text, _ = run_cli("inspect", out)
    assert code == 0 and "WARNING: LOSSY: written with --allow-lossy, this checkpoint does not reproduce" in text
    code, report, _ = run_cli("inspect", out, "--format", "json")
    assert json.loads(report)["checkpoints"][0]["losses"] == entry["losses"]
    code, text, _ = run_cli("verify", out, "--base-model", CASE / "base", "--source", SOURCE)
    assert code == 0 and text.startswith("OK, LOSSY:") and "LOSSY: written with --allow-lossy" in text
    code, verdict, _ = run_cli("verify", out, "--base-model", CASE / "base", "--format", "json")
    assert json.loads(verdict)["losses"] == entry["losses"]
    exported = tmp_path / "model"
    assert run_cli("export", out, "--out", exported, "--base-model", CASE / "base", "--quiet")[0] == 0
    code, text, _ = run_cli("verify", exported, "--base-model", CASE / "base", "--source", out)
    assert code == 0 and text.startswith("OK, LOSSY:")


def test_the_lossy_output_is_the_best_repair_under_both_stacks(lossy):
    out, _, _ = lossy
    tolerance = load_case(CASE)["tolerance"]
    best = "logits_unsaved_biases_reset/checkpoint-2"
    assert max_logit_error(CASE, out, "checkpoint-2", best) <= tolerance
    assert max_logit_error(CASE, out, "checkpoint-2") > 20 * tolerance  # the loss is real
    if old_python() is None:
        pytest.skip("no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); from logits_check import max_logit_error as m; "
        "print(json.dumps([m(sys.argv[2], sys.argv[3], 'checkpoint-2', sys.argv[4]), "
        "m(sys.argv[2], sys.argv[3], 'checkpoint-2')]))"
    )
    command = [old_python(), "-c", code, str(FIXTURES.parent), str(CASE), str(out), best]
    best_error, trained_error = json.loads(subprocess.run(command, capture_output=True, text=True).stdout)
    assert best_error <= tolerance < 20 * tolerance < trained_error


def test_modules_without_bias_lose_nothing(tmp_path):
    """LLaMA's Linear layers have no bias: with --base-model saying so, bias='lora_only' is not lossy."""
    src = tmp_path / "checkpoint-2"
    shutil.copytree(FIXTURES / "llama_score" / "run" / "checkpoint-2", src)
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**config, "bias": "lora_only"}))
    code, stdout, _ = run_cli("inspect", src, "--base-model", FIXTURES / "llama_score" / "base", "--format", "json")
    assert code == 3
    assert "0008_refuse_unsaved_lora_only_bias" in json.loads(stdout)["checkpoints"][0]["migrations_not_needed"]
    code, _, stderr = run_cli("fix", src, "--out", tmp_path / "out", "--quiet")
    assert code == 4 and "pass --base-model DIR to tell which have a bias" in stderr


#: The same loss with other tuners, real peft 0.12 checkpoints (tests/fixtures_layouts): BOFT's boft_only is saved
#: by LoRA's lookup (<m>.bias), VeRA saves no bias at all.
OTHER_TUNERS = {"boft_bert_boft_only_bias": "bias='boft_only'", "vera_roberta_vera_only_bias": "bias='vera_only'"}


@pytest.mark.parametrize("name", sorted(OTHER_TUNERS))
def test_other_tuners_unsaved_biases_are_refused_and_the_lossy_repair_is_the_best_one(name, tmp_path):
    case = LAYOUTS / name
    lost = set(load_case(case)["unsaved_biases_max_change"])
    source = case / "run" / "checkpoint-2"
    code, _, stderr = run_cli("fix", source, "--out", tmp_path / "refused", "--base-model", case / "base")
    assert code == 4 and not (tmp_path / "refused").exists()
    assert OTHER_TUNERS[name] in stderr and all(bias in stderr for bias in lost)
    code, stdout, _ = run_cli("fix", source, "--out", tmp_path / "out", "--allow-lossy", "--format", "json")
    assert code == 0 and all(bias in json.loads(stdout)["checkpoints"][0]["losses"][0] for bias in lost)
    tolerance = load_case(case)["tolerance"]
    out = tmp_path / "out"
    assert max_logit_error(case, out, "checkpoint-2", "logits_unsaved_biases_reset/checkpoint-2") <= tolerance
    assert max_logit_error(case, out, "checkpoint-2") > 20 * tolerance  # the loss is real
