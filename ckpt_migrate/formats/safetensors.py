"""Read safetensors headers without trusting them, and write safetensors files by streaming.

Why not the ``safetensors`` package: its public API gives no byte offsets (this is an offset index
that a dry run reads without torch), and ``save_file`` needs every tensor in memory at once (this
writer has the kernel copy unchanged tensors from their source file, so memory does not grow with
the file and their bytes never pass through Python).

Example::

    >>> header = read_header("adapter_model.safetensors")
    >>> header.tensors["base_model.model.score.lora_A.weight"].shape
    (8, 4096)
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.formats.digests import FollowingSha256, OnBytes, both
from ckpt_migrate.formats.dtypes import DTYPES, STORAGE_RANK
from ckpt_migrate.formats.files import BLOCK_BYTES, EarlyWriteback, copy_range, new_file, pwrite_all

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

    def read_bytes(self, name: str) -> bytearray:
        """Read the raw bytes of one tensor (and nothing else) from the file, into a new writable buffer."""
        info = self.tensors[name]
        data = bytearray(info.nbytes)
        view, done = memoryview(data), 0
        with open(self.path, "rb", buffering=0) as handle:
            while done < info.nbytes:
                got = os.preadv(handle.fileno(), [view[done:]], self.data_start + info.begin + done)
                if got == 0:
                    raise UnreadableInputError(f"file shrank while reading tensor {name!r}", self.path)
                done += got
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


#: Computed bytes: given directly, or by a function called when the writer reaches the tensor.
Computed = bytes | memoryview | Callable[[], bytes | memoryview]


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to write: its header fields and where its bytes come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: Computed | CopyFrom

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].size


def storage_order(tensors: Iterable[OutputTensor]) -> list[OutputTensor]:
    """The order safetensors itself stores tensors in: widest dtype first, then by name."""
    return sorted(tensors, key=lambda t: (-STORAGE_RANK[t.dtype], t.name))


def encode_header(tensors: list[OutputTensor], metadata: dict[str, str], data_phase: int | None = None) -> bytes:
    """The 8-byte length prefix plus the JSON header, padded with spaces to 8-byte alignment.

    With ``data_phase`` (a multiple of 8), more spaces make the data section start at that offset
    modulo 4096: give the source file's, and every tensor copied at the same relative offset keeps
    its block alignment, which lets a reflinking filesystem share the blocks instead of copying them.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for tensor in tensors:
        if isinstance(tensor.data, CopyFrom) and tensor.data.length != tensor.nbytes:
            raise ValueError(f"{tensor.name}: {tensor.data.length} bytes for shape {tensor.shape} {tensor.dtype}")
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    if data_phase is not None and data_phase % 8 == 0:
        encoded += b" " * ((data_phase - 8 - len(encoded)) % BLOCK_BYTES)
    return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors(
    path: str | Path,
    tensors: Iterable[OutputTensor],
    metadata: dict[str, str],
    on_bytes: OnBytes | None = None,
    data_phase: int | None = None,
) -> str:
    """Write a safetensors file front to back, fsync it, and return its sha256.

    Tensors that sit back to back in one source file are copied by one kernel copy
    (:func:`~ckpt_migrate.formats.files.copy_range`: their bytes never enter Python); computed
    tensors are produced when the writer reaches them. The sha256 is of the file as written, read
    back while it is written (``on_bytes`` counts those bytes too). Memory stays bounded by the
    largest computed tensor, whatever the file size. ``data_phase``: see :func:`encode_header`.
    """
    path = Path(path)
    ordered = storage_order(tensors)
    head = encode_header(ordered, metadata, data_phase)
    with new_file(path) as out:
        digest = FollowingSha256(path, on_bytes)
        writeback = EarlyWriteback(out.fileno())
        wrote = both(on_bytes, digest.advance, writeback.wrote)
        try:
            fd = out.fileno()
            pwrite_all(fd, head, 0)
            digest.advance(len(head))
            position = len(head)
            for run in _runs(ordered):
                if isinstance(run, CopyFrom):
                    with open(run.path, "rb", buffering=0) as source:
                        copy_range(source.fileno(), run.offset, fd, position, run.length, wrote)
                    position += run.length
                    continue
                if callable(run.data):
                    writeback.pause()
                data = run.data() if callable(run.data) else run.data
                if len(data) != run.nbytes:
                    raise ValueError(f"{run.name}: {len(data)} bytes computed for shape {run.shape} {run.dtype}")
                pwrite_all(fd, data, position)
                position += len(data)
                wrote(len(data))
                del data  # before the next tensor is computed: memory holds one computed tensor at a time
        finally:
            digest.close()
            writeback.join()
    return digest.hexdigest()


def _runs(ordered: list[OutputTensor]) -> list[CopyFrom | OutputTensor]:
    """Consecutive tensors copied from consecutive bytes of one file merged into one range; the rest as they are."""
    runs: list[CopyFrom | OutputTensor] = []
    for tensor in ordered:
        data = tensor.data
        last = runs[-1] if runs else None
        if isinstance(data, CopyFrom) and isinstance(last, CopyFrom):
            if last.path == data.path and last.offset + last.length == data.offset:
                runs[-1] = CopyFrom(last.path, last.offset, last.length + data.length)
                continue
        runs.append(data if isinstance(data, CopyFrom) else tensor)
    return runs
