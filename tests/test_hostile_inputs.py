"""Issue #5: hostile and broken inputs are refused cleanly.

Every refusal must be: one line on stderr naming the file and the problem, the documented exit code
(ckpt_migrate/errors.py), no traceback, no pickle code run, the source byte-identical afterwards, and no
output: --out does not exist and no staging directory is left beside it. The CLI runs in a real
subprocess (``python -m ckpt_migrate``), so stderr is exactly what a user sees; runs that need torch
(pickles, writes) go through click's CliRunner in-process instead (``inproc=True``), to keep the suite
fast, and an escaped exception there counts as a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hostile_helpers import (
    FIXTURES,
    PAUSING_CLI,
    REPO,
    edit_json,
    edit_tensors,
    fsize_limit_preexec,
    mount_small_tmpfs,
    permissions_bind,
    read_safetensors_raw,
    run_cli,
    staging_dirs,
    stderr_lines,
    tree_digest,
    unmount,
    write_hostile_pickle,
    write_safetensors_raw,
)

from ckpt_migrate.core.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_OUTPUT, EXIT_PARTIAL, EXIT_UNREADABLE

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
HEAD = "base_model.model.score"
A, B, W = f"{HEAD}.lora_A.weight", f"{HEAD}.lora_B.weight", f"{HEAD}.base_layer.weight"


@dataclass
class Workspace:
    """A copy of one fixture checkpoint (``src``), a not-yet-existing ``out`` and a marker for pickles."""

    root: Path
    src: Path
    out: Path
    marker: Path
    extra_args: list[str] = field(default_factory=list)
    digest: dict[str, str] = field(default_factory=dict)

    def snapshot(self) -> None:
        """Record the source tree after the test made it hostile, before the tool runs."""
        self.digest = tree_digest(self.src)

    def fix(self, *args, inproc: bool = False, **kwargs) -> subprocess.CompletedProcess:
        if not self.digest:
            self.snapshot()
        argv = ["fix", self.src, "--out", self.out, "--quiet", *self.extra_args, *args]
        return invoke(*argv) if inproc else run_cli(*argv, **kwargs)


def invoke(*args) -> subprocess.CompletedProcess:
    """Run the CLI in-process; an exception escaping it is reported as a traceback on stderr."""
    import traceback

    from click.testing import CliRunner

    from ckpt_migrate.cli import main

    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


def make_workspace(root: Path, case: str = "llama_score", checkpoint: str = "checkpoint-2") -> Workspace:
    import shutil

    src = root / "src" / checkpoint
    shutil.copytree(FIXTURES / case / "run" / checkpoint, src, symlinks=True)
    return Workspace(root, src, root / "out", root / "MARKER-pickle-code-ran")


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return make_workspace(tmp_path)


def assert_refused(ws: Workspace, result: subprocess.CompletedProcess, code: int, *mentions: str) -> str:
    """The shared contract of every refusal; returns the stderr line."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    line = lines[0]
    print(f"exit {result.returncode}: {line}")  # shown with -rP: the observed refusal, for review
    assert line.startswith("ckpt-migrate: error: "), line
    for mention in mentions:
        assert mention in line, f"{mention!r} not in {line!r}"
    assert result.returncode == code, f"exit {result.returncode}, expected {code}: {line}"
    assert tree_digest(ws.src) == ws.digest, "the source was modified"
    assert not ws.out.exists(), "--out was created"
    assert staging_dirs(ws.out.parent) == [], "a staging directory was left behind"
    assert not ws.marker.exists(), "pickle code ran"
    return line


