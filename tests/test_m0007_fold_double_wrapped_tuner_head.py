"""Migration 0007 on real peft 0.12 checkpoints of every other tuner (tests/fixtures_tuners, scripts/make_fixtures.py
--tuners): the repaired heads reproduce the trained logits under the newest peft and peft 0.12; what cannot be
folded exactly is refused with its reason, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TUNER_FIXTURES, case_dirs, load_case, old_python, run_cli, tree_digest
from hostile_helpers import edit_json, edit_tensors, zero_bytes
from logits_check import max_logit_error, stack_versions
from packaging.version import Version

from ckpt_migrate.core import tuners
from ckpt_migrate.core.errors import EXIT_UNREADABLE, EXIT_UNRECOVERABLE
from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.plan import Options, SourceKind
from ckpt_migrate.core.tuners import TUNERS, math_differs
from ckpt_migrate.formats.checkpoint import load_state
from ckpt_migrate.formats.safetensors import read_header
from ckpt_migrate.migrations import m0007_fold_double_wrapped_tuner_head as m0007
from ckpt_migrate.planner import plan_checkpoint

#: Cases refused on the installed (newest) peft, with what the reason must say.
REFUSED = {
    "oft_bert_classifier": "OFT was reparametrised in peft 0.14",
    "poly_llama_score": "Poly mixes its LoRA skills per example by task_ids",
}
#: The double-wrapped cases (the tuner-only heads of migration 0010 live beside them).
CASES = {case.name: case for case in case_dirs(TUNER_FIXTURES) if load_case(case)["shape"] == "double_wrapped"}
SUPPORTED = sorted(set(CASES) - set(REFUSED))
CHECKPOINTS = [(name, ck) for name in SUPPORTED for ck in load_case(CASES[name])["checkpoints"]]
#: How current peft fails on the unrepaired original (IA3 on BERT does not load anywhere: see _ia3_loadable).
ORIGINAL_FAILS = {"ia3_bert_token_cls": (ValueError, "feedforward_modules")}


@pytest.fixture(scope="module")
def fixed(tmp_path_factory) -> dict[str, Path]:
    """Every supported tuner case repaired once through the public API: case name -> output run dir."""
    from ckpt_migrate import fix

    root = tmp_path_factory.mktemp("tuners")
    outputs = {}
    for name in SUPPORTED:
        report = fix(CASES[name] / "run", root / name, progress=False)
        assert report.exit_code == 0, (name, report.checkpoints)
        outputs[name] = root / name
    return outputs


def test_every_tuner_of_peft_0_12_that_accepts_all_linear_has_a_real_case():
    written = {load_case(c)["saved_peft_type"] for c in CASES.values()}
    assert written == set(TUNERS)
    assert all(load_case(c)["peft_version"] == "0.12.0" for c in CASES.values())
    assert any(load_case(c)["auto_class"] == "AutoModelForTokenClassification" for c in CASES.values())
    for case in CASES.values():  # the head really moved in training: dropping it changes the logits
        sanity = load_case(case)["sanity"]
        assert sanity["max_abs_diff_trained_vs_trained_with_init_head"] > 20 * load_case(case)["tolerance"]


@pytest.mark.parametrize(("name", "checkpoint"), CHECKPOINTS, ids=lambda v: str(v))
def test_repaired_tuner_head_reproduces_trained_logits_with_installed_peft(fixed, name, checkpoint):
    error = max_logit_error(CASES[name], fixed[name] / checkpoint, checkpoint)
    print(f"{name}/{checkpoint}: max |logit error| {error:.3g} (newest peft)")
    assert error <= load_case(CASES[name])["tolerance"]


#: Originals whose trained head peft 0.12 loses (it loads them, with the head random).
HEAD_LOST_IN_0_12 = ["loha_llama_score", "lokr_bert_classifier", "vera_llama_score", "boft_bert_classifier"]


@pytest.fixture(scope="module")
def peft_0_12_errors(fixed) -> dict[str, float]:
    """One start of the peft 0.12 interpreter for both checks there: every repaired checkpoint and the originals of
    HEAD_LOST_IN_0_12. Adapter dir -> max |logit error|."""
    triples = [(CASES[name], fixed[name] / ck, ck) for name, ck in CHECKPOINTS]
    triples += [(CASES[n], CASES[n] / "run" / "checkpoint-2", "checkpoint-2") for n in HEAD_LOST_IN_0_12]
    script = str(Path(__file__).parent / "logits_check.py")
    args = [str(a) for triple in triples for a in triple]
    result = subprocess.run([old_python(), script, *args], capture_output=True, text=True, check=True)
    assert stack_versions(result.stderr)[0] == "0.12.0"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(old_python() is None, reason="no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
def test_repaired_tuner_heads_reproduce_trained_logits_with_peft_0_12(fixed, peft_0_12_errors):
    for name, checkpoint in CHECKPOINTS:
        error = peft_0_12_errors[str(fixed[name] / checkpoint)]
        print(f"{name}/{checkpoint}: max |logit error| {error:.3g} (peft 0.12.0)")
        assert error <= load_case(CASES[name])["tolerance"], (name, checkpoint, error)


@pytest.mark.parametrize("name", SUPPORTED)
def test_unrepaired_original_fails_with_installed_peft(name):
    error, match = ORIGINAL_FAILS.get(name, (KeyError, r"base_model\.model\..*\.weight"))
    checkpoint = load_case(CASES[name])["checkpoints"][-1]
    with pytest.raises(error, match=match):
        max_logit_error(CASES[name], CASES[name] / "run" / checkpoint, checkpoint)


@pytest.mark.skipif(old_python() is None, reason="no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
def test_peft_0_12_does_not_restore_the_trained_head_of_the_originals(peft_0_12_errors):
    errors = [peft_0_12_errors[str(CASES[n] / "run" / "checkpoint-2")] for n in HEAD_LOST_IN_0_12]
    assert all(error > 1e-2 for error in errors), dict(zip(HEAD_LOST_IN_0_12, errors, strict=True))


@pytest.mark.parametrize("name", SUPPORTED)
def test_dry_run_json_predicts_exactly_the_written_tensors(tmp_path, name):
    src = CASES[name] / "run"
    before = tree_digest(src)
    code, dry_out, _ = run_cli("fix", src, "--dry-run", "--format", "json")
    assert code == 0
    code, real_out, _ = run_cli("fix", src, "--out", tmp_path / "fixed", "--format", "json", "--quiet")
    assert code == 0
    dry, real = json.loads(dry_out), json.loads(real_out)
    outcome = ("status", "output", "proof", "reproduces", "verification")  # what a run did, not what it planned
    strip = [{k: v for k, v in c.items() if k not in outcome} for c in real["checkpoints"]]
    assert [{k: v for k, v in c.items() if k not in outcome} for c in dry["checkpoints"]] == strip
    assert tree_digest(src) == before
    for entry in real["checkpoints"]:
        assert entry["migrations"] == [
            "0003_drop_stale_optimizer",
            "0004_portable_rng_state",
            "0007_fold_double_wrapped_tuner_head",
            # LoKr with alpha != r written before peft 0.14: alpha = r first, so every release computes it as trained
            *(["0011_lokr_alpha_equals_rank"] if name == "lokr_llama_scaled" else []),
        ]
        source = read_header(Path(entry["source"]) / "adapter_model.safetensors").tensors
        written = read_header(Path(entry["output"]) / "adapter_model.safetensors").tensors
        removed = {t["name"] for t in entry["tensors_removed"]}
        predicted = {n: (list(i.shape), i.dtype) for n, i in source.items() if n not in removed}
        predicted |= {t["name"]: (t["shape"], t["dtype"]) for t in entry["tensors_added"]}
        assert {n: (list(i.shape), i.dtype) for n, i in written.items()} == predicted
        assert all("merge" in t["how"] for t in entry["tensors_added"])
        assert "optimizer.pt" in entry["files_removed"]


def test_dry_run_of_a_tuner_checkpoint_does_not_import_torch():
    code = (
        "import sys, ckpt_migrate; "
        f"r = ckpt_migrate.fix({str(CASES['boft_bert_classifier'] / 'run')!r}, dry_run=True); "
        "assert r.checkpoints[0].status == 'repairable'; "
        "assert 'torch' not in sys.modules and 'peft' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def planned(name: str, checkpoint: str = "checkpoint-2", options: Options | None = None, config: dict | None = None):
    """0007 alone on a case (``config``: the adapter config to plan with instead of the saved one)."""
    before = load_state(CASES[name] / "run" / checkpoint)
    before.config = config or before.config
    after = before.clone()
    context = Context(source=before, base_model=None, options=options or Options())
    assert m0007.detect(after, context)
    m0007.plan(after, context)
    return before, after


def test_plan_folds_each_head_module_with_peft_and_keeps_the_body():
    before, after = planned("adalora_roberta_nested")
    computed = {n: t for n, t in after.tensors.items() if t.source.kind is SourceKind.COMPUTED}
    assert set(computed) == {
        f"base_model.model.classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")
    }
    fold = computed["base_model.model.classifier.out_proj.weight"].source.payload
    assert dict(fold.tensors)["ranknum"] == "base_model.model.classifier.out_proj.ranknum"  # the trained copy's
    assert not [n for n in after.tensors if n.startswith("base_model.model.classifier.") and n not in computed]
    body = {n: t for n, t in before.tensors.items() if ".classifier." not in n}
    assert {n: after.tensors[n] for n in body} == body
    assert "classifier" in after.config["modules_to_save"]
    assert not any(t.startswith("classifier") for t in after.config["target_modules"])
    # the trained parameters changed (0007 declares it), so the planner runs 0003 on the stale optimizer state
    whole = plan_checkpoint(CASES["adalora_roberta_nested"] / "run" / "checkpoint-2")
    assert whole.after.trainable_parameters_changed and "0003_drop_stale_optimizer" in whole.migrations


def test_ia3_config_becomes_loadable_and_vera_keeps_its_shared_projections():
    before, after = planned("ia3_bert_token_cls")
    assert not set(before.config["feedforward_modules"]) <= set(before.config["target_modules"])
    assert set(after.config["feedforward_modules"]) <= set(after.config["target_modules"])
    assert "bert.encoder.layer.0.output.dense" in after.config["feedforward_modules"]
    assert "bert.encoder.layer.0.attention.output.dense" in after.config["feedforward_modules"]  # same suffix rule
    assert any("feedforward_modules" in w for w in after.warnings)
    _, vera = planned("vera_llama_score")
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(vera.tensors)
    assert "base_model.model.score.vera_A" not in vera.tensors


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_cannot_be_folded_exactly_is_refused_with_its_reason(tmp_path, name):
    src = CASES[name] / "run"
    code, _, err = run_cli("fix", src, "--out", tmp_path / "out")
    assert code == EXIT_UNRECOVERABLE and REFUSED[name] in err, err
    assert not (tmp_path / "out").exists()
    code, out, _ = run_cli("inspect", src)
    assert code == EXIT_UNRECOVERABLE and "unrecoverable" in out


def test_math_changes_are_judged_against_the_release_that_computes_and_the_one_that_loads():
    lokr, oft = TUNERS["LOKR"], TUNERS["OFT"]
    scaled = load_case(CASES["lokr_llama_scaled"])["sanity"]
    assert scaled["head_lora_layer_params"]["score"]["alpha"] == 8
    config = load_state(CASES["lokr_llama_scaled"] / "run" / "checkpoint-2").config
    assert math_differs(lokr, config, Version("0.13.0")) is None
    assert "alpha/r" in math_differs(lokr, config, Version("0.14.0"))
    assert math_differs(lokr, {**config, "alpha": 4}, Version("0.21.2")) is None  # alpha == r: scale 1 everywhere
    assert math_differs(lokr, {**config, "rank_dropout_scale": False}, Version("0.21.2")) is None  # a 0.14+ writer
    assert math_differs(oft, {"peft_type": "OFT"}, Version("0.12.0")) is None
    # A LoKr config of peft >= 0.14 (scaled by alpha/r in training; migration 0011 leaves it) is refused for a
    # target that would ignore its alpha. (The saved pre-0.14 config gets alpha = r from 0011 first: see its test.)
    newer = {**config, "rank_dropout_scale": False}
    _, after = planned("lokr_llama_scaled", options=Options(target_peft="0.13.0"), config=newer)
    assert "peft 0.13.0 is the target" in after.unrecoverable[0]
    assert not planned("lokr_llama_scaled", config=newer)[1].unrecoverable
    _, after = planned("loha_llama_score", options=Options(target_peft="0.12.0"))
    assert not after.unrecoverable


def test_with_the_producers_math_installed_and_targeted_oft_is_folded(monkeypatch):
    """What the refusal advises: peft < 0.14 installed (measured by hand: the tool run on peft 0.12.0 folds the case,
    reproducing its logits under peft 0.12.0). (LoKr with alpha != r no longer needs this: migration 0011.)"""
    monkeypatch.setattr(tuners, "installed_peft", lambda: Version("0.12.0"))
    _, after = planned("oft_bert_classifier", options=Options(target_peft="0.12.0"))
    assert not after.unrecoverable, after.unrecoverable
    _, after = planned("oft_bert_classifier", options=Options(target_peft="0.21.2"))
    assert "peft 0.21.2 is the target" in after.unrecoverable[0]


def _copy(tmp_path: Path, name: str) -> Path:
    src = tmp_path / name
    shutil.copytree(CASES[name] / "run" / "checkpoint-2", src)
    return src


def test_adalora_config_newer_peft_refuses_is_refused_for_such_a_target(tmp_path):
    src = _copy(tmp_path, "adalora_roberta_nested")
    edit_json(src / "adapter_config.json", lambda c: c.update(total_step=None))
    code, _, err = run_cli("fix", src, "--out", tmp_path / "out")
    assert code == EXIT_UNRECOVERABLE and "peft >= 0.15 refuses this AdaLoRA config" in err, err
    code, _, _ = run_cli("fix", src, "--out", tmp_path / "out", "--target-peft", "0.14.0", "--quiet")
    assert code == 0


def test_vera_without_saved_projections_is_refused(tmp_path):
    src = _copy(tmp_path, "vera_llama_score")
    edit_json(src / "adapter_config.json", lambda c: c.update(save_projection=False))
    drop = [n for n in ("base_model.vera_A", "base_model.vera_B", "base_model.model.score.vera_A")]
    edit_tensors(src / "adapter_model.safetensors", lambda t: [t.pop(n) for n in drop])
    code, _, err = run_cli("fix", src, "--out", tmp_path / "out")
    assert code == EXIT_UNRECOVERABLE and "saved without its projections" in err, err


def test_unknown_peft_method_with_a_double_wrapped_head_is_refused_not_unreadable(tmp_path):
    src = _copy(tmp_path, "hra_llama_score")
    edit_json(src / "adapter_config.json", lambda c: c.update(peft_type="SOMETHING_NEW"))
    code, _, err = run_cli("fix", src, "--out", tmp_path / "out")
    assert code == EXIT_UNRECOVERABLE and "'SOMETHING_NEW' adapter, which this tool cannot fold" in err, err


def test_a_layer_the_installed_peft_builds_otherwise_is_refused_at_write_time(tmp_path):
    src = _copy(tmp_path, "loha_llama_score")
    edit_tensors(
        src / "adapter_model.safetensors",
        lambda t: t.update({"base_model.model.score.hada_w1_a": zero_bytes("F32", [3, 2])}),
    )
    code, _, err = run_cli("fix", src, "--out", tmp_path / "out")
    assert code == EXIT_UNRECOVERABLE and "other shapes than were saved" in err, err
    assert not (tmp_path / "out").exists()


def test_failures_name_what_current_and_old_peft_do_with_it():
    lines = m0007.failures(load_state(CASES["loha_llama_score"] / "run" / "checkpoint-2"))
    assert lines[0] == "peft >= 0.13: the adapter does not load (KeyError: 'base_model.model.score.weight')"
    assert "peft <= 0.12: the trained head score is not restored" in lines[1]
    ia3 = m0007.failures(load_state(CASES["ia3_bert_token_cls"] / "run" / "checkpoint-2"))
    assert ia3 == ["every peft: ValueError: `feedforward_modules` should be a subset of `target_modules`"]


def test_not_detected_on_its_own_output(fixed):
    from ckpt_migrate.planner import plan_checkpoint

    for name in SUPPORTED:
        for checkpoint in load_case(CASES[name])["checkpoints"]:
            assert plan_checkpoint(fixed[name] / checkpoint).status == "clean", (name, checkpoint)


@pytest.mark.parametrize("name", ["boft_bert_classifier", "ia3_bert_token_cls", "adalora_roberta_nested"])
def test_fix_verify_passes_and_repair_on_load_reproduces_the_trained_logits(tmp_path, name):
    """BOFT's boft_P, saved by peft 0.12, is a buffer newer peft derives itself: equal, so not an unused tensor."""
    import torch
    from safetensors.torch import load_file

    import ckpt_migrate

    case = CASES[name]
    report = ckpt_migrate.fix(case / "run", tmp_path / "out", base_model=case / "base", verify=True, progress=False)
    assert report.exit_code == 0, report.checkpoints[0].verification
    assert all(c.verification["ok"] for c in report.checkpoints)
    model = ckpt_migrate.load(case / "base", case / "run" / "checkpoint-2")
    reference = load_file(case / "reference.safetensors")
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"]).logits
    assert (logits - reference["logits/checkpoint-2"]).abs().max().item() <= load_case(case)["tolerance"]


def test_a_head_whose_trained_tuner_tensors_are_missing_is_unreadable(tmp_path):
    src = _copy(tmp_path, "loha_llama_score")
    trained = [f"base_model.model.score.hada_w{i}_{ab}" for i in (1, 2) for ab in "ab"]
    edit_tensors(src / "adapter_model.safetensors", lambda t: [t.pop(n) for n in trained])
    code, _, err = run_cli("fix", src, "--out", tmp_path / "out")
    assert code == EXIT_UNREADABLE and "the trained LoHa tensors of score are missing" in err, err
