"""Base models as users have them (tests/fixtures_bases, real peft 0.12.0 checkpoints): an image classifier (ViT), an
audio classifier whose head is two LoRA-only modules (Wav2Vec2: projector + classifier, no task_type), a base whose
config.json has no ``architectures`` (OPT), Phi and ALBERT question answering.

Each is repaired by ``fix`` (with ``--base-model`` where the head's base weights are only there) and proven: the
repaired adapter, loaded by real peft onto a base whose head is random, gives the trained logits under the newest peft
and peft 0.12; the export gives them under plain transformers (newest and 4.44.2); ``verify`` passes on both outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import load_case, old_python, run_cli
from logits_check import max_logit_error, merged_error, stack_versions
from safetensors.torch import load_file, save_file

from ckpt_migrate import export, fix, load, verify
from ckpt_migrate.core.errors import EXIT_UNRECOVERABLE, UnreadableInputError
from ckpt_migrate.formats.architecture import choose_model

TESTS = Path(__file__).parent
BASES = TESTS / "fixtures_bases"
CASES = sorted(p for p in BASES.iterdir() if (p / "case.json").exists())
#: transformers 5 renamed ViT's modules (attention.attention.query -> attention.q_proj, ...): migration 0012 renames
#: the adapter for a 5.x target, and the source's own function cannot be computed there (its names are 4.x's).
RENAMED_IN_TRANSFORMERS_5 = {"vit_image_cls"}


def checkpoint(case_dir: Path) -> str:
    return load_case(case_dir)["checkpoints"][-1]


def base_for(case_dir: Path) -> Path | None:
    return case_dir / "base" if load_case(case_dir)["shape"] == "lora_only" else None


def ids(case_dir: Path) -> str:
    return case_dir.name


def _fixed(root: Path, target_transformers: str | None = None) -> dict[str, Path]:
    outputs = {}
    for case_dir in CASES:
        out = root / case_dir.name
        report = fix(
            case_dir / "run",
            out,
            base_model=base_for(case_dir),
            target_transformers=target_transformers,
            progress=False,
        )
        assert report.exit_code == 0, report.checkpoints
        outputs[case_dir.name] = out / checkpoint(case_dir)
    return outputs


@pytest.fixture(scope="module")
def repaired(tmp_path_factory) -> dict[str, Path]:
    """Repaired for the installed (newest) transformers: ViT's modules renamed by 0012."""
    return _fixed(tmp_path_factory.mktemp("bases_fixed"))


@pytest.fixture(scope="module")
def repaired_for_4(tmp_path_factory) -> dict[str, Path]:
    """Repaired for transformers 4.44.2 (peft 0.12's stack): 4.x module names kept."""
    return _fixed(tmp_path_factory.mktemp("bases_fixed_4"), "4.44.2")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases_exported")
    outputs = {}
    for case_dir in CASES:
        out = root / case_dir.name
        report = export(case_dir / "run" / checkpoint(case_dir), out, base_model=case_dir / "base", progress=False)
        assert report.exit_code == 0
        outputs[case_dir.name] = out
    return outputs