def assert_complete_checkpoint(directory: Path) -> dict:
    """A published checkpoint: manifest hashes match, the adapter loads with the real safetensors library."""
    import hashlib

    from safetensors import safe_open

    manifest = json.loads((directory / "ckpt_migrate_manifest.json").read_text())
    for name, digest in manifest["outputs_sha256"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest, name
    with safe_open(directory / WEIGHTS, framework="pt") as handle:
        for key in handle.keys():
            handle.get_tensor(key)
    json.loads((directory / CONFIG).read_text())
    return manifest


# ---------------------------------------------------------------- pickles


def test_hostile_pickle_payload_is_live(tmp_path: Path):
    """Control: the payload used below really runs when unpickled unsafely, so its absence later means something."""
    import pickle

    import torch

    for fmt in ("torch-zip", "torch-legacy", "pickle"):
        marker = tmp_path / f"ran-{fmt}"
        path = tmp_path / f"payload-{fmt}.bin"
        write_hostile_pickle(path, marker, fmt)
        if fmt == "pickle":
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
        assert marker.exists(), fmt


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "pickle"])
def test_hostile_adapter_model_bin_is_refused_without_running_it(tmp_path: Path, fmt: str):
    ws = make_workspace(tmp_path, "bert_bin")
    write_hostile_pickle(ws.src / "adapter_model.bin", ws.marker, fmt)
    # one format through a real process, the others in-process (same code path, no second torch import)
    result = ws.fix(inproc=fmt != "torch-zip")
    line = assert_refused(ws, result, EXIT_UNREADABLE, str(ws.src / "adapter_model.bin"), "pickle")
    assert "refused to load pickle safely" in line
    assert "\x1b" not in line and "weights_only" not in line, "torch's advice to load unsafely leaked through"


def test_hostile_adapter_model_bin_inspect(tmp_path: Path):
    ws = make_workspace(tmp_path, "bert_bin")
    write_hostile_pickle(ws.src / "adapter_model.bin", ws.marker)
    ws.snapshot()
    assert_refused(ws, invoke("inspect", ws.src), EXIT_UNREADABLE, "adapter_model.bin")


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin"])
def test_hostile_trainer_pickles_are_never_unpickled(ws: Workspace, name: str):
    """training_args.bin, scheduler.pt, rng_state.pth: opaque bytes, copied byte for byte; optimizer.pt: dropped."""
    write_hostile_pickle(ws.src / name, ws.marker)
    result = ws.fix(inproc=True)
    assert result.returncode == EXIT_OK, result.stderr
    assert stderr_lines(result.stderr) == []
    assert not ws.marker.exists(), "pickle code ran"
    assert tree_digest(ws.src) == ws.digest
    manifest = assert_complete_checkpoint(ws.out)
    if name == "optimizer.pt":  # dropped by 0003 (stale parameter groups), unread
        assert not (ws.out / name).exists()
        assert name in manifest["files_removed"]
    else:
        assert (ws.out / name).read_bytes() == (ws.src / name).read_bytes()
    assert staging_dirs(ws.root) == []


def _numpy_rng_payload(path: Path, marker: Path) -> None:
    """An rng_state.pth that names numpy's ndarray global (what a real one does) and carries the payload."""
    import numpy as np
    import torch
    from hostile_helpers import Payload

    torch.save({"numpy": np.random.get_state(), "python": Payload(marker)}, path)


def test_hostile_rng_state_naming_numpy_is_never_unpickled(ws: Workspace):
    """A real-looking RNG state (the kind a migration may parse to rewrite) with a payload: never executed.

    Either copied untouched, or refused cleanly by whatever parses it; never loaded.
    """
    _numpy_rng_payload(ws.src / "rng_state.pth", ws.marker)
    result = ws.fix(inproc=True)
    assert not ws.marker.exists(), "pickle code ran"
    if result.returncode == EXIT_OK:
        assert stderr_lines(result.stderr) == []
        assert_complete_checkpoint(ws.out)
        assert (ws.out / "rng_state.pth").read_bytes() == (ws.src / "rng_state.pth").read_bytes()
        assert tree_digest(ws.src) == ws.digest
    else:
        assert_refused(ws, result, EXIT_UNREADABLE, str(ws.src / "rng_state.pth"))


def test_hostile_optimizer_with_remap_is_refused_cleanly(tmp_path: Path):
    ws = _bart(tmp_path)
    write_hostile_pickle(ws.src / "optimizer.pt", ws.marker)
    result = ws.fix("--optimizer", "remap", inproc=True)
    assert not ws.marker.exists(), "pickle code ran"
    assert_refused(ws, result, EXIT_UNREADABLE, str(ws.src / "optimizer.pt"))


# ---------------------------------------------------------------- safetensors


def _header_edit(edit):
    def apply(path: Path) -> None:
        header, data = read_safetensors_raw(path)
        edit(header)
        write_safetensors_raw(path, header, data)

    return apply


