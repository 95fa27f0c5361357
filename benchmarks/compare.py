"""Compare two repaired checkpoints (ckpt-migrate's and naive_fix.py's) tensor by tensor, in bounded memory.

Equality means: same tensor names, dtypes, shapes and values, and the same adapter_config.json.
Tensor data are compared as raw bytes in chunks straight from the files; values are decoded only for
tensors whose bytes differ (to report the largest difference). Whole-file byte identity is reported
too, and, since ckpt-migrate records provenance in the safetensors ``__metadata__``, whether the files
are byte-identical apart from that metadata.
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


def _reencode_with_metadata(header: dict[str, Any], metadata: dict[str, str] | None) -> bytes:
    """``header`` serialized the way safetensors writes it, with ``__metadata__`` replaced."""
    rebuilt: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    rebuilt.update((k, v) for k, v in header.items() if k != "__metadata__")
    encoded = json.dumps(rebuilt, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


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
        "byte_identical_except_metadata": _reencode_with_metadata(b_header, a_meta) == a_raw and data_identical,
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
