"""Read safetensors headers without trusting them, and write safetensors files by streaming.

Why not the ``safetensors`` package: its public API gives no byte offsets (this is an offset index
that a dry run reads without torch), and ``save_file`` needs every tensor in memory at once (this
writer streams unchanged tensors from their source file, so memory does not grow with the file).

Example::

    >>> header = read_header("adapter_model.safetensors")
    >>> header.tensors["base_model.model.score.lora_A.weight"].shape
    (8, 4096)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.formats.dtypes import DTYPES, STORAGE_RANK
from ckpt_migrate.formats.files import COPY_CHUNK_BYTES, new_file

#: The header limit of safetensors itself (``MAX_HEADER_SIZE`` in its Rust crate): larger is refused there too.
MAX_HEADER_BYTES = 100_000_000
_MAX_OFFSET = 2**64 - 1


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are, relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header. ``data_start + tensor.begin`` is a tensor's absolute file offset."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int

    def read_bytes(self, name: str) -> bytes:
        """Read the raw bytes of one tensor (and nothing else) from the file."""
        info = self.tensors[name]
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + info.begin)
            data = handle.read(info.nbytes)
        if len(data) != info.nbytes:
            raise UnreadableInputError(f"file shrank while reading tensor {name!r}", self.path)
        return data


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise UnreadableInputError(f"safetensors header names {key!r} twice")
        result[key] = value
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file, reading no tensor data.

    Every offset is checked before it is trusted: tensors must tile the data section exactly
    (no gaps, no overlap, nothing past the end) and each byte length must equal its shape
    times its dtype size. Any violation raises :class:`UnreadableInputError`.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise UnreadableInputError("truncated safetensors file (no header length)", path)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > file_size - 8:
                raise UnreadableInputError(
                    f"safetensors header length {header_len} exceeds the file size {file_size}", path
                )
            if header_len > MAX_HEADER_BYTES:
                raise UnreadableInputError(f"safetensors header of {header_len} bytes is too large", path)
            raw = handle.read(header_len)
    except OSError as exc:
        raise UnreadableInputError(f"cannot read: {exc.strerror or exc}", path) from exc
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnreadableInputError as exc:
        raise UnreadableInputError(exc.message, path) from exc
    except (ValueError, RecursionError) as exc:  # also integers too long to convert (sys.get_int_max_str_digits)
        raise UnreadableInputError(f"safetensors header is not valid JSON ({exc})", path) from exc
    if not isinstance(parsed, dict):
        raise UnreadableInputError("safetensors header is not a JSON object", path)
    data_start = 8 + header_len
    data_size = file_size - data_start
    metadata = parsed.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnreadableInputError("safetensors __metadata__ must map strings to strings", path)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in parsed.items():
        tensors[name] = _parse_entry(name, entry, path)
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != cursor:
            problem = "overlaps another tensor" if info.begin < cursor else "leaves a gap before it"
            raise UnreadableInputError(f"tensor {info.name!r} {problem} (data offset {info.begin})", path)
        cursor = info.end
    if cursor != data_size:
        raise UnreadableInputError(
            f"tensor data covers {cursor} bytes but the file holds {data_size} (truncated or padded)", path
        )
    return SafetensorsHeader(path, tensors, dict(metadata), data_start, file_size)


def _parse_entry(name: str, entry: object, path: Path) -> TensorInfo:
    if not isinstance(entry, dict):
        raise UnreadableInputError(f"tensor {name!r}: header entry is not an object", path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a JSON list/object is unhashable
        raise UnreadableInputError(f"tensor {name!r}: unknown dtype {dtype!r}", path)
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise UnreadableInputError(f"tensor {name!r}: shape must be a list of non-negative integers", path)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise UnreadableInputError(f"tensor {name!r}: data_offsets must be two ordered integers", path)
    if offsets[1] > _MAX_OFFSET:
        raise UnreadableInputError(f"tensor {name!r}: data_offsets exceed 2**64", path)
    expected = DTYPES[dtype].size
    for dim in shape:  # stop early: a hostile shape can make the full product astronomically large
        expected *= dim
        if expected > _MAX_OFFSET:
            raise UnreadableInputError(f"tensor {name!r}: shape needs more than 2**64 bytes", path)
    if offsets[1] - offsets[0] != expected:
        raise UnreadableInputError(
            f"tensor {name!r}: shape {shape} {dtype} needs {expected} bytes, offsets give {offsets[1] - offsets[0]}",
            path,
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


@dataclass(frozen=True)
class CopyFrom:
    """Tensor bytes to copy unchanged from a byte range of an existing file."""

    path: Path
    offset: int
    length: int


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to write: its header fields and where its bytes come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | CopyFrom | Callable[[], bytes]  # a callable computes the bytes when the writer reaches them

    @property
    def nbytes(self) -> int:
        if isinstance(self.data, CopyFrom):
            return self.data.length
        if callable(self.data):
            return math.prod(self.shape) * DTYPES[self.dtype].size
        return len(self.data)


def storage_order(tensors: Iterable[OutputTensor]) -> list[OutputTensor]:
    """The order safetensors itself stores tensors in: widest dtype first, then by name."""
    return sorted(tensors, key=lambda t: (-STORAGE_RANK[t.dtype], t.name))


def encode_header(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length prefix plus the JSON header, padded with spaces to 8-byte alignment."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for tensor in tensors:
        expected = math.prod(tensor.shape) * DTYPES[tensor.dtype].size
        if tensor.nbytes != expected:
            raise ValueError(f"{tensor.name}: {tensor.nbytes} bytes for shape {tensor.shape} {tensor.dtype}")
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors(
    path: str | Path,
    tensors: Iterable[OutputTensor],
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] | None = None,
) -> str:
    """Write a safetensors file by streaming each tensor's bytes; fsync it; return its sha256.

    Memory stays bounded by the largest computed tensor plus one copy chunk, whatever the file size.
    """
    ordered = storage_order(tensors)
    digest = hashlib.sha256()
    buffer = bytearray(COPY_CHUNK_BYTES)
    with new_file(path) as out:
        head = encode_header(ordered, metadata)
        out.write(head)
        digest.update(head)
        for tensor in ordered:
            if isinstance(tensor.data, CopyFrom):
                _copy_range(tensor.data, out, digest, buffer, on_bytes)
                continue
            data = tensor.data() if callable(tensor.data) else tensor.data  # computed one at a time
            if len(data) != tensor.nbytes:
                raise ValueError(f"{tensor.name}: {len(data)} bytes computed, the header says {tensor.nbytes}")
            out.write(data)
            digest.update(data)
            if on_bytes:
                on_bytes(len(data))
            del data
    return digest.hexdigest()


def _copy_range(source: CopyFrom, out, digest, buffer: bytearray, on_bytes) -> None:
    view = memoryview(buffer)
    remaining = source.length
    with open(source.path, "rb") as handle:
        handle.seek(source.offset)
        while remaining:
            got = handle.readinto(view[: min(remaining, len(buffer))])
            if not got:
                raise UnreadableInputError("file shrank while copying", source.path)
            out.write(view[:got])
            digest.update(view[:got])
            remaining -= got
            if on_bytes:
                on_bytes(got)