def _raw_edit(edit):
    def apply(path: Path) -> None:
        path.write_bytes(edit(path.read_bytes()))

    return apply


def _set(name: str, **fields):
    return _header_edit(lambda h: h[name].update(fields))


def _past_end(header: dict) -> None:
    """The last tensor grows one column, with offsets to match: its bytes end past the end of the file."""
    entry = header["base_model.model.score.original_module.lora_B.weight"]
    rows, cols = entry["shape"]
    entry["shape"] = [rows, cols + 1]
    entry["data_offsets"][1] += 4 * rows


def _duplicate_names(path: Path) -> None:
    header, data = read_safetensors_raw(path)
    text = json.dumps(header, separators=(",", ":"))
    dup = json.dumps({A: header[A]}, separators=(",", ":"))[1:-1]
    write_safetensors_raw(path, text[:-1] + "," + dup + "}", data)


def _with_header_text(text: bytes):
    return _raw_edit(lambda raw: len(text).to_bytes(8, "little") + text + raw[8 + int.from_bytes(raw[:8], "little") :])


SAFETENSORS_CASES = {
    "empty_file": (_raw_edit(lambda raw: b""), "no header length"),
    "truncated_in_length_prefix": (_raw_edit(lambda raw: raw[:5]), "no header length"),
    "truncated_in_header": (_raw_edit(lambda raw: raw[:40]), "exceeds the file size"),
    "truncated_data": (_raw_edit(lambda raw: raw[:-100]), "truncated or padded"),
    "padded_data": (_raw_edit(lambda raw: raw + b"\0" * 16), "truncated or padded"),
    "header_length_exceeds_file": (
        _raw_edit(lambda raw: (len(raw) + 1).to_bytes(8, "little") + raw[8:]),
        "exceeds the file size",
    ),
    "header_length_2**64-1": (_raw_edit(lambda raw: b"\xff" * 8 + raw[8:]), "exceeds the file size"),
    "invalid_header_json": (_raw_edit(lambda raw: raw[:9] + b"@" + raw[10:]), "not valid JSON"),
    "header_not_utf8": (_raw_edit(lambda raw: raw[:8] + b"\xff" + raw[9:]), "not valid JSON"),
    "header_not_an_object": (_with_header_text(b"[1, 2, 3]"), "not a JSON object"),
    "header_integer_too_long_to_parse": (_with_header_text(b'{"x": ' + b"9" * 5000 + b"}"), "not valid JSON"),
    "header_nested_too_deep": (_with_header_text(b"[" * 200_000 + b"]" * 200_000), "not valid JSON"),
    "metadata_not_a_mapping": (_header_edit(lambda h: h.update({"__metadata__": []})), "__metadata__"),
    "offsets_past_end_of_file": (_header_edit(_past_end), "truncated or padded"),
    "offsets_beyond_2**64": (_set(A, shape=[2**62], data_offsets=[0, 2**64]), "2**64"),
    "offsets_negative": (_set(A, data_offsets=[-512, 0]), "two ordered integers"),
    "offsets_reversed": (_set(A, data_offsets=[9088, 8576]), "two ordered integers"),
    "offsets_not_integers": (_set(A, data_offsets=["8576", 9088]), "two ordered integers"),
    "offsets_overlapping": (
        _set("base_model.model.score.modules_to_save.lora_A.weight", data_offsets=[8576, 9088]),
        "overlaps another tensor",
    ),
    "offsets_leave_a_hole": (_header_edit(lambda h: h.pop(B)), "leaves a gap"),
    "unknown_dtype": (_set(A, dtype="F4"), "unknown dtype 'F4'"),
    "dtype_not_a_string": (_set(A, dtype=None), "unknown dtype None"),
    "shape_inconsistent_with_bytes": (_set(A, shape=[4, 31]), "needs 496 bytes, offsets give 512"),
    "shape_negative": (_set(A, shape=[-4, -32]), "non-negative integers"),
    "shape_astronomical": (_set(A, shape=[10**4000] * 50), "more than 2**64 bytes"),
    "shape_not_a_list": (_set(A, shape="4x32"), "non-negative integers"),
    "entry_not_an_object": (_header_edit(lambda h: h.update({A: [1, 2]})), "not an object"),
    "duplicate_tensor_names": (_duplicate_names, "twice"),
}


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_broken_safetensors_is_refused(ws: Workspace, case: str):
    edit, problem = SAFETENSORS_CASES[case]
    edit(ws.src / WEIGHTS)
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(ws.src / WEIGHTS), problem)


