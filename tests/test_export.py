"""export: a merged model plain transformers loads with the trained logits, under the newest transformers and 4.44.2;
Hub ids through a huggingface_hub cache; ckpt_migrate.load repairs in memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FIXTURES, HELDOUT, LAYOUTS, OLD_STACK, TUNER_FIXTURES, load_case, old_python, run_cli, tree_digest
from safetensors.torch import load_file

import ckpt_migrate

TESTS = Path(__file__).parent
CASES = [  # (case dir, checkpoint): double-wrapped, nested, two heads, token classification, LoRA-only, old peft
    (FIXTURES / "llama_score", "checkpoint-4"),
    (FIXTURES / "roberta_nested", "checkpoint-2"),
    (FIXTURES / "distilbert_two_heads", "checkpoint-2"),
    (FIXTURES / "bert_token_cls", "checkpoint-2"),
    (FIXTURES / "bart_lora_only_head", "checkpoint-2"),
    (FIXTURES / "mistral_bf16", "checkpoint-2"),
    (OLD_STACK / "llama_score_peft082", "checkpoint-2"),
    # GPT-2's Conv1D stores (in, out); its square attn.c_proj is told by class (the saved config says
    # fan_in_fan_out false)
    (HELDOUT / "gpt2_score", "checkpoint-2"),
    # every other tuner 0007 folds, merged into the body by peft's own layer code: AdaLoRA after its rank budget
    # trimmed the saved ranks, IA3 (token classification, biases scaled), VeRA's shared projections, LN Tuning
    (TUNER_FIXTURES / "adalora_roberta_nested", "checkpoint-4"),
    (TUNER_FIXTURES / "boft_bert_classifier", "checkpoint-2"),
    (TUNER_FIXTURES / "fourierft_bert_classifier", "checkpoint-2"),
    (TUNER_FIXTURES / "hra_llama_score", "checkpoint-2"),
    (TUNER_FIXTURES / "ia3_bert_token_cls", "checkpoint-2"),
    (TUNER_FIXTURES / "ln_tuning_llama_score", "checkpoint-2"),
    (TUNER_FIXTURES / "loha_llama_score", "checkpoint-2"),
    (TUNER_FIXTURES / "lokr_bert_classifier", "checkpoint-2"),
    (TUNER_FIXTURES / "lokr_llama_scaled", "checkpoint-2"),  # alpha != r by peft 0.12: alpha = r first (0011)
    (TESTS / "fixtures_shapes" / "lokr_phi_patterns", "checkpoint-2"),  # the same per module (rank/alpha_pattern)
    (TUNER_FIXTURES / "vera_llama_score", "checkpoint-2"),
]
LOGITS = """
import json, sys, torch, transformers
from safetensors.torch import load_file
out = {}
for case_dir, model_dir, checkpoint in json.load(sys.stdin):
    case = json.load(open(f"{case_dir}/case.json"))
    model = getattr(transformers, case["auto_class"]).from_pretrained(model_dir).eval()
    ref = load_file(f"{case_dir}/reference.safetensors")
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
    out[model_dir] = {"error": (logits.float() - ref[f"logits/{checkpoint}"]).abs().max().item(),
                      "id2label": model.config.id2label, "version": transformers.__version__}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exported")
    outputs = {}
    for case_dir, checkpoint in CASES:
        out = root / case_dir.name
        code, stdout, stderr = run_cli(
            "export", case_dir / "run" / checkpoint, "--out", out, "--base-model", case_dir / "base"
        )
        assert code == 0, stdout + stderr
        outputs[case_dir.name] = out
    return outputs


