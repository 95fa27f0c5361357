"""``torch.save``'s zip archive, rewritten record by record: storages are copied, never loaded.

A torch archive is a zip of stored (uncompressed) records under one prefix: ``data.pkl`` (the
pickled object; each tensor names its storage by a key), ``data/<key>`` (the raw bytes of each
storage), and a few small records (``.format_version``, ``.storage_alignment``, ``byteorder``,
``version``, ``.data/serialization_id``). :func:`write_archive` writes a new object whose tensors
all come from a source archive (see :func:`~ckpt_migrate.formats.pickles.load_skeleton`): the new
``data.pkl`` is pickled here exactly as ``torch.save`` pickles (same reduce of each tensor, same
persistent ids, protocol 2: byte-identical for the same object), and each storage record is copied
in the kernel from the source record, keeping its CRC-32 (records that follow each other in the
source are copied together, headers included, by one kernel copy: see :class:`_Output`). The layout
is miniz's as PyTorch writes it: every record's bytes aligned to 64, a data descriptor after every
non-empty record, zip64 fields from 4 GiB on, storages in key order. torch relies on that layout when
it computes storage offsets itself (``map_location="meta"``, ``calculate_storage_offsets``); ``tests`` check it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.formats.digests import FollowingSha256, OnBytes
from ckpt_migrate.formats.files import copy_range, new_file, pwrite_all

ALIGNMENT = 64
#: Sizes and offsets from here on go to zip64 fields; the 32-bit field then holds ``_FULL``.
_MAX32 = _FULL = 0xFFFFFFFF
_LOCAL, _CENTRAL, _DESCRIPTOR = 0x04034B50, 0x02014B50, 0x08074B50
_END, _END64, _LOCATOR64 = 0x06054B50, 0x06064B50, 0x07064B50
_STORED_WITH_DESCRIPTOR, _UTF8 = 0x0808, 0x0800
#: Records this module writes itself; any other small record of the source is copied as it is.
_REGENERATED = {"data.pkl", ".format_version", ".storage_alignment", ".data/serialization_id"}


@dataclass(frozen=True)
class Record:
    """One record of a zip archive: where its bytes are in the file, and their CRC-32."""

    name: str
    offset: int
    size: int
    crc: int


def read_records(path: Path) -> tuple[str, dict[str, Record]]:
    """The archive's prefix and its records by name below it; refuses anything but stored records."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            size = raw.seek(0, io.SEEK_END)
            records = {}
            for info in archive.infolist():
                raw.seek(info.header_offset)
                local = raw.read(30)
                if len(local) < 30 or struct.unpack_from("<I", local)[0] != _LOCAL:
                    raise UnreadableInputError(f"zip record {info.filename!r} has no local header", path)
                name_length, extra_length = struct.unpack_from("<HH", local, 26)
                offset = info.header_offset + 30 + name_length + extra_length
                if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or offset + info.file_size > size:
                    raise UnreadableInputError(f"zip record {info.filename!r} is compressed, encrypted or cut", path)
                records[info.filename] = Record(info.filename, offset, info.file_size, info.CRC)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UnreadableInputError(f"not a readable torch zip archive ({exc})", path) from exc
    prefixes = {name.split("/", 1)[0] for name in records}
    if len(prefixes) != 1 or any("/" not in name for name in records):
        raise UnreadableInputError("a torch archive keeps all its records under one folder", path)
    prefix = prefixes.pop()
    return prefix, {name[len(prefix) + 1 :]: record for name, record in records.items()}