def test_broken_safetensors_inspect(ws: Workspace):
    (ws.src / WEIGHTS).write_bytes((ws.src / WEIGHTS).read_bytes()[:-1])
    ws.snapshot()
    assert_refused(ws, run_cli("inspect", ws.src), EXIT_UNREADABLE, str(ws.src / WEIGHTS), "truncated")


def _bart(tmp_path: Path) -> Workspace:
    import shutil

    ws = make_workspace(tmp_path, "bart_lora_only_head")
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "bart_lora_only_head" / "base", base)
    ws.extra_args = ["--base-model", str(base)]
    return ws


def test_broken_base_model_safetensors_is_refused(tmp_path: Path):
    ws = _bart(tmp_path)
    base_file = tmp_path / "base" / "model.safetensors"
    base_file.write_bytes(base_file.read_bytes()[:-4])
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(base_file), "truncated or padded")


@pytest.mark.parametrize("shard", ["../../../../../../etc/passwd", "/etc/passwd"])
def test_base_model_index_naming_a_file_outside_is_refused(tmp_path: Path, shard: str):
    ws = _bart(tmp_path)
    base = tmp_path / "base"
    names = list(read_safetensors_raw(base / "model.safetensors")[0])
    (base / "model.safetensors").unlink()
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: shard for n in names if n != "__metadata__"}})
    )
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, "/etc/passwd", "leaves the model directory")


# ---------------------------------------------------------------- adapter_config.json


def _config(edit):
    def apply(ws: Workspace) -> None:
        edit_json(ws.src / CONFIG, edit)

    return apply


def _config_text(text: bytes):
    def apply(ws: Workspace) -> None:
        (ws.src / CONFIG).write_bytes(text)

    return apply


CONFIG_CASES = {
    "invalid_json": (_config_text(b'{"peft_type": "LORA", "r": 4,'), "invalid JSON"),
    "not_utf8": (_config_text(b'{"peft_type": "\xff"}'), "cannot read"),
    "not_an_object": (_config_text(b'["LORA", 4]'), "expected a JSON object"),
    "integer_too_long_to_parse": (_config_text(b'{"r": ' + b"4" * 5000 + b"}"), "invalid JSON"),
    "peft_type_ia3": (_config(lambda c: c.update(peft_type="IA3")), "only LoRA adapters"),
    "peft_type_missing": (_config(lambda c: c.pop("peft_type")), "peft_type is None"),
    "r_missing": (_config(lambda c: c.pop("r")), "missing required field 'r'"),
    "r_string": (_config(lambda c: c.update(r="4")), "field 'r'"),
    "r_zero": (_config(lambda c: c.update(r=0)), "field 'r'"),
    "r_bool": (_config(lambda c: c.update(r=True)), "field 'r'"),
    "r_float": (_config(lambda c: c.update(r=4.0)), "field 'r'"),
    "lora_alpha_string": (_config(lambda c: c.update(lora_alpha="8")), "field 'lora_alpha'"),
    "lora_alpha_nan": (_config_text(b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}'), "field 'lora_alpha'"),
    "lora_alpha_infinite": (_config_text(b'{"peft_type": "LORA", "r": 4, "lora_alpha": 1e999}'), "'lora_alpha'"),
    "target_modules_int": (_config(lambda c: c.update(target_modules=7)), "field 'target_modules'"),
    "target_modules_list_of_ints": (_config(lambda c: c.update(target_modules=[1, 2])), "'target_modules'"),
    "target_modules_bad_regex": (_config(lambda c: c.update(target_modules="(q_proj")), "'target_modules'"),
    "modules_to_save_string": (_config(lambda c: c.update(modules_to_save="score")), "'modules_to_save'"),
    "modules_to_save_dict": (_config(lambda c: c.update(modules_to_save={"score": 1})), "'modules_to_save'"),
    "rank_pattern_list": (_config(lambda c: c.update(rank_pattern=["score"])), "'rank_pattern'"),
    "rank_pattern_string_rank": (_config(lambda c: c.update(rank_pattern={"score": "4"})), "'rank_pattern'"),
    "rank_pattern_bad_regex": (_config(lambda c: c.update(rank_pattern={"sc(ore": 4})), "'rank_pattern'"),
    "alpha_pattern_string_alpha": (_config(lambda c: c.update(alpha_pattern={"score": "8"})), "'alpha_pattern'"),
    "alpha_pattern_bad_regex": (_config(lambda c: c.update(alpha_pattern={"[score": 8})), "'alpha_pattern'"),
    "use_rslora_string": (_config(lambda c: c.update(use_rslora="yes")), "'use_rslora'"),
    "fan_in_fan_out_int": (_config(lambda c: c.update(fan_in_fan_out=1)), "'fan_in_fan_out'"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_broken_adapter_config_is_refused(ws: Workspace, case: str):
    edit, problem = CONFIG_CASES[case]
    edit(ws)
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(ws.src / CONFIG), problem)


def test_missing_adapter_config_is_refused(ws: Workspace):
    (ws.src / CONFIG).unlink()
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(ws.src / CONFIG), "missing")


def test_run_dir_without_any_adapter_config_is_refused(ws: Workspace):
    (ws.src / CONFIG).unlink()
    run = ws.src.parent
    ws.src = run
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(run), "no adapter_config.json")


