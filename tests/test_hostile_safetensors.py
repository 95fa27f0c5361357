"""Issue #5, broken safetensors: the adapter's weights file and the base model's files and shard index.

Each is refused with one clean line (see ``assert_refused`` in tests/hostile_helpers.py); every dtype the
header reader accepts survives a fold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile_helpers import (
    HEAD,
    WEIGHTS,
    A,
    B,
    W,
    Workspace,
    assert_complete_checkpoint,
    assert_refused,
    bart_workspace,
    edit_tensors,
    read_safetensors_raw,
    write_safetensors_raw,
)

from ckpt_migrate.core.errors import EXIT_OK, EXIT_UNREADABLE

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
    assert_refused(ws, ws.run("inspect", ws.src), EXIT_UNREADABLE, str(ws.src / WEIGHTS), "truncated")


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


# ---------------------------------------------------------------- the base model


def test_broken_base_model_safetensors_is_refused(tmp_path: Path):
    ws = bart_workspace(tmp_path)
    base_file = tmp_path / "base" / "model.safetensors"
    base_file.write_bytes(base_file.read_bytes()[:-4])
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, str(base_file), "truncated or padded")


@pytest.mark.parametrize("shard", ["../../../../../../etc/passwd", "/etc/passwd"])
def test_base_model_index_naming_a_file_outside_is_refused(tmp_path: Path, shard: str):
    ws = bart_workspace(tmp_path)
    base = tmp_path / "base"
    names = list(read_safetensors_raw(base / "model.safetensors")[0])
    (base / "model.safetensors").unlink()
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: shard for n in names if n != "__metadata__"}})
    )
    assert_refused(ws, ws.fix(), EXIT_UNREADABLE, "/etc/passwd", "leaves the model directory")