def pickle_like_torch(obj: Any, storage_key: dict[int, str]) -> tuple[bytes, list[str]]:
    """``data.pkl`` for ``obj`` as ``torch.save`` writes it, and for each new storage key (its index)
    the source key it comes from. ``storage_key`` maps a meta storage's ``_cdata`` to its source key."""
    import torch

    sources: list[str] = []
    refs: dict[int, _StorageRef] = {}
    v3_dtypes = torch.storage._new_dtypes()

    def reduce_tensor(tensor: Any) -> tuple:
        if type(tensor) is not torch.Tensor or tensor.layout is not torch.strided or tensor.is_quantized:
            raise ValueError(f"cannot rewrite a {type(tensor).__name__} with layout {tensor.layout}")
        storage = tensor.untyped_storage()
        ref = refs.get(storage._cdata)
        if ref is None:
            key = str(len(sources))
            sources.append(storage_key[storage._cdata])
            if tensor.dtype in v3_dtypes:
                pid = ("storage", torch.UntypedStorage, key, "cpu", storage.nbytes())
            else:
                storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[tensor.dtype])
                pid = ("storage", storage_type, key, "cpu", storage.nbytes() // tensor.element_size())
            ref = refs[storage._cdata] = _StorageRef(pid)
        args = (
            ref,
            tensor.storage_offset(),
            tuple(tensor.size()),
            tensor.stride(),
            tensor.requires_grad,
            OrderedDict(),
        )
        rebuild = torch._utils._rebuild_tensor_v2
        if tensor.dtype in v3_dtypes:
            rebuild, args = torch._utils._rebuild_tensor_v3, (*args, tensor.dtype)
        metadata = torch._utils.get_tensor_metadata(tensor)
        return rebuild, (*args, metadata) if metadata else args

    class TorchPickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> tuple | None:
            return obj.pid if type(obj) is _StorageRef else None

        def reducer_override(self, obj: Any) -> Any:
            return reduce_tensor(obj) if isinstance(obj, torch.Tensor) else NotImplemented

    buffer = io.BytesIO()
    TorchPickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue(), sources


@dataclass(frozen=True)
class _StorageRef:
    pid: tuple


def write_archive(
    target: Path,
    obj: Any,
    storage_key: dict[int, str],
    source: Path,
    on_bytes: OnBytes | None = None,
    check: Callable[[], None] | None = None,
) -> Callable[[], str]:
    """Write ``obj`` as a torch archive at the new file ``target``, storages copied from ``source``; return
    what gives the sha256 of ``target`` as written, read back on a thread while it is written (``on_bytes``
    counts those bytes; the function waits for the last of them, so later writes overlap the hash).

    ``check`` (which may read ``target``) runs once every byte is written, while the file is fsynced on
    another thread: a check that raises leaves the file unpublished as any failed write does."""
    return write_pickled(target, pickle_like_torch(obj, storage_key), source, on_bytes, check)


def write_pickled(
    target: Path,
    pickled: tuple[bytes, list[str]],
    source: Path,
    on_bytes: OnBytes | None = None,
    check: Callable[[], None] | None = None,
) -> Callable[[], str]:
    """:func:`write_archive` of a ``data.pkl`` already pickled: ``(data.pkl, the source key of each new storage
    key)``, as :func:`pickle_like_torch` returns them."""
    prefix, records = read_records(source)
    data_pkl, sources = pickled
    missing = [key for key in sources if f"data/{key}" not in records]
    if missing:
        raise UnreadableInputError(f"the archive has no record for storage {missing[0]!r}", source)
    small = [(".format_version", b"1"), (".storage_alignment", str(ALIGNMENT).encode())]
    kept = [name for name in records if name not in _REGENERATED and not name.startswith("data/")]
    head = [n for n in kept if n == "byteorder"]
    tail = [n for n in kept if n != "byteorder"]
    with new_file(target) as handle, open(source, "rb", buffering=0) as src:
        digest = FollowingSha256(target, on_bytes)
        try:
            writer = _ZipWriter(_Output(handle.fileno(), src.fileno(), digest.advance), prefix)
            writer.add_bytes("data.pkl", data_pkl)
            for name, data in small:
                writer.add_bytes(name, data)
            for name in head:
                writer.add_copy(name, records[name])
            for new_key, old_key in enumerate(sources):
                writer.add_copy(f"data/{new_key}", records[f"data/{old_key}"])
            for name in tail:
                writer.add_copy(name, records[name])
            writer.add_bytes(".data/serialization_id", writer.serialization_id(data_pkl))
            writer.finish()
            if check is not None:
                _check_while_syncing(handle.fileno(), check)
        finally:
            digest.close()
    return digest.hexdigest


def _check_while_syncing(fd: int, check: Callable[[], None]) -> None:
    """Run ``check`` while ``fd`` is fsynced on a thread (the disk writes while Python checks); an fsync
    error is raised here (a later fsync of the same file may no longer report it)."""
    failed: list[BaseException] = []

    def sync() -> None:
        try:
            os.fsync(fd)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            failed.append(exc)

    syncing = threading.Thread(target=sync, name="fsync", daemon=True)
    syncing.start()
    try:
        check()
    finally:
        syncing.join()
    if failed:
        raise failed[0]


#: Longest kernel copy :class:`_Output` merges before writing it (and reporting its bytes as written).
RUN_BYTES = 64 * 1024 * 1024


class _Output:
    """The new archive, written front to back as literal bytes (headers, descriptors, small records) and
    ranges copied from the source.

    A range that starts in the source exactly as far after the previous range's end as the output has
    advanced since (by literal bytes only) extends that range: one kernel copy takes the source's bytes in
    between along, and the literal bytes are then written over them. Records the source stores back to back
    and the output keeps back to back in the same order are so copied together, their headers included,
    whatever differs in those headers (names, zip64 offsets). Nothing is reported to ``on_bytes`` (which may
    hash the file as it grows) before its final bytes are in the file. Memory: the literal bytes of one run.
    """

    def __init__(self, fd: int, src: int, on_bytes: OnBytes | None):
        self._fd, self._src, self._on_bytes = fd, src, on_bytes
        self.position = 0
        self._reported = 0
        self._run: tuple[int, int, int] | None = None  # (source offset, output offset, length)
        self._literals: list[tuple[int, bytes]] = []  # (output offset, bytes) not yet written

    def write(self, data: bytes) -> None:
        self._literals.append((self.position, data))
        self.position += len(data)

    def copy(self, src_offset: int, length: int) -> None:
        run = self._run
        if run is not None:
            src_start, dst_start, run_length = run
            gap = self.position - (dst_start + run_length)  # literal bytes since the run's end
            if src_offset - (src_start + run_length) == gap and self.position + length - dst_start <= RUN_BYTES:
                self._run = (src_start, dst_start, self.position + length - dst_start)
                self.position += length
                return
        self.flush()
        self._run = (src_offset, self.position, length)
        self.position += length

    def flush(self) -> None:
        """Write the pending run and literal bytes; report everything written so far."""
        if self._run is not None:
            src_start, dst_start, length = self._run
            copy_range(self._src, src_start, self._fd, dst_start, length)
            self._run = None
        for offset, data in self._literals:
            pwrite_all(self._fd, data, offset)
        self._literals.clear()
        if self._on_bytes and self.position > self._reported:
            self._on_bytes(self.position - self._reported)
        self._reported = self.position


@dataclass(frozen=True)
class _Entry:
    name: bytes
    header_offset: int
    size: int
    crc: int


class _ZipWriter:
    """Stored records, each aligned as PyTorch's miniz writer aligns them; then the central directory."""

    def __init__(self, out: _Output, prefix: str):
        self._out, self._prefix = out, prefix
        self._entries: list[_Entry] = []

    def _start(self, name: str, size: int, crc: int) -> None:
        encoded = f"{self._prefix}/{name}".encode()
        cursor = self._out.position
        zip64 = b""
        if size >= _MAX32 or cursor >= _MAX32:
            fields = (struct.pack("<QQ", size, size) if size >= _MAX32 else b"") + (
                struct.pack("<Q", cursor) if cursor >= _MAX32 else b""
            )
            zip64 = struct.pack("<HH", 0x0001, len(fields)) + fields
        padding = -(cursor + 30 + len(encoded) + len(zip64) + 4) % ALIGNMENT
        extra = zip64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding
        flags = _STORED_WITH_DESCRIPTOR if size else _UTF8
        local = struct.pack("<IHHHHHIIIHH", _LOCAL, 0, flags, 0, 0, 0, 0, 0, 0, len(encoded), len(extra))
        self._out.write(local + encoded + extra)
        self._entries.append(_Entry(encoded, cursor, size, crc))

    def _end(self, size: int, crc: int) -> None:
        if not size:
            return
        big = size >= _MAX32 or self._entries[-1].header_offset >= _MAX32
        self._out.write(struct.pack("<IIQQ" if big else "<IIII", _DESCRIPTOR, crc, size, size))

    def add_bytes(self, name: str, data: bytes) -> None:
        crc = zlib.crc32(data)
        self._start(name, len(data), crc)
        self._out.write(data)
        self._end(len(data), crc)

    def add_copy(self, name: str, record: Record) -> None:
        """A record whose bytes (and CRC-32, from the source's central directory) are the source record's."""
        self._start(name, record.size, record.crc)
        self._out.copy(record.offset, record.size)
        self._end(record.size, record.crc)

    def serialization_id(self, data_pkl: bytes) -> bytes:
        """Like PyTorch's: 20 digits, then 20 digits derived from the CRC-32 of every record. PyTorch draws the first
        20 at random; here they come from the sha256 of ``data.pkl``, so the same input always gives the same bytes
        (a rerun, a batch, a bucket and a disk write identical files), and different objects still differ."""
        combined = 0
        for entry in self._entries:
            combined = zlib.crc32(struct.pack("<I", entry.crc), combined)
        nonce = int.from_bytes(hashlib.sha256(data_pkl).digest()[:8], "little")
        return f"{nonce:020d}{combined:020d}".encode()

    def finish(self) -> None:
        out = self._out
        start = out.position
        for entry in self._entries:
            wide = [v for v in (entry.size, entry.size, entry.header_offset) if v >= _MAX32]
            extra = struct.pack(f"<HH{len(wide)}Q", 0x0001, 8 * len(wide), *wide) if wide else b""
            size, offset = (_FULL if v >= _MAX32 else v for v in (entry.size, entry.header_offset))
            flags = _STORED_WITH_DESCRIPTOR if entry.size else _UTF8
            fixed = (_CENTRAL, 0, 0, flags, 0, 0, 0, entry.crc, size, size, len(entry.name), len(extra), 0, 0, 0, 0)
            out.write(struct.pack("<IHHHHHHIIIHHHHHII", *fixed, offset) + entry.name + extra)
        count, directory_size, end64 = len(self._entries), out.position - start, out.position
        # Like miniz in PyTorch: always the zip64 end record and its locator, then the classic end record.
        out.write(struct.pack("<IQHHIIQQQQ", _END64, 44, 0x031E, 45, 0, 0, count, count, directory_size, start))
        out.write(struct.pack("<IIQI", _LOCATOR64, 0, end64, 1))
        short = min(count, 0xFFFF)
        directory_size, start = (_FULL if v >= _MAX32 else v for v in (directory_size, start))
        out.write(struct.pack("<IHHHHIIH", _END, 0, 0, short, short, directory_size, start, 0))
        out.flush()