def test_manifest_with_wrong_types_is_refused(ws: Workspace):
    (ws.src / "ckpt_migrate_manifest.json").write_text(json.dumps({"migrations_applied": 5}))
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, "ckpt_migrate_manifest.json", "migrations_applied")


# ---------------------------------------------------------------- tensors inconsistent with the config


def _tensors(edit):
    def apply(ws: Workspace) -> None:
        edit_tensors(ws.src / WEIGHTS, edit)

    return apply


def _zero_bytes(dtype: str, shape: list[int]) -> tuple[str, list[int], bytes]:
    from math import prod

    from ckpt_migrate.formats.dtypes import DTYPES

    return dtype, shape, b"\0" * (prod(shape) * DTYPES[dtype].size)


TENSOR_CASES = {
    "head_lora_A_without_lora_B": (_tensors(lambda t: t.pop(B)), "has no lora_B tensor"),
    "head_lora_B_without_lora_A": (_tensors(lambda t: t.pop(A)), "has no lora_A tensor"),
    "head_rank_not_r": (_config(lambda c: c.update(r=8)), "lora_A has rank 4 but the config (r/rank_pattern) gives 8"),
    "head_rank_not_rank_pattern": (
        _config(lambda c: c.update(rank_pattern={"score": 2})),
        "lora_A has rank 4 but the config (r/rank_pattern) gives 2",
    ),
    "head_shapes_do_not_compose": (
        _tensors(lambda t: t.update({B: _zero_bytes("F32", [5, 4])})),
        "does not compose with the weight (3, 32)",
    ),
    "head_factors_rank_mismatch": (
        _tensors(lambda t: t.update({B: _zero_bytes("F32", [3, 2])})),
        "does not compose",
    ),
    "head_lora_A_scalar": (_tensors(lambda t: t.update({A: _zero_bytes("F32", [])})), "expected a matrix"),
    "head_lora_A_integer_dtype": (
        _tensors(lambda t: t.update({A: _zero_bytes("I32", [4, 32])})),
        "non-floating-point dtype I32",
    ),
    "double_wrapped_head_without_trained_weight": (_tensors(lambda t: t.pop(W)), "trained weight"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_adapter_tensors_inconsistent_with_config_are_refused(ws: Workspace, case: str):
    edit, problem = TENSOR_CASES[case]
    edit(ws)
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(ws.src / WEIGHTS), problem)


def test_dora_magnitude_of_wrong_shape_is_refused(tmp_path: Path):
    ws = make_workspace(tmp_path, "llama_dora")
    edit_tensors(
        ws.src / WEIGHTS, lambda t: t.update({f"{HEAD}.lora_magnitude_vector.weight": _zero_bytes("F32", [5])})
    )
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(ws.src / WEIGHTS), "DoRA magnitude shape")