def logits_errors(python: str, exported: dict[str, Path]) -> dict:
    jobs = [(str(c), str(exported[c.name]), ck) for c, ck in CASES]
    proc = subprocess.run([python, "-c", LOGITS], input=json.dumps(jobs), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(errors: dict, exported: dict[str, Path]) -> None:
    for case_dir, _ in CASES:
        result = errors[str(exported[case_dir.name])]
        assert result["error"] <= load_case(case_dir)["tolerance"], (case_dir.name, result)
        base_labels = json.loads((case_dir / "base" / "config.json").read_text()).get("id2label")
        assert result["id2label"] == base_labels, case_dir.name


def test_exported_models_reproduce_the_trained_logits_with_plain_newest_transformers(exported):
    check(logits_errors(sys.executable, exported), exported)
    for case_dir, _ in CASES:
        config = json.loads((exported[case_dir.name] / "config.json").read_text())
        assert config["architectures"] == json.loads((case_dir / "base" / "config.json").read_text())["architectures"]
        assert not list(exported[case_dir.name].glob("adapter_*")), "a plain model, no adapter"


def test_exported_models_reproduce_the_trained_logits_with_transformers_4_44(exported):
    python = old_python()
    if python is None:
        pytest.skip("no transformers 4.44 interpreter: set CKPT_MIGRATE_OLD_PYTHON")
    errors = logits_errors(python, exported)
    assert {e["version"] for e in errors.values()} == {"4.44.2"}
    check(errors, exported)


def test_dry_run_predicts_the_written_files_and_the_source_is_untouched(tmp_path):
    case_dir = FIXTURES / "roberta_nested"
    src = case_dir / "run" / "checkpoint-2"
    before = tree_digest(src)
    args = ("--base-model", case_dir / "base", "--format", "json")
    dry = json.loads(run_cli("export", src, "--dry-run", *args).stdout)["export"]
    real = json.loads(run_cli("export", src, "--out", tmp_path / "m", *args).stdout)["export"]
    assert dry == real and tree_digest(src) == before
    written = load_file(tmp_path / "m" / "model.safetensors")
    assert len(written) == real["shards"]["model.safetensors"]
    assert set(real["tensors_from_adapter"]) <= set(written)


def test_small_shards_get_an_index_and_load(tmp_path):
    case_dir = FIXTURES / "llama_score"
    report = ckpt_migrate.export(
        case_dir / "run" / "checkpoint-4", tmp_path / "m", base_model=case_dir / "base", max_shard_bytes=20_000
    )
    assert len(report.export.shards) > 1
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {name for name, _ in report.export.shards}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert model.score.weight.shape[0] == 3


def test_bfloat16_export_casts_floats_and_says_so(tmp_path):
    case_dir = FIXTURES / "llama_score"
    ckpt_migrate.export(
        case_dir / "run" / "checkpoint-4", tmp_path / "m", base_model=case_dir / "base", dtype="bfloat16"
    )
    assert {t.dtype for t in load_file(tmp_path / "m" / "model.safetensors").values()} == {torch.bfloat16}
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_export_refuses_what_fix_refuses_and_writes_nothing(tmp_path):
    case_dir = FIXTURES / "bart_lora_only_head_nobase"
    out = tmp_path / "m"
    code, _, stderr = run_cli(
        "export", case_dir / "run" / "checkpoint-2", "--out", out, "--base-model", case_dir / "base"
    )
    assert code == 4 and "cannot be reconstructed" in stderr and not out.exists()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("poly_llama_score", "task_ids"),  # refused by the repair already
        ("oft_bert_classifier", "reparametrised"),  # peft >= 0.14 computes another OFT than the producing 0.12
    ],
)
def test_export_refuses_a_tuner_whose_trained_model_it_cannot_compute(case, reason, tmp_path):
    case_dir = TUNER_FIXTURES / case
    out = tmp_path / "m"
    code, _, stderr = run_cli(
        "export", case_dir / "run" / "checkpoint-2", "--out", out, "--base-model", case_dir / "base"
    )
    assert code == 4 and reason in stderr and not out.exists(), stderr


# ------------------------------------------------------------------------------------ Hub ids


