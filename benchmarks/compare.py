"""Compare two repaired checkpoints (ckpt-migrate's and naive_fix.py's) tensor by tensor, in bounded memory.

Equality means: same tensor names, dtypes, shapes and values, and the same adapter_config.json.
Tensor data are compared as raw bytes in chunks straight from the files; values are decoded only for
tensors whose bytes differ (to report the largest difference). Also reported: whether the data sections
are byte-identical, and whether the headers are equal apart from ``__metadata__`` (ckpt-migrate records
provenance there) and whitespace padding (ckpt-migrate pads its header so that the data section keeps
the source's alignment within 4 KiB blocks).

:func:`compare_remap` checks ``fix --optimizer remap``'s ``optimizer.pt`` against the synthetic source,
from what the generator knows (every body LoRA state kept, at its own index; the old head's dropped),
not from anything the tool computed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
CHUNK = 8 * 1024 * 1024


def read_header(path: Path) -> tuple[dict[str, Any], int, bytes]:
    """(parsed header, absolute offset of the data section, raw header bytes incl. the length prefix)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
    return json.loads(raw), 8 + length, struct.pack("<Q", length) + raw


def _same_range(path_a: Path, off_a: int, path_b: Path, off_b: int, length: int) -> bool:
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        fa.seek(off_a)
        fb.seek(off_b)
        while length:
            n = min(CHUNK, length)
            if fa.read(n) != fb.read(n):
                return False
            length -= n
    return True


def _max_abs_diff(path_a: Path, path_b: Path, name: str) -> float:
    from safetensors import safe_open

    with safe_open(path_a, "pt") as fa, safe_open(path_b, "pt") as fb:
        a, b = fa.get_tensor(name), fb.get_tensor(name)
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def compare_checkpoints(tool_dir: Path, naive_dir: Path) -> dict[str, Any]:
    a_path, b_path = tool_dir / WEIGHTS, naive_dir / WEIGHTS
    a_header, a_start, a_raw = read_header(a_path)
    b_header, b_start, b_raw = read_header(b_path)
    a_meta, b_meta = a_header.pop("__metadata__", None), b_header.pop("__metadata__", None)
    a_info = {k: (v["dtype"], tuple(v["shape"])) for k, v in a_header.items()}
    b_info = {k: (v["dtype"], tuple(v["shape"])) for k, v in b_header.items()}
    common = sorted(a_info.keys() & b_info.keys())
    byte_mismatch = [
        name
        for name in common
        if a_info[name] != b_info[name]
        or not _same_range(
            a_path,
            a_start + a_header[name]["data_offsets"][0],
            b_path,
            b_start + b_header[name]["data_offsets"][0],
            a_header[name]["data_offsets"][1] - a_header[name]["data_offsets"][0],
        )
    ]
    diffs = {name: _max_abs_diff(a_path, b_path, name) for name in byte_mismatch[:20] if a_info[name] == b_info[name]}
    data_identical = a_path.stat().st_size - a_start == b_path.stat().st_size - b_start and _same_range(
        a_path, a_start, b_path, b_start, a_path.stat().st_size - a_start
    )
    a_config = json.loads((tool_dir / CONFIG).read_text())
    b_config = json.loads((naive_dir / CONFIG).read_text())
    a_files = {p.name for p in tool_dir.iterdir()}
    b_files = {p.name for p in naive_dir.iterdir()}
    other_files = sorted((a_files & b_files) - {WEIGHTS, CONFIG})
    other_differ = [n for n in other_files if (tool_dir / n).read_bytes() != (naive_dir / n).read_bytes()]
    same_names = a_info.keys() == b_info.keys()
    same_dtypes_shapes = same_names and all(a_info[n] == b_info[n] for n in common)
    result = {
        "tensor_count": [len(a_info), len(b_info)],
        "same_names": same_names,
        "only_in_tool": sorted(a_info.keys() - b_info.keys()),
        "only_in_naive": sorted(b_info.keys() - a_info.keys()),
        "same_dtypes_and_shapes": same_dtypes_shapes,
        "same_values": same_dtypes_shapes and not byte_mismatch,
        "tensors_with_different_bytes": byte_mismatch,
        "max_abs_diff": diffs,
        "same_data_layout": a_header == b_header,
        "data_section_byte_identical": data_identical,
        "file_byte_identical": a_raw == b_raw and data_identical,
        "same_header_except_metadata": list(a_header.items()) == list(b_header.items()),
        "data_start": [a_start, b_start],
        "metadata_tool": a_meta,
        "metadata_naive": b_meta,
        "adapter_config_equal": a_config == b_config,
        "files_only_in_tool": sorted(a_files - b_files),
        "files_only_in_naive": sorted(b_files - a_files),
        "other_files_identical": not other_differ,
        "other_files_differ": other_differ,
    }
    # The adapter is what must match. Other files are informational: the tool may legitimately rewrite
    # some (e.g. rng_state.pth, migration 0004) and adds its manifest.
    result["equal"] = bool(result["same_values"] and result["adapter_config_equal"])
    return result


def compare_remap(tool_dir: Path, source_dir: Path, body_parameters: int) -> dict[str, Any]:
    """The remapped optimizer.pt against its source: states ``0..body_parameters-1`` kept as they were
    (same index: the body comes first in both layouts), nothing else; param_groups as the repaired model's."""
    import zipfile

    import torch

    ours = torch.load(tool_dir / "optimizer.pt", mmap=True, weights_only=True)
    source = torch.load(source_dir / "optimizer.pt", mmap=True, weights_only=True)
    expected = {i: source["state"][i] for i in range(body_parameters)}

    def equal(a: dict, b: dict) -> bool:
        return list(a) == list(b) and all(
            (x.dtype, x.shape) == (y.dtype, y.shape) and torch.equal(x, y) if isinstance(y, torch.Tensor) else x == y
            for x, y in zip(a.values(), b.values(), strict=True)
        )

    states_equal = list(ours["state"]) == list(expected) and all(
        equal(ours["state"][i], s) for i, s in expected.items()
    )
    hyper = {k: v for k, v in source["param_groups"][0].items() if k != "params"}
    groups = [dict(hyper, params=list(range(body_parameters + 1))), dict(hyper, params=[])]
    with zipfile.ZipFile(tool_dir / "optimizer.pt") as archive:
        crc_ok = archive.testzip() is None
    return {
        "kept": len(ours["state"]),
        "source_states": len(source["state"]),
        "expected_kept": body_parameters,
        "states_equal": states_equal,
        "groups_equal": ours["param_groups"] == groups,
        "crc_ok": crc_ok,
        "bytes": [(tool_dir / "optimizer.pt").stat().st_size, (source_dir / "optimizer.pt").stat().st_size],
        "equal": states_equal and ours["param_groups"] == groups and crc_ok,
    }