def test_lora_only_head_not_composing_with_base_weight_is_refused(tmp_path: Path):
    ws = _bart(tmp_path)
    name = "base_model.model.classification_head.out_proj.lora_B.weight"
    edit_tensors(ws.src / WEIGHTS, lambda t: t.update({name: _zero_bytes("F32", [7, 4])}))
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(ws.src / WEIGHTS), "does not compose")


def test_head_in_float8_folds_without_crashing(ws: Workspace):
    """Every dtype the header reader accepts must survive a fold (F8 used to die with KeyError in the writer)."""

    def to_f8(tensors):
        dtype, shape, data = tensors[W]
        tensors[W] = ("F8_E4M3", shape, bytes(len(data) // 4))

    edit_tensors(ws.src / WEIGHTS, to_f8)
    result = ws.fix(inproc=True)
    assert result.returncode == EXIT_OK, result.stderr
    header = read_safetensors_raw(ws.out / WEIGHTS)[0]
    assert header[f"{HEAD}.weight"]["dtype"] == "F8_E4M3"
    assert_complete_checkpoint(ws.out)


# ---------------------------------------------------------------- links and permissions


def _outside_file(ws: Workspace) -> Path:
    outside = ws.root / "outside.bin"
    outside.write_bytes(b"secret")
    return outside


def _outside_config(ws: Workspace) -> Path:
    """A perfectly valid config, but outside the checkpoint."""
    outside = ws.root / "config-copy.json"
    outside.write_bytes((ws.src / CONFIG).read_bytes())
    return outside


SYMLINK_CASES = {
    "file_to_outside": ("training_args.bin", _outside_file, "points outside the checkpoint"),
    "config_to_outside": (CONFIG, _outside_config, "points outside the checkpoint"),
    "weights_to_absolute_system_file": (WEIGHTS, lambda ws: Path("/etc/hostname"), "points outside the checkpoint"),
    "directory_to_outside": ("extra", lambda ws: Path("/etc"), "points outside the checkpoint"),
    "parent_escape": ("escape", lambda ws: Path(".."), "points outside the checkpoint"),
    "dangling": ("dangling.bin", lambda ws: ws.src / "does-not-exist", "cannot be resolved"),
    "loop": ("loop-a", lambda ws: ws.src / "loop-a", "cannot be resolved"),
}


@pytest.mark.parametrize("case", SYMLINK_CASES)
def test_symlink_leaving_the_checkpoint_is_refused(ws: Workspace, case: str):
    name, target, problem = SYMLINK_CASES[case]
    link, destination = ws.src / name, target(ws)
    if link.exists():
        link.unlink()
    link.symlink_to(destination)
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(link), problem)


def test_file_name_with_newline_stays_one_line(ws: Workspace):
    """A newline in a file name must not split the error line (nor forge a second 'ckpt-migrate:' line)."""
    link = ws.src / "evil\nckpt-migrate: forged line"
    link.symlink_to("/etc/hostname")
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, "points outside the checkpoint")


@pytest.mark.parametrize("name", ["training_args.bin", WEIGHTS, CONFIG, "subdir"])
def test_unreadable_file_is_refused(ws: Workspace, name: str):
    path = ws.src / name
    if name == "subdir":
        path.mkdir()
        (path / "global_step2.pt").write_bytes(b"state")
    ws.snapshot()
    mode = path.stat().st_mode
    path.chmod(0)
    try:
        preexec, skip = permissions_bind(path, "r")
        if skip:
            pytest.skip(skip)
        result = ws.fix(preexec_fn=preexec)
        path.chmod(mode)
        problem = "cannot list directory: Permission denied" if name == "subdir" else "permission denied"
        assert_refused(ws, result, EXIT_UNREADABLE, str(path), problem)
    finally:
        path.chmod(mode)


# ---------------------------------------------------------------- the output location


