"""Dry run predicts exactly what fix writes; re-running is a no-op; inputs are never modified."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import FIXTURES, case_dirs, load_case, needs_base, run_cli, tree_digest

from ckpt_migrate.formats.safetensors import read_header

CASES = [c for c in case_dirs(FIXTURES) if not (needs_base(load_case(c)) and not load_case(c)["head_in_base"])]


def base_args(case_dir: Path) -> list[str]:
    return ["--base-model", str(case_dir / "base")] if needs_base(load_case(case_dir)) else []


def strip_outcome(report: dict) -> list[dict]:
    """The per-checkpoint content, minus the fields that differ between a dry and a real run."""
    outcome = ("status", "output", "proof", "reproduces", "verification")
    return [{k: v for k, v in c.items() if k not in outcome} for c in report["checkpoints"]]


@pytest.mark.parametrize("case_dir", CASES, ids=lambda p: p.name)
def test_dry_run_predicts_exactly_what_fix_writes(tmp_path, case_dir):
    src = case_dir / "run"
    before = tree_digest(src)
    code, dry_out, _ = run_cli("fix", src, "--dry-run", "--format", "json", *base_args(case_dir))
    assert code == 0
    dry = json.loads(dry_out)
    out = tmp_path / "fixed"
    code, real_out, _ = run_cli("fix", src, "--out", out, "--format", "json", "--quiet", *base_args(case_dir))
    assert code == 0
    real = json.loads(real_out)
    assert dry["schema_version"] == real["schema_version"] == 1
    assert strip_outcome(dry) == strip_outcome(real)
    assert tree_digest(src) == before, "source modified"

    for entry in dry["checkpoints"]:  # the dry run promises only the proof it will run, or says there is none
        assert entry["proof"]["state"] == ("will run" if base_args(case_dir) else "not run")
        assert entry["reproduces"]["shown"] == "no"
    for entry in real["checkpoints"]:
        # "repaired" only where the static proof ran on a base model; else written, and said to be unproven
        assert entry["status"] == ("repaired" if base_args(case_dir) else "written"), entry["proof"]
        assert entry["reproduces"]["shown"] != "no" or entry["reproduces"]["check_with"]
        source, written = Path(entry["source"]), Path(entry["output"])
        source_tensors = _tensors(source)
        output_tensors = _tensors(written)
        removed = {t["name"]: t for t in entry["tensors_removed"]}
        added = {t["name"]: {k: t[k] for k in ("name", "shape", "dtype")} for t in entry["tensors_added"]}
        predicted = {n: t for n, t in source_tensors.items() if n not in removed}
        predicted.update(added)
        assert output_tensors == predicted
        assert set(removed) <= set(source_tensors)

        config_before = json.loads((source / "adapter_config.json").read_text())
        config_after = json.loads((written / "adapter_config.json").read_text())
        for key, change in entry["config_changes"].items():
            assert config_before.get(key) == change["before"]
            assert config_after.get(key) == change["after"]
        unchanged = set(config_before) - set(entry["config_changes"])
        assert {k: config_before[k] for k in unchanged} == {k: config_after[k] for k in unchanged}

        source_files = {p.name for p in source.iterdir()}
        written_files = {p.name for p in written.iterdir()}
        for name in entry["files_removed"]:
            assert name in source_files and name not in written_files
        kept = source_files - set(entry["files_removed"]) - {"adapter_config.json", "adapter_model.safetensors"}
        rewritten = {f["name"] for f in entry["files_rewritten"]}
        assert rewritten <= kept
        for name in kept - rewritten:
            assert (source / name).read_bytes() == (written / name).read_bytes(), name
        assert written_files == kept | {
            "adapter_config.json",
            "adapter_model.safetensors",
            "ckpt_migrate_manifest.json",
        }


def _tensors(directory: Path) -> dict[str, dict]:
    if (directory / "adapter_model.safetensors").exists():
        header = read_header(directory / "adapter_model.safetensors")
        return {n: {"name": n, "shape": list(i.shape), "dtype": i.dtype} for n, i in header.tensors.items()}
    import torch

    from ckpt_migrate.formats.dtypes import from_torch

    state = torch.load(directory / "adapter_model.bin", weights_only=True)
    return {n: {"name": n, "shape": list(t.shape), "dtype": from_torch(t.dtype)} for n, t in state.items()}


def test_fix_twice_is_a_noop_and_records_what_was_applied(repaired, tmp_path):
    fixed = repaired["llama_score"]
    manifest = json.loads((fixed / "checkpoint-4" / "ckpt_migrate_manifest.json").read_text())
    assert manifest["migrations_applied"] == [
        "0001_fold_double_wrapped_head",
        "0003_drop_stale_optimizer",
        "0004_portable_rng_state",
    ]
    for name, digest in manifest["outputs_sha256"].items():
        assert hashlib.sha256((fixed / "checkpoint-4" / name).read_bytes()).hexdigest() == digest
    metadata = read_header(fixed / "checkpoint-4" / "adapter_model.safetensors").metadata
    assert json.loads(metadata["ckpt_migrate"])["migrations_applied"] == manifest["migrations_applied"]
    assert metadata["format"] == "pt"

    code, stdout, _ = run_cli("fix", fixed, "--out", tmp_path / "again")
    assert code == 0
    assert "clean" in stdout
    assert not (tmp_path / "again").exists()
    code, _, _ = run_cli("inspect", fixed / "checkpoint-4")
    assert code == 0


def test_inspect_exit_codes_distinguish_repairable_and_unrecoverable():
    assert run_cli("inspect", FIXTURES / "llama_score" / "run")[0] == 3
    nobase = FIXTURES / "bart_lora_only_head_nobase"
    code, stdout, _ = run_cli("inspect", nobase / "run", "--base-model", nobase / "base")
    assert code == 4
    assert "cannot be reconstructed" in stdout
    code, stdout, _ = run_cli("inspect", FIXTURES / "bart_lora_only_head" / "run")
    assert code == 4
    assert "--base-model" in stdout
    assert (
        run_cli(
            "inspect",
            FIXTURES / "bart_lora_only_head" / "run",
            "--base-model",
            FIXTURES / "bart_lora_only_head" / "base",
        )[0]
        == 3
    )


def test_unrecoverable_head_is_refused_with_nothing_written(tmp_path):
    nobase = FIXTURES / "bart_lora_only_head_nobase"
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("fix", nobase / "run", "--out", out, "--base-model", nobase / "base")
    assert code == 4
    assert "retrain" in stdout and "cannot be reconstructed" in stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_every_report_warns_that_retraining_is_preferred(tmp_path):
    for fmt in ("text", "json", "markdown"):
        code, stdout, _ = run_cli("fix", FIXTURES / "llama_score" / "run", "--dry-run", "--format", fmt)
        assert code == 0 and "retraining is preferred" in stdout and "optimizer.pt" in stdout
    code, stdout, _ = run_cli("fix", FIXTURES / "llama_score" / "run", "--out", tmp_path / "o", "--quiet")
    assert code == 0
    assert stdout.rstrip().splitlines()[-1].startswith("  checkpoint-4")
    assert "retraining is preferred" in stdout


def test_run_directory_layout_is_mirrored(repaired):
    assert sorted(p.name for p in repaired["llama_score"].iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_single_checkpoint_and_adapter_directory_inputs(tmp_path):
    src = FIXTURES / "llama_score" / "run" / "checkpoint-2"
    assert run_cli("fix", src, "--out", tmp_path / "single", "--quiet")[0] == 0
    assert (tmp_path / "single" / "adapter_model.safetensors").exists()
    adapter_only = tmp_path / "adapter"
    adapter_only.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(src / name, adapter_only / name)
    assert run_cli("fix", adapter_only, "--out", tmp_path / "adapter-fixed", "--quiet")[0] == 0
    assert sorted(p.name for p in (tmp_path / "adapter-fixed").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "ckpt_migrate_manifest.json",
    ]


def test_migrations_command_lists_them_in_order():
    code, stdout, _ = run_cli("migrations", "--format", "json")
    ids = [m["id"] for m in json.loads(stdout)]
    assert ids == sorted(ids) and ids[0].startswith("0001")
    assert all(m["caused_by"] and m["summary"] for m in json.loads(stdout))


def test_wheel_ships_every_module_and_the_migrations(tmp_path):
    """Every .py of the source tree is in the wheel (scripts/wheel_check.sh also installs and runs it)."""
    root = Path(__file__).parents[1]
    # Built from the files a clone has: a stale ckpt_migrate.egg-info or build/ left in the working tree lists every
    # module, and setuptools would ship modules the package list leaves out as package data.
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    )
    clone = tmp_path / "clone"
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (root / name).is_file() and not name.startswith("tests/"):
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, clone / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, clone],
        check=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())

    def sources(directory: str, installed_as: str) -> set[str]:
        return {
            f"{installed_as}/{p.relative_to(root / directory).as_posix()}" for p in (root / directory).rglob("*.py")
        }

    expected = sources("ckpt_migrate", "ckpt_migrate") | sources("migrations", "ckpt_migrate/migrations")
    assert {"ckpt_migrate/core/plan.py", "ckpt_migrate/migrations/m0001_fold_double_wrapped_head.py"} <= expected
    assert sorted(expected - shipped) == []


def test_batch_rerun_adds_new_checkpoints_and_skips_repaired_ones(tmp_path):
    src = tmp_path / "run"
    src.mkdir()
    shutil.copytree(FIXTURES / "llama_score" / "run" / "checkpoint-2", src / "checkpoint-2")
    out = tmp_path / "fixed"
    assert run_cli("fix", src, "--out", out, "--quiet")[0] == 0
    first = tree_digest(out)
    shutil.copytree(FIXTURES / "llama_score" / "run" / "checkpoint-4", src / "checkpoint-4")
    code, stdout, _ = run_cli("fix", src, "--out", out, "--quiet", "--format", "json")
    assert code == 0
    statuses = {Path(c["source"]).name: c for c in json.loads(stdout)["checkpoints"]}
    assert any("skipped" in w for w in statuses["checkpoint-2"]["warnings"])
    assert statuses["checkpoint-4"]["status"] == "written"  # no base model: written, not proven
    assert statuses["checkpoint-2"]["status"] == "written"  # the earlier run's output, not proven either
    assert {k: v for k, v in tree_digest(out).items() if k.partition("/")[0] == "checkpoint-2"} == first
    # With the base model at hand, what the earlier runs published is proven now (its files, not a plan of them)
    base = FIXTURES / "llama_score" / "base"
    code, stdout, _ = run_cli("fix", src, "--out", out, "--base-model", base, "--quiet", "--format", "json")
    rerun = {Path(c["source"]).name: c for c in json.loads(stdout)["checkpoints"]}
    assert code == 0 and {c["status"] for c in rerun.values()} == {"repaired"}
    assert all(c["proof"]["state"] == "proven" and "already repaired into" in c["warnings"][-1] for c in rerun.values())
    (out / "checkpoint-4" / "adapter_config.json").write_text(  # a published adapter that no longer loads
        (out / "checkpoint-4" / "adapter_config.json").read_text().replace('"q_proj"', '"no_such_proj"')
    )
    code, stdout, _ = run_cli("fix", src, "--out", out, "--base-model", base, "--quiet", "--format", "json")
    rerun = {Path(c["source"]).name: c for c in json.loads(stdout)["checkpoints"]}
    assert rerun["checkpoint-4"]["status"] == "written" and rerun["checkpoint-4"]["proof"]["state"] == "failed"
    assert rerun["checkpoint-2"]["status"] == "repaired"
    assert (out / "checkpoint-4" / "adapter_model.safetensors").exists()
    # Anything else in --out is still refused.
    (out / "notes.txt").write_text("mine")
    assert run_cli("fix", src, "--out", out, "--quiet")[0] == 6


def test_final_adapter_beside_checkpoints_is_repaired_with_each_of_them(tmp_path):
    """Trainer's output dir often holds the final adapter (save_model) next to checkpoint-* dirs."""
    src = tmp_path / "run"
    shutil.copytree(FIXTURES / "llama_score" / "run", src)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(src / "checkpoint-4" / name, src / name)
    out = tmp_path / "fixed"
    code, stdout, _ = run_cli("fix", src, "--out", out, "--quiet", "--format", "json")
    assert code == 0
    assert [c["status"] for c in json.loads(stdout)["checkpoints"]] == ["written"] * 3
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint-2",
        "checkpoint-4",
        "ckpt_migrate_manifest.json",
    ]
    for directory in (out, out / "checkpoint-2", out / "checkpoint-4"):
        names = read_header(directory / "adapter_model.safetensors").tensors
        assert "base_model.model.score.weight" in names
        assert not any("original_module" in n for n in names)


def test_fix_without_out_is_a_usage_error():
    result = run_cli("fix", FIXTURES / "llama_score" / "run")
    assert result.exit_code == 2
    assert "--out is required" in result.stderr


def test_base_model_from_a_hub_cache_snapshot_with_symlinked_files(tmp_path):
    """Hub snapshots are symlinks into ../../blobs: allowed, while index entries leaving the dir are not."""
    case = FIXTURES / "bart_lora_only_head"
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(case / "base" / name, blobs / name)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / name)
    code, _, _ = run_cli("fix", case / "run", "--out", tmp_path / "out", "--base-model", snapshot, "--quiet")
    assert code == 0
