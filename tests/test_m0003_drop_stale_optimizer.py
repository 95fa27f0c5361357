"""A repaired Trainer checkpoint resumes under the newest stack and under peft 0.12 / numpy 1;
with ``--optimizer remap`` Adam moments and the learning-rate schedule continue.

The remap rewrites ``optimizer.pt`` record by record (storages copied by the kernel, never loaded):
its result is the same, tensor for tensor, as loading the whole state with ``torch.load``, remapping
it and saving it with ``torch.save``; it is a valid zip in PyTorch's own layout (torch finds every
storage where it computes it should be, CRCs check out, zip64 beyond 4 GiB reads back)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, load_case, old_python
from resume_check import resume

from ckpt_migrate import fix
from ckpt_migrate.core.text import MAX_LISTED
from ckpt_migrate.formats import torch_archive
from ckpt_migrate.formats.pickles import load_skeleton
from ckpt_migrate.formats.torch_archive import read_records, write_archive
from ckpt_migrate.migrations import m0003_drop_stale_optimizer as m0003
from ckpt_migrate.render import render_report

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


def test_remap_report_text_counts_kept_states_and_json_lists_them_all():
    report = fix(CASE / "run" / CHECKPOINT, dry_run=True, base_model=CASE / "base", optimizer="remap")
    kept = dict(dict(report.checkpoints[0].plan.files_rewritten)["optimizer.pt"].listed)["kept"]
    assert len(kept) > MAX_LISTED
    for fmt in ("text", "markdown"):
        label = f"optimizer.pt kept ({len(kept)}):"
        [line] = [line for line in render_report(report, fmt).splitlines() if label in line.lower()]
        shown, rest = line.split(":", 1)[1].strip(" *").split(" (+", 1)
        assert shown.split(", ") == list(kept[:MAX_LISTED])
        assert rest.startswith(f"{len(kept) - MAX_LISTED} more; --format json lists all)")
    rewritten = json.loads(render_report(report, "json"))["checkpoints"][0]["files_rewritten"]
    assert [entry["kept"] for entry in rewritten if entry["name"] == "optimizer.pt"] == [list(kept)]


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


# ---------------------------------------------------------------- the structural rewrite


def remap_payload():
    report = fix(CASE / "run" / CHECKPOINT, dry_run=True, base_model=CASE / "base", optimizer="remap")
    return report.checkpoints[0].plan.after.rewritten_files["optimizer.pt"]


def torch_load_save_remap(source: Path, target: Path, mapping) -> None:
    """The remap as it was before the structural rewrite: load everything, move the states, torch.save."""
    saved = torch.load(source, map_location="cpu", weights_only=True)
    state, groups, next_index = {}, [], 0
    for old_group, group_mapping in zip(saved["param_groups"], mapping, strict=True):
        indices = []
        for old in group_mapping:
            if old is not None and old in saved["state"]:
                state[next_index] = {k: v.clone() if hasattr(v, "clone") else v for k, v in saved["state"][old].items()}
            indices.append(next_index)
            next_index += 1
        groups.append({**{k: v for k, v in old_group.items() if k != "params"}, "params": indices})
    torch.save({"state": state, "param_groups": groups}, target)


def assert_same_state(ours: dict, theirs: dict) -> None:
    assert ours["param_groups"] == theirs["param_groups"]
    assert list(ours["state"]) == list(theirs["state"])
    for index, entry in theirs["state"].items():
        assert list(ours["state"][index]) == list(entry), index
        for key, value in entry.items():
            mine = ours["state"][index][key]
            if isinstance(value, torch.Tensor):
                assert (mine.dtype, mine.shape, mine.stride()) == (value.dtype, value.shape, value.stride())
                assert torch.equal(mine, value), (index, key)
            else:
                assert mine == value, (index, key)


def test_structural_remap_equals_torch_load_and_save(tmp_path, resumable):
    rewrite = remap_payload()
    source = CASE / "run" / CHECKPOINT / "optimizer.pt"
    reference = tmp_path / "reference.pt"
    torch_load_save_remap(source, reference, rewrite.payload.mapping)
    ours = resumable["remap"] / "optimizer.pt"
    assert_same_state(torch.load(ours, weights_only=True), torch.load(reference, weights_only=True))
    kept = dict(rewrite.listed)["kept"]
    assert 0 < len(torch.load(ours, weights_only=True)["state"]) == len(kept)
    assert ours.stat().st_size < source.stat().st_size  # the dropped states' records are left out


def test_remapped_archive_is_a_valid_zip_in_torchs_layout(resumable):
    path = resumable["remap"] / "optimizer.pt"
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every record's CRC-32 matches its bytes
    _, records = read_records(path)
    meta = torch.load(path, map_location="meta", weights_only=True)  # torch computes storage offsets itself
    skeleton = load_skeleton(path)
    for entry, planned in zip(meta["state"].values(), skeleton.obj["state"].values(), strict=True):
        for key, tensor in entry.items():
            if isinstance(tensor, torch.Tensor):
                record = records[f"data/{skeleton.storage_key[planned[key].untyped_storage()._cdata]}"]
                assert tensor.untyped_storage()._checkpoint_offset == record.offset
                assert record.offset % torch_archive.ALIGNMENT == 0


def test_rewriting_everything_in_place_reproduces_torch_save_byte_for_byte(tmp_path):
    saved = torch.load(CASE / "run" / CHECKPOINT / "optimizer.pt", weights_only=True)
    source = tmp_path / "optimizer.pt"
    torch.save(saved, source)
    skeleton = load_skeleton(source)
    write_archive(tmp_path / "rewritten.pt", skeleton.obj, skeleton.storage_key, source)
    ours, theirs = (tmp_path / "rewritten.pt").read_bytes(), source.read_bytes()
    _, records = read_records(source)
    identity = records[".data/serialization_id"]  # torch.save draws it at random for every file
    differing = [i for i in range(len(theirs)) if ours[i] != theirs[i]] if len(ours) == len(theirs) else None
    assert differing is not None and differing[0] >= identity.offset
    assert ours[: identity.offset] == theirs[: identity.offset]


def test_zip64_records_read_back(tmp_path, monkeypatch, resumable):
    """Beyond 4 GiB offsets and sizes move into zip64 fields; forced here at a 100-byte threshold."""
    monkeypatch.setattr(torch_archive, "_MAX32", 100)
    source = resumable["remap"] / "optimizer.pt"
    skeleton = load_skeleton(source)
    target = tmp_path / "zip64.pt"
    write_archive(target, skeleton.obj, skeleton.storage_key, source)
    with zipfile.ZipFile(target) as archive:
        assert archive.testzip() is None
        assert any(info.header_offset > 100 for info in archive.infolist())
    assert_same_state(torch.load(target, weights_only=True), torch.load(source, weights_only=True))


def test_a_state_without_its_storage_record_is_refused(tmp_path):
    source = tmp_path / "optimizer.pt"
    shutil.copy(CASE / "run" / CHECKPOINT / "optimizer.pt", source)
    skeleton = load_skeleton(source)
    some_key = next(iter(skeleton.storage_key))
    broken = {**skeleton.storage_key, some_key: "no-such-record"}
    with pytest.raises(m0003.UnreadableInputError, match="no record for storage"):
        write_archive(tmp_path / "out.pt", skeleton.obj, broken, source)


def test_records_stored_back_to_back_are_copied_together_and_hashed_as_written(tmp_path, monkeypatch, resumable):
    """One kernel copy for the whole run of records (headers written over it); the same bytes as one copy
    per record; the returned sha256 is the file's."""
    source = resumable["remap"] / "optimizer.pt"
    skeleton = load_skeleton(source)
    calls = []
    copy_range = torch_archive.copy_range
    monkeypatch.setattr(torch_archive, "copy_range", lambda *a, **k: calls.append(a) or copy_range(*a, **k))
    together = tmp_path / "together.pt"
    digest = write_archive(together, skeleton.obj, skeleton.storage_key, source)()
    assert len(calls) == 1 < len(read_records(source)[1])
    assert digest == hashlib.sha256(together.read_bytes()).hexdigest()
    monkeypatch.setattr(torch_archive, "RUN_BYTES", 1)  # every record copied on its own
    calls.clear()
    apart = tmp_path / "apart.pt"
    write_archive(apart, skeleton.obj, skeleton.storage_key, source)
    assert len(calls) == len([n for n in read_records(source)[1] if n not in torch_archive._REGENERATED])
    assert together.read_bytes() == apart.read_bytes()  # the serialization id too: derived from the content
    assert_same_state(torch.load(together, weights_only=True), torch.load(apart, weights_only=True))


def test_a_failed_check_of_the_written_archive_raises(tmp_path, resumable):
    source = resumable["remap"] / "optimizer.pt"
    skeleton = load_skeleton(source)

    def check() -> None:
        assert zipfile.is_zipfile(tmp_path / "out.pt")  # complete when checked
        raise m0003.UnreadableInputError("does not reload as planned", tmp_path / "out.pt")

    with pytest.raises(m0003.UnreadableInputError, match="reload as planned"):
        write_archive(tmp_path / "out.pt", skeleton.obj, skeleton.storage_key, source, check=check)