def test_out_existing_and_non_empty_is_refused(ws: Workspace):
    ws.out.mkdir()
    (ws.out / "precious.txt").write_text("keep me")
    ws.snapshot()
    result = ws.fix()
    (ws.out / "precious.txt").rename(ws.root / "precious.txt")
    ws.out.rmdir()
    assert_refused(ws, result, EXIT_OUTPUT, str(ws.out), "not an empty directory")
    assert (ws.root / "precious.txt").read_text() == "keep me"


def test_out_existing_file_is_refused(ws: Workspace):
    ws.out.write_text("a file")
    ws.snapshot()
    result = ws.fix()
    assert ws.out.read_text() == "a file"
    ws.out.unlink()
    assert_refused(ws, result, EXIT_OUTPUT, str(ws.out), "not an empty directory")


def test_out_equal_to_src_is_refused(ws: Workspace):
    ws.out = ws.src
    ws.snapshot()
    result = run_cli("fix", ws.src, "--out", ws.src)
    assert "Traceback" not in result.stderr
    assert result.returncode == EXIT_OUTPUT
    (line,) = stderr_lines(result.stderr)
    assert str(ws.src) in line and "must not be the source" in line
    assert tree_digest(ws.src) == ws.digest
    assert staging_dirs(ws.src.parent) == []


def test_out_inside_src_is_refused(ws: Workspace):
    ws.out = ws.src / "fixed"
    assert_refused(ws, ws.fix(), EXIT_OUTPUT, str(ws.out), "must not be the source or inside it")


def test_out_containing_src_is_refused(ws: Workspace):
    ws.snapshot()
    result = run_cli("fix", ws.src, "--out", ws.src.parent, "--quiet")
    assert result.returncode == EXIT_OUTPUT
    (line,) = stderr_lines(result.stderr)
    assert str(ws.src.parent) in line and "must not contain the source" in line
    assert tree_digest(ws.src) == ws.digest


def test_out_parent_is_a_file_is_refused(ws: Workspace):
    blocker = ws.root / "blocker"
    blocker.write_text("x")
    ws.out = blocker / "out"
    assert_refused(ws, ws.fix(), EXIT_OUTPUT, str(blocker), "not a directory")


def test_out_parent_missing_is_refused(ws: Workspace):
    ws.out = ws.root / "missing" / "out"
    assert_refused(ws, ws.fix(), EXIT_OUTPUT, str(ws.root / "missing"), "does not exist")


def test_out_symlink_loop_is_refused(ws: Workspace):
    ws.out.symlink_to(ws.out)
    ws.snapshot()
    result = ws.fix()
    ws.out.unlink()
    assert_refused(ws, result, EXIT_OUTPUT, str(ws.out))


def test_out_in_read_only_directory_is_refused(ws: Workspace):
    parent = ws.root / "read-only"
    parent.mkdir()
    ws.out = parent / "out"
    parent.chmod(0o555)
    try:
        preexec, skip = permissions_bind(parent, "w")
        if skip:
            pytest.skip(skip)
        assert_refused(ws, ws.fix(preexec_fn=preexec), EXIT_OUTPUT, str(parent), "not writable")
    finally:
        parent.chmod(0o755)


def _assert_write_failed(ws: Workspace, result: subprocess.CompletedProcess, problem: str) -> None:
    line = assert_refused(ws, result, EXIT_OUTPUT, str(ws.out.parent), problem)
    assert "writing failed" in line


def test_disk_full_mid_write_on_a_tiny_tmpfs(ws: Workspace):
    disk = ws.root / "disk"
    disk.mkdir()
    if not mount_small_tmpfs(disk, "16k"):  # four pages: the ~40 kB checkpoint cannot fit
        pytest.skip("cannot mount a tmpfs here (needs root); test_file_too_large_mid_write covers the write error")
    try:
        ws.out = disk / "out"
        _assert_write_failed(ws, ws.fix(inproc=True), "No space left on device")
        assert list(disk.iterdir()) == []
    finally:
        unmount(disk)


def test_file_too_large_mid_write(ws: Workspace):
    """RLIMIT_FSIZE below README.md's size: the first copied file fails with EFBIG, as on a full disk."""
    _assert_write_failed(ws, ws.fix(preexec_fn=fsize_limit_preexec(4096)), "File too large")


# ---------------------------------------------------------------- interrupted writes