def cache_repo(cache: Path, repo_id: str, source: Path, edit=None) -> None:
    """A repository in huggingface_hub's cache layout: blobs, snapshots/<commit> of links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 39 + "1"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for index, path in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{index:040x}"
        shutil.copyfile(path, blob)
        if edit is not None and path.name == "adapter_config.json":
            config = json.loads(blob.read_text())
            edit(config)
            blob.write_text(json.dumps(config))
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)


def test_fix_and_export_by_hub_id_work_offline_from_the_cache(tmp_path):
    case_dir = FIXTURES / "llama_score"
    cache = tmp_path / "hf" / "hub"
    cache_repo(cache, "acme/tiny-llama-cls", case_dir / "base")
    cache_repo(
        cache,
        "acme/llama-score-adapter",
        case_dir / "run" / "checkpoint-4",
        edit=lambda c: c.update(base_model_name_or_path="acme/tiny-llama-cls"),
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "ckpt_migrate"]
    fixed = tmp_path / "fixed"
    proc = subprocess.run(
        [*cli, "fix", "acme/llama-score-adapter", "--out", fixed, "--quiet"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([*cli, "export", fixed, "--out", tmp_path / "m"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--base-model not given: using 'acme/tiny-llama-cls'" in proc.stdout
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    reference = load_file(case_dir / "reference.safetensors")
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"]).logits
    assert (logits - reference["logits/checkpoint-4"]).abs().max().item() <= load_case(case_dir)["tolerance"]
    proc = subprocess.run([*cli, "fix", "acme/not-cached", "--dry-run"], env=env, capture_output=True, text=True)
    assert proc.returncode == 5 and len(proc.stderr.strip().splitlines()) == 1
    assert "neither a local directory nor in the Hugging Face cache (HF_HUB_OFFLINE is set)" in proc.stderr


# ------------------------------------------------------------------------------------ repair on load


@pytest.mark.parametrize("case", ["llama_score", "bart_lora_only_head", "distilbert_two_heads"])
def test_load_repairs_in_memory_and_reproduces_the_trained_logits(case, tmp_path):
    case_dir = FIXTURES / case
    src = tmp_path / "src"
    shutil.copytree(case_dir / "run" / "checkpoint-2", src)
    before = tree_digest(src)
    model = ckpt_migrate.load(case_dir / "base", src)
    reference = load_file(case_dir / "reference.safetensors")
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"]).logits
    assert (logits.float() - reference["logits/checkpoint-2"]).abs().max().item() <= load_case(case_dir)["tolerance"]
    assert tree_digest(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_load_refuses_what_fix_refuses():
    case_dir = FIXTURES / "bart_lora_only_head_nobase"
    with pytest.raises(ckpt_migrate.UnrecoverableError, match="cannot be reconstructed"):
        ckpt_migrate.load(case_dir / "base", case_dir / "run" / "checkpoint-2")


# ------------------------------------------------------------------------------------ verify, merged


def test_verify_proves_an_exported_model_against_its_source_and_catches_a_wrong_head(exported, tmp_path):
    case_dir = FIXTURES / "roberta_nested"
    args = ("--base-model", case_dir / "base", "--source", case_dir / "run" / "checkpoint-2", "--format", "json")
    code, stdout, _ = run_cli("verify", exported["roberta_nested"], *args)
    verdict = json.loads(stdout)
    assert code == 0 and verdict["ok"] and verdict["max_logit_diff_vs_source"] <= 1e-4

    from safetensors.torch import save_file

    tampered = tmp_path / "tampered"
    shutil.copytree(exported["roberta_nested"], tampered)
    tensors = load_file(tampered / "model.safetensors")
    tensors["classifier.out_proj.weight"] = torch.zeros_like(tensors["classifier.out_proj.weight"])
    save_file(tensors, tampered / "model.safetensors", metadata={"format": "pt"})
    code, stdout, _ = run_cli("verify", tampered, *args)
    verdict = json.loads(stdout)
    assert code == 8 and any("logits differ from the source" in r for r in verdict["reasons"])


def test_verify_checks_a_tuner_export_against_peft_running_the_source_unmerged(exported, tmp_path):
    case_dir = TUNER_FIXTURES / "loha_llama_score"
    args = ("--base-model", case_dir / "base", "--source", case_dir / "run" / "checkpoint-2", "--format", "json")
    code, stdout, _ = run_cli("verify", exported["loha_llama_score"], *args)
    verdict = json.loads(stdout)
    assert code == 0 and verdict["max_logit_diff_vs_source"] <= 1e-4, verdict
    assert any("body layers unmerged" in note for note in verdict["notes"])

    from safetensors.torch import save_file

    tampered = tmp_path / "tampered"
    shutil.copytree(exported["loha_llama_score"], tampered)
    tensors = load_file(tampered / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"  # a body weight the export merged LoHa into
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, tampered / "model.safetensors", metadata={"format": "pt"})
    code, stdout, _ = run_cli("verify", tampered, *args)
    assert code == 8 and any("logits differ from the source" in r for r in json.loads(stdout)["reasons"])


@pytest.mark.parametrize(
    ("case", "adapter"),
    [("llama_named_adapter", None), ("llama_two_adapters", "default"), ("llama_two_adapters", "task_b")],
)
def test_export_merges_the_chosen_adapter_of_a_checkpoint_holding_several(case, adapter, tmp_path):
    """peft saves a named adapter in a subfolder: the only one is merged by default, another one by --adapter."""
    case_dir = LAYOUTS / case
    name = adapter or "task_a"
    args = ["--adapter", adapter] if adapter else []
    code, stdout, stderr = run_cli(
        "export", case_dir / "run" / "checkpoint-2", "--out", tmp_path / "m", "--base-model", case_dir / "base", *args
    )
    assert code == 0, stderr
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    reference = load_file(case_dir / "reference.safetensors")
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"]).logits
    assert (logits - reference[f"logits/checkpoint-2/{name}"]).abs().max().item() <= load_case(case_dir)["tolerance"]


def test_export_names_the_adapters_when_the_one_asked_for_is_not_there(tmp_path):
    case_dir = LAYOUTS / "llama_two_adapters"
    code, _, stderr = run_cli(
        "export",
        case_dir / "run" / "checkpoint-2",
        "--out",
        tmp_path / "m",
        "--base-model",
        case_dir / "base",
        "--adapter",
        "task_c",
    )
    assert code == 5 and "(it holds: default, task_b)" in stderr and not (tmp_path / "m").exists()


def test_export_says_what_is_wrong_with_its_inputs(tmp_path):
    full = OLD_STACK / "llama_full_finetune"
    args = ("--out", tmp_path / "a", "--base-model", full / "base")
    code, _, stderr = run_cli("export", full / "run" / "checkpoint-2", *args)
    assert code == 5 and "this checkpoint has none" in stderr
    loha, other = TUNER_FIXTURES / "loha_llama_score", TUNER_FIXTURES / "boft_bert_classifier"
    code, _, stderr = run_cli(
        "export", loha / "run" / "checkpoint-2", "--out", tmp_path / "b", "--base-model", other / "base"
    )
    # a base of another architecture is named as the cause, in one line, before anything is written
    assert code == 5 and "does not fit the adapter" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
