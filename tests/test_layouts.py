"""Named and several adapters, fp16, accelerate save_state: real peft 0.12 checkpoints (tests/fixtures_layouts).

A checkpoint is repaired as a whole: every adapter in it (at its top and in subfolders) plus the Trainer files.
Every adapter of every repaired checkpoint reproduces its trained logits under the newest peft and peft 0.12,
loaded alone (``PeftModel.from_pretrained(..., adapter_name=...)``) and together (``load_adapter`` +
``set_adapter``); the repaired checkpoints resume on both stacks. And no adapter of any fixture is ever called
clean unless real peft reproduces it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    FIXTURES,
    HELDOUT,
    LAYOUTS,
    OLD_STACK,
    TUNER_FIXTURES,
    case_dirs,
    load_case,
    old_python,
    run_cli,
    tree_digest,
)
from logits_check import adapter_errors, stack_versions
from resume_check import resume

from ckpt_migrate import fix, inspect
from ckpt_migrate.core.plan import CheckpointPlan
from ckpt_migrate.formats.safetensors import read_header

TESTS = Path(__file__).parent
LOSSY = [c for c in case_dirs(LAYOUTS) if "unsaved_biases_max_change" in load_case(c)]
REPAIRABLE = [c for c in case_dirs(LAYOUTS) if c not in LOSSY]
SEVERAL = [c for c in REPAIRABLE if len(load_case(c)["adapters"]) > 1 or "default" not in load_case(c)["adapters"]]


def test_the_layout_fixtures_were_written_by_peft_0_12_and_are_small():
    for case_dir in case_dirs(LAYOUTS):
        case = load_case(case_dir)
        assert (case["peft_version"], case["transformers_version"]) == ("0.12.0", "4.44.2")
        assert sum(p.stat().st_size for p in case_dir.rglob("*") if p.is_file()) < 400 * 1024
    names = {c.name for c in case_dirs(LAYOUTS)}
    assert {"llama_named_adapter", "llama_two_adapters", "bert_lora_only_bias", "llama_fp16"} <= names


@pytest.fixture(scope="module")
def repaired_layouts(tmp_path_factory) -> dict[str, Path]:
    """Every repairable layout case fixed once through the API: case name -> output checkpoint-2."""
    out = tmp_path_factory.mktemp("layouts")
    outputs = {}
    for case_dir in REPAIRABLE:
        report = fix(case_dir / "run", out / case_dir.name, base_model=case_dir / "base", progress=False, verify=False)
        assert report.exit_code == 0 and [c.status for c in report.checkpoints] == ["repaired"]
        outputs[case_dir.name] = out / case_dir.name / "checkpoint-2"
    return outputs


# ------------------------------------------------------------------------------------ every adapter reproduces


def _assert_reproduced(errors: dict, case_dir: Path) -> None:
    tolerance = load_case(case_dir)["tolerance"]
    assert set(errors) == set(load_case(case_dir)["adapters"])
    for adapter, modes in errors.items():
        for mode, error in modes.items():
            assert error is not None and error <= tolerance, (case_dir.name, adapter, mode, error)


@pytest.mark.parametrize("case_dir", REPAIRABLE, ids=lambda p: p.name)
def test_every_adapter_reproduces_its_trained_logits_with_the_newest_peft(repaired_layouts, case_dir):
    _assert_reproduced(adapter_errors(case_dir, repaired_layouts[case_dir.name], "checkpoint-2"), case_dir)


@pytest.mark.skipif(old_python() is None, reason="no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
def test_every_adapter_reproduces_its_trained_logits_with_peft_0_12(peft_0_12_adapter_errors, repaired_layouts):
    for case_dir in REPAIRABLE:
        _assert_reproduced(peft_0_12_adapter_errors[str(repaired_layouts[case_dir.name])], case_dir)


@pytest.mark.parametrize("case_dir", SEVERAL, ids=lambda p: p.name)
def test_the_unrepaired_adapters_fail_as_the_issue_says(case_dir):
    """Newest peft cannot load any of them; the trained head is silently lost under peft 0.12 (see the walk)."""
    errors = adapter_errors(case_dir, case_dir / "run" / "checkpoint-2", "checkpoint-2")
    assert all(modes["alone"] is None for modes in errors.values()), errors


# ------------------------------------------------------------------------------------ a checkpoint as a whole


def test_a_named_adapter_is_repaired_with_the_trainer_files_beside_it(repaired_layouts):
    source = LAYOUTS / "llama_named_adapter" / "run" / "checkpoint-2"
    code, stdout, _ = run_cli("inspect", source, "--format", "json")
    assert code == 3
    entry = json.loads(stdout)["checkpoints"][0]
    assert [a["path"] for a in entry["adapters"]] == ["task_a"]
    assert entry["adapters"][0]["migrations"] == ["0001_fold_double_wrapped_head"]
    assert {"0003_drop_stale_optimizer", "0004_portable_rng_state"} <= set(entry["migrations"])
    out = repaired_layouts["llama_named_adapter"]
    assert (
        not (out / "optimizer.pt").exists()
        and (out / "rng_state.pth").read_bytes() != (source / "rng_state.pth").read_bytes()
    )
    assert "base_model.model.score.weight" in read_header(out / "task_a" / "adapter_model.safetensors").tensors
    assert not (out / "adapter_config.json").exists()


def test_a_second_adapter_is_repaired_and_its_inherited_lora_dropped(repaired_layouts):
    """task_b/ holds `score.lora_A.default.weight`: default's LoRA, inactive whenever task_b is the active adapter
    (peft's set_adapter makes every LoRA layer, those inside head copies too, run task_b only)."""
    plan = inspect(LAYOUTS / "llama_two_adapters" / "run" / "checkpoint-2").checkpoints[0].plan
    (task_b,) = plan.adapters
    removed = {t.name for t in task_b.tensors_removed}
    assert "base_model.model.score.lora_A.default.weight" in removed
    (added,) = task_b.tensors_added
    assert added.name == "base_model.model.score.weight"
    assert added.source.tensor == "base_model.model.score.base_layer.weight"
    assert {t.name for t in plan.tensors_added} == {"base_model.model.score.weight"}  # default: folded
    manifest = json.loads((repaired_layouts["llama_two_adapters"] / "ckpt_migrate_manifest.json").read_text())
    assert manifest["adapters"]["task_b"]["migrations_applied"] == ["0001_fold_double_wrapped_head"]
    assert "task_b/adapter_model.safetensors" in manifest["outputs_sha256"]


def test_repaired_checkpoints_are_clean_and_a_rerun_writes_nothing(repaired_layouts, tmp_path):
    for name, out in repaired_layouts.items():
        report = inspect(out)
        assert report.exit_code == 0 and report.checkpoints[0].status == "clean", name
        assert all(a.status == "clean" for a in report.checkpoints[0].plan.adapters), name
    code, stdout, _ = run_cli("fix", repaired_layouts["llama_two_adapters"], "--out", tmp_path / "again")
    assert code == 0 and "clean" in stdout and not (tmp_path / "again").exists()


@pytest.mark.parametrize("case_dir", REPAIRABLE, ids=lambda p: p.name)
def test_dry_run_predicts_every_file_and_every_adapter(tmp_path, case_dir):
    src = case_dir / "run" / "checkpoint-2"
    before = tree_digest(src)
    code, dry, _ = run_cli("fix", src, "--dry-run", "--format", "json")
    assert code == 0
    out = tmp_path / "fixed"
    code, real, _ = run_cli("fix", src, "--out", out, "--format", "json", "--quiet")
    assert code == 0 and tree_digest(src) == before
    entries = [json.loads(r)["checkpoints"][0] for r in (dry, real)]
    # a run says what it did: written without a base model to prove it on
    assert {a["status"] for a in entries[1]["adapters"]} <= {"written", "clean"}
    strip = [
        {k: v for k, v in e.items() if k not in ("status", "output", "proof", "reproduces", "verification")}
        | {"adapters": [{k: v for k, v in a.items() if k != "status"} for a in e["adapters"]]}
        for e in entries
    ]
    assert strip[0] == strip[1]
    entry = strip[1]
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    verdicts = {f["name"]: f["verdict"] for f in entry["files"]}
    assert set(verdicts) == {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    for name, verdict in verdicts.items():
        if verdict in ("copied", "copied unexamined"):
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
        assert (name in written) == (verdict != "dropped"), name
    assert written == {n for n, v in verdicts.items() if v != "dropped"} | {"ckpt_migrate_manifest.json"}
    for adapter in [entry, *entry["adapters"]]:
        where = "" if adapter is entry else adapter["path"] + "/"
        if not (src / where / "adapter_model.safetensors").exists():
            continue
        removed = {t["name"] for t in adapter["tensors_removed"]}
        predicted = {
            n: (list(i.shape), i.dtype)
            for n, i in read_header(src / where / "adapter_model.safetensors").tensors.items()
            if n not in removed
        }
        predicted.update({t["name"]: (t["shape"], t["dtype"]) for t in adapter["tensors_added"]})
        output = read_header(out / where / "adapter_model.safetensors").tensors
        assert {n: (list(i.shape), i.dtype) for n, i in output.items()} == predicted, where


def test_dry_runs_of_every_layout_import_no_torch():
    code = (
        "import sys, ckpt_migrate\n"
        f"for case in {[str(c / 'run') for c in case_dirs(LAYOUTS)]!r}:\n"
        "    report = ckpt_migrate.fix(case, dry_run=True, allow_lossy=True)\n"
        "    assert [c.status for c in report.checkpoints] == ['repairable'], case\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fix_verify_checks_every_adapter(tmp_path):
    for name in ("llama_named_adapter", "llama_two_adapters"):
        case = LAYOUTS / name
        args = ("--verify", "--base-model", case / "base", "--quiet", "--format", "json")
        code, stdout, stderr = run_cli("fix", case / "run" / "checkpoint-2", "--out", tmp_path / name, *args)
        assert code == 0, stderr
        verification = json.loads(stdout)["checkpoints"][0]["verification"]
        assert verification["ok"] and set(verification["adapters"]) == set(load_case(case)["adapters"]) - {"default"}
        assert all(v["ok"] and v["max_logit_diff_vs_source"] <= 1e-6 for v in verification["adapters"].values())


# ------------------------------------------------------------------------------------ resume


def _resume_old(case_dir: Path, *checkpoints: Path) -> list[dict]:
    """Each checkpoint resumed for 2 steps under peft 0.12 / transformers 4.44, in one start of that interpreter."""
    args = [str(a) for checkpoint in checkpoints for a in (case_dir, checkpoint, 2)]
    proc = subprocess.run(
        [old_python(), str(TESTS / "resume_check.py"), "--each", *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["llama_named_adapter", "llama_two_adapters"])
def test_repaired_checkpoints_resume_on_both_stacks_and_the_broken_ones_do_not(repaired_layouts, name):
    case_dir = LAYOUTS / name
    repaired, broken = (
        _resume_old(case_dir, repaired_layouts[name], case_dir / "run" / "checkpoint-2")
        if old_python()
        else (None,) * 2
    )
    for seen in [resume(case_dir, repaired_layouts[name], 2)] + ([repaired] if old_python() else []):
        assert "error" not in seen and seen["global_step_at_start"] == 2 and seen["saved_global_step"] == 4, seen
    if old_python():
        assert "parameter group that doesn't match" in broken["error"], broken


def test_fixing_only_the_adapter_subfolder_leaves_the_checkpoint_unresumable(tmp_path):
    """Issue 10 item 3: the parent's optimizer.pt still describes the broken parameters."""
    if old_python() is None:
        pytest.skip("no peft 0.12 interpreter (set CKPT_MIGRATE_OLD_PYTHON)")
    case_dir = LAYOUTS / "llama_named_adapter"
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(case_dir / "run" / "checkpoint-2", checkpoint)
    assert run_cli("fix", checkpoint / "task_a", "--out", tmp_path / "task_a", "--quiet")[0] == 0
    shutil.rmtree(checkpoint / "task_a")
    shutil.move(tmp_path / "task_a", checkpoint / "task_a")
    (seen,) = _resume_old(case_dir, checkpoint)
    assert "parameter group that doesn't match" in seen["error"], seen


# ------------------------------------------------------------------------------------ no false "clean"


def _every_checkpoint() -> list[tuple[Path, str, Path]]:
    """(case, checkpoint name, its directory) for every checkpoint holding adapters, of every fixture."""
    roots = (FIXTURES, HELDOUT, OLD_STACK, LAYOUTS, TUNER_FIXTURES)
    return [
        (case_dir, checkpoint, case_dir / "run" / checkpoint)
        for root in roots
        for case_dir in case_dirs(root)
        if load_case(case_dir)["shape"] != "full"
        for checkpoint in load_case(case_dir)["checkpoints"]
    ]


@pytest.fixture(scope="module")
def peft_0_12_adapter_errors(repaired_layouts) -> dict[str, dict]:
    """logits_check's ``adapter_errors`` under peft 0.12 for every checkpoint of every fixture and every repaired
    layout, in one start of that interpreter: directory -> {adapter: {"alone": error, "together": error}}."""
    checked = _every_checkpoint() + [(LAYOUTS / n, "checkpoint-2", out) for n, out in repaired_layouts.items()]
    args = [str(a) for triple in checked for a in (triple[0], triple[2], triple[1])]
    command = [old_python(), str(TESTS / "logits_check.py"), "--adapters", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1200)
    assert stack_versions(result.stderr)[0] == "0.12.0"
    return json.loads(result.stdout.splitlines()[-1])


def _adapter_is_clean(plan: CheckpointPlan) -> bool:
    """The tool leaves the adapter as it is: nothing refused, nothing lost, no tensor or config change."""
    after = plan.after
    return not (
        after.unrecoverable or after.losses or plan.tensors_added or plan.tensors_removed or plan.config_changes
    )


def _verdicts(checkpoint_dir: Path) -> dict[str, bool]:
    """inspect's verdict for every adapter of a checkpoint (as real users run it: no --base-model): dir -> clean."""
    (result,) = inspect(checkpoint_dir).checkpoints
    plan = result.plan
    verdicts = {".": _adapter_is_clean(plan)} if plan.before.weights_file else {}
    verdicts.update({a.relative: _adapter_is_clean(a) for a in plan.adapters})
    return verdicts


def _reproduced(errors: dict, tolerance: float) -> dict[str, bool]:
    return {a: all(e is not None and e <= tolerance for e in modes.values()) for a, modes in errors.items()}


def test_no_adapter_of_any_fixture_is_called_clean_unless_real_peft_reproduces_it(repaired_layouts, request):
    """Every adapter of every fixture (and of the repaired layouts) through ``inspect``, against what the newest
    peft and peft 0.12 do with it: "clean" exactly when both load it and reproduce its trained logits."""
    checked = _every_checkpoint() + [(LAYOUTS / n, "checkpoint-2", out) for n, out in repaired_layouts.items()]
    old = request.getfixturevalue("peft_0_12_adapter_errors") if old_python() is not None else {}
    seen = {"clean": 0, "broken": 0}
    for case_dir, checkpoint, directory in checked:
        tolerance = load_case(case_dir)["tolerance"]
        truth = _reproduced(adapter_errors(case_dir, directory, checkpoint), tolerance)
        if old:
            truth = {a: ok and _reproduced(old[str(directory)], tolerance)[a] for a, ok in truth.items()}
        names = load_case(case_dir).get("adapters") or {"default": "."}
        verdicts = _verdicts(directory)
        assert verdicts == {names[a]: ok for a, ok in truth.items()}, (str(directory), verdicts, truth)
        for ok in truth.values():
            seen["clean" if ok else "broken"] += 1
    assert seen["clean"] >= len(repaired_layouts) and seen["broken"] >= 30, seen