def _start_paused_fix(ws: Workspace) -> tuple[subprocess.Popen, Path]:
    """Start ``fix`` and return once it is mid-write: a file half-copied into the staging directory."""
    ready = ws.root / "ready"
    ws.snapshot()

    def preexec() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a parent may run us with SIGINT ignored

    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSING_CLI, "fix", str(ws.src), "--out", str(ws.out), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "HOSTILE_READY": str(ready)},
        preexec_fn=preexec,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"fix never reached the write: exit {proc.returncode}\n{err}")
        time.sleep(0.02)
    partial = Path(ready.read_text())
    (staging,) = staging_dirs(ws.root)
    assert partial.is_relative_to(staging) and partial.exists()
    return proc, staging


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_write_publishes_nothing(ws: Workspace, signum: int):
    proc, staging = _start_paused_fix(ws)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr
    assert proc.returncode == EXIT_INTERRUPTED
    (line,) = stderr_lines(stderr)
    assert line == "ckpt-migrate: interrupted; nothing was published"
    assert not staging.exists() and staging_dirs(ws.root) == []
    assert not ws.out.exists()
    assert tree_digest(ws.src) == ws.digest


def test_sigkill_mid_write_then_next_run_cleans_up_and_succeeds(ws: Workspace):
    proc, staging = _start_paused_fix(ws)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert staging.is_dir(), "a killed run cannot clean up; the next one must"
    assert not ws.out.exists()

    result = invoke("fix", ws.src, "--out", ws.out, "--quiet")
    assert result.returncode == EXIT_OK, result.stderr
    assert stderr_lines(result.stderr) == []
    assert not staging.exists() and staging_dirs(ws.root) == []
    assert_complete_checkpoint(ws.out)
    assert tree_digest(ws.src) == ws.digest


# ---------------------------------------------------------------- batches


def _break_truncate(ckpt: Path) -> Path:
    path = ckpt / WEIGHTS
    path.write_bytes(path.read_bytes()[:-7])
    return path


def _break_pickle(ckpt: Path) -> Path:
    import shutil

    shutil.rmtree(ckpt)
    shutil.copytree(FIXTURES / "bert_bin" / "run" / "checkpoint-2", ckpt)
    write_hostile_pickle(ckpt / "adapter_model.bin", ckpt.parent.parent / "MARKER-pickle-code-ran")
    return ckpt / "adapter_model.bin"


def _break_symlink(ckpt: Path) -> Path:
    link = ckpt / "rng_state.pth"
    link.unlink()
    link.symlink_to("/etc/hostname")
    return link


def _break_config(ckpt: Path) -> Path:
    edit_json(ckpt / CONFIG, lambda c: c.update(r="four"))
    return ckpt / CONFIG


BATCH_BREAKS = {
    "truncated_safetensors": _break_truncate,
    "hostile_pickle": _break_pickle,
    "symlink_outside": _break_symlink,
    "bad_config": _break_config,
}


@pytest.mark.parametrize("breakage", BATCH_BREAKS)
def test_batch_with_one_bad_checkpoint_repairs_the_others(tmp_path: Path, breakage: str):
    import shutil

    ws = make_workspace(tmp_path, "llama_score", "checkpoint-2")
    run = ws.src.parent
    shutil.copytree(FIXTURES / "llama_score" / "run" / "checkpoint-4", run / "checkpoint-4")
    shutil.copytree(FIXTURES / "llama_score" / "run" / "checkpoint-2", run / "checkpoint-3")
    bad_file = BATCH_BREAKS[breakage](run / "checkpoint-3")
    ws.src = run
    ws.snapshot()

    result = ws.fix(inproc=True)
    assert "Traceback" not in result.stderr
    assert result.returncode == EXIT_PARTIAL, result.stderr
    (line,) = stderr_lines(result.stderr)
    assert line.startswith("ckpt-migrate: error: ") and str(bad_file) in line
    assert "checkpoint-3" in result.stdout and "repaired" in result.stdout
    assert sorted(p.name for p in ws.out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    for good in ("checkpoint-2", "checkpoint-4"):
        assert_complete_checkpoint(ws.out / good)
    assert tree_digest(run) == ws.digest
    assert staging_dirs(tmp_path) == []
    assert not ws.marker.exists()