@pytest.fixture(scope="module")
def peft_0_12_errors(repaired_for_4, exported) -> dict[str, float]:
    """One start of the peft 0.12 / transformers 4.44.2 interpreter for every logits check there: the adapters
    repaired for 4.44.2, the broken originals, and (plain transformers) the exports. Output dir -> error."""
    args = [str(a) for c in CASES for a in (c, repaired_for_4[c.name], checkpoint(c))]
    args += [str(a) for c in CASES for a in (c, c / "run" / checkpoint(c), checkpoint(c))]
    args += ["--merged", *[str(a) for c in CASES for a in (c, exported[c.name], checkpoint(c))]]
    result = subprocess.run(
        [old_python(), str(TESTS / "logits_check.py"), *args], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert stack_versions(result.stderr) == ("0.12.0", "4.44.2")
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_dir", CASES, ids=ids)
def test_repaired_adapter_gives_the_trained_logits_with_the_newest_peft(repaired, case_dir):
    error = max_logit_error(case_dir, repaired[case_dir.name], checkpoint(case_dir))
    assert error <= load_case(case_dir)["tolerance"], error


@pytest.mark.skipif(old_python() is None, reason="no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
def test_repaired_adapters_give_the_trained_logits_with_peft_0_12(repaired_for_4, peft_0_12_errors):
    for case_dir in CASES:
        error = peft_0_12_errors[str(repaired_for_4[case_dir.name])]
        assert error <= load_case(case_dir)["tolerance"], (case_dir.name, error)
    # and the originals do not: their heads are lost (random here) or fail to load
    originals = {c.name: peft_0_12_errors[str(c / "run" / checkpoint(c))] for c in CASES}
    assert all(error > 1e-2 for error in originals.values()), originals


def test_export_gives_the_trained_logits_with_the_newest_transformers(exported):
    for case_dir in CASES:
        error = merged_error(case_dir, exported[case_dir.name], checkpoint(case_dir))
        assert error <= load_case(case_dir)["tolerance"], (case_dir.name, error)
    written = json.loads((exported["opt_no_architectures"] / "config.json").read_text())
    assert written["architectures"] == ["OPTForSequenceClassification"]  # the base's config had none


@pytest.mark.skipif(old_python() is None, reason="no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
def test_export_gives_the_trained_logits_with_transformers_4_44(exported, peft_0_12_errors):
    for case_dir in CASES:
        error = peft_0_12_errors[str(exported[case_dir.name])]
        assert error <= load_case(case_dir)["tolerance"], (case_dir.name, error)


@pytest.mark.parametrize("case_dir", CASES, ids=ids)
def test_verify_passes_the_repaired_adapter_against_its_source(repaired, case_dir):
    result = verify(repaired[case_dir.name], case_dir / "base", source=case_dir / "run" / checkpoint(case_dir))
    assert result.ok, result.reasons
    if case_dir.name not in RENAMED_IN_TRANSFORMERS_5:  # the source's body LoRA loads: compared with it
        assert result.max_logit_diff_vs_source is not None and result.max_logit_diff_vs_source <= result.tolerance


@pytest.mark.parametrize("case_dir", CASES, ids=ids)
def test_verify_passes_the_export(exported, case_dir):
    result = verify(exported[case_dir.name], case_dir / "base", source=case_dir / "run" / checkpoint(case_dir))
    assert result.ok, result.reasons
    if case_dir.name not in RENAMED_IN_TRANSFORMERS_5:  # the source's body LoRA loads: compared with it
        assert result.max_logit_diff_vs_source is not None and result.max_logit_diff_vs_source <= result.tolerance


VERIFY_OLD = """
import json, sys
from ckpt_migrate.verification import verify_checkpoint
out = {}
for checkpoint, base, source in json.load(sys.stdin):
    result = verify_checkpoint(checkpoint, base, source_dir=source)
    out[checkpoint] = [result.ok, result.max_logit_diff_vs_source, result.reasons, result.transformers_version]
print(json.dumps(out))
"""


@pytest.mark.skipif(old_python() is None, reason="no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
def test_verify_passes_both_outputs_under_peft_0_12(repaired_for_4, exported):
    """Under transformers 4.44.2 the ViT adapter loads too: every output is compared with its source."""
    sources = [(c, str(c / "base"), str(c / "run" / checkpoint(c))) for c in CASES]
    jobs = [(str(out[c.name]), base, source) for c, base, source in sources for out in (repaired_for_4, exported)]
    proc = subprocess.run(
        [old_python(), "-c", VERIFY_OLD],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for checkpoint_dir, (ok, vs_source, reasons, version) in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert version == "4.44.2"
        assert ok, (checkpoint_dir, reasons)
        assert vs_source is not None and vs_source <= 1e-4, (checkpoint_dir, vs_source)


@pytest.mark.parametrize("name", ["wav2vec2_audio_cls", "albert_qa"])
def test_fix_verify_passes_audio_and_question_answering(tmp_path, name):
    case_dir = BASES / name
    code, stdout, stderr = run_cli(
        "fix", case_dir / "run", "--out", tmp_path / "out", "--base-model", case_dir / "base", "--verify"
    )
    assert code == 0, stdout + stderr
    assert (tmp_path / "out" / checkpoint(case_dir) / "adapter_model.safetensors").exists()


def test_every_module_of_a_two_module_lora_only_head_is_rebuilt(repaired):
    """Wav2Vec2's head is projector + classifier: both come from --base-model into modules_to_save."""
    out = repaired["wav2vec2_audio_cls"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert {"projector", "classifier"} <= set(config["modules_to_save"])
    tensors = load_file(out / "adapter_model.safetensors")
    for module in ("projector", "classifier"):
        assert f"base_model.model.{module}.weight" in tensors and f"base_model.model.{module}.bias" in tensors
        assert not any(k.startswith(f"base_model.model.{module}.lora_") for k in tensors)


def _base_without(case_dir: Path, module: str, where: Path) -> Path:
    base = where / "base"
    shutil.copytree(case_dir / "base", base)
    tensors = load_file(base / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith(module + ".")}, base / "model.safetensors")
    return base


def test_a_head_module_the_base_lacks_is_refused_by_name(tmp_path):
    case_dir = BASES / "wav2vec2_audio_cls"
    base = _base_without(case_dir, "projector", tmp_path)
    code, stdout, stderr = run_cli("fix", case_dir / "run", "--out", tmp_path / "out", "--base-model", base)
    assert code == EXIT_UNRECOVERABLE
    assert "'projector'" in stdout + stderr and "cannot be reconstructed" in stdout + stderr
    assert not (tmp_path / "out").exists()


def _base_with_architectures(case_dir: Path, where: Path, architectures: list[str] | None) -> Path:
    """A copy of the case's base whose config.json names ``architectures`` (None: none, as AutoConfig writes it)."""
    base = where / "base"
    shutil.copytree(case_dir / "base", base)
    config = json.loads((base / "config.json").read_text())
    config.pop("architectures")
    if architectures is not None:
        config["architectures"] = architectures
    (base / "config.json").write_text(json.dumps(config))
    return base


def test_no_architectures_and_no_task_type_resolved_by_the_head_modules(tmp_path, repaired):
    """An audio classifier's base without architectures, its adapter without task_type: projector + classifier
    name Wav2Vec2ForSequenceClassification (the frame classifier has no projector)."""
    case_dir = BASES / "wav2vec2_audio_cls"
    base = _base_with_architectures(case_dir, tmp_path, None)
    result = verify(repaired[case_dir.name], base, source=case_dir / "run" / checkpoint(case_dir))
    assert result.ok, result.reasons
    assert result.model_class == "AutoModelForAudioClassification"
    report = export(case_dir / "run", tmp_path / "m", base_model=base, progress=False)
    assert report.exit_code == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == [
        "Wav2Vec2ForSequenceClassification"
    ]
    assert merged_error(case_dir, tmp_path / "m", checkpoint(case_dir)) <= load_case(case_dir)["tolerance"]


def test_load_repairs_in_memory_on_a_base_without_architectures():
    import torch

    case_dir = BASES / "opt_no_architectures"
    model = load(case_dir / "base", case_dir / "run" / checkpoint(case_dir))
    reference = load_file(case_dir / "reference.safetensors")
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"]).logits
    assert (logits - reference[f"logits/{checkpoint(case_dir)}"]).abs().max().item() <= 1e-4


def test_optimizer_remap_on_a_base_without_architectures(tmp_path):
    case_dir = BASES / "opt_no_architectures"
    report = fix(case_dir / "run", tmp_path / "out", base_model=case_dir / "base", optimizer="remap", progress=False)
    assert report.exit_code == 0
    out = tmp_path / "out" / checkpoint(case_dir)
    assert (out / "optimizer.pt").exists()  # rebuilt, not dropped for an unprovable layout
    rewrite = report.checkpoints[0].plan.after.rewritten_files["optimizer.pt"]
    assert "states kept" in rewrite.reason and "fell back" not in " ".join(report.checkpoints[0].plan.warnings)


WAV2VEC2_TENSORS = [
    "base_model.model.wav2vec2.encoder.layers.0.attention.q_proj.lora_A.weight",
    "base_model.model.projector.lora_A.weight",
    "base_model.model.classifier.lora_A.weight",
]


def test_resolver_reads_the_class_from_transformers_mappings():
    choice = choose_model({"model_type": "wav2vec2"}, {"task_type": None}, WAV2VEC2_TENSORS)
    assert (choice.auto_class, choice.model_class) == (
        "AutoModelForAudioClassification",
        "Wav2Vec2ForSequenceClassification",
    )
    choice = choose_model({"model_type": "opt"}, {"task_type": "SEQ_CLS"})
    assert (choice.auto_class, choice.model_class) == (
        "AutoModelForSequenceClassification",
        "OPTForSequenceClassification",
    )
    choice = choose_model({"architectures": ["ViTForImageClassification"], "model_type": "vit"}, {})
    assert choice.auto_class == "AutoModelForImageClassification"


def test_resolver_refuses_an_ambiguous_head_in_one_line_naming_the_candidates():
    """BERT's classifier is the head of its sequence and its token classifier alike: no guess."""
    tensors = [
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
        "base_model.model.classifier.lora_A.weight",
    ]
    with pytest.raises(UnreadableInputError) as caught:
        choose_model({"model_type": "bert"}, {}, tensors)
    message = str(caught.value)
    assert "\n" not in message
    assert "BertForSequenceClassification" in message and "BertForTokenClassification" in message
    assert "architectures" in message


def test_fixtures_were_written_by_peft_0_12_and_are_not_called_clean():
    from ckpt_migrate import inspect

    for case_dir in CASES:
        case = load_case(case_dir)
        assert (case["peft_version"], case["transformers_version"]) == ("0.12.0", "4.44.2")
        (result,) = inspect(case_dir / "run" / checkpoint(case_dir)).checkpoints
        assert result.status != "clean", case_dir.name


def test_dry_run_of_an_audio_classifier_does_not_import_torch():
    import sys

    case_dir = BASES / "wav2vec2_audio_cls"
    code = (
        "import sys, ckpt_migrate; "
        f"r = ckpt_migrate.fix({str(case_dir / 'run')!r}, base_model={str(case_dir / 'base')!r}, dry_run=True); "
        "assert r.checkpoints[0].status == 'repairable', r.checkpoints[0].status; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_meta_model_of_a_base_without_architectures_takes_the_adapter_config():
    from ckpt_migrate.formats.base_model import BaseModel

    base = BaseModel(BASES / "opt_no_architectures" / "base")
    adapter_config = json.loads(
        (BASES / "opt_no_architectures" / "run" / "checkpoint-2" / "adapter_config.json").read_text()
    )
    model = base.meta_model(adapter_config)
    assert type(model).__name__ == "OPTForSequenceClassification"
    assert model.score.weight.is_meta
    with pytest.raises(UnreadableInputError, match="cannot tell which model to load") as caught:
        base.meta_model()  # no task, no tensors: OPTModel, OPTForCausalLM, ... all fit
    assert "\n" not in str(caught.value)


def test_a_bare_backbone_base_of_an_audio_classifier_is_resolved_by_the_head_modules(tmp_path, repaired):
    """facebook/wav2vec2-base says Wav2Vec2ForPreTraining, google/vit-base-... ViTModel: bases of classifiers that
    peft trains without a task_type (it has none for images or audio)."""
    case_dir = BASES / "wav2vec2_audio_cls"
    base = _base_with_architectures(case_dir, tmp_path, ["Wav2Vec2Model"])
    result = verify(repaired[case_dir.name], base, source=case_dir / "run" / checkpoint(case_dir))
    assert result.ok, result.reasons
    assert result.model_class == "AutoModelForAudioClassification"
    report = export(case_dir / "run", tmp_path / "m", base_model=base, progress=False)
    assert report.exit_code == 0
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert written["architectures"] == ["Wav2Vec2ForSequenceClassification"]
