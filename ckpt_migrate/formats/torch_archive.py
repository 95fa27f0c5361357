"""``torch.save``'s zip archive, rewritten record by record: storages are copied, never loaded.

A torch archive is a zip of stored (uncompressed) records under one prefix: ``data.pkl`` (the
pickled object; each tensor names its storage by a key), ``data/<key>`` (the raw bytes of each
storage), and a few small records (``.format_version``, ``.storage_alignment``, ``byteorder``,
``version``, ``.data/serialization_id``). :func:`write_archive` writes a new object whose tensors
all come from a source archive (see :func:`~ckpt_migrate.formats.pickles.load_skeleton`): the new
``data.pkl`` is pickled here exactly as ``torch.save`` pickles (same reduce of each tensor, same
persistent ids, protocol 2: byte-identical for the same object), and each storage record is copied
in the kernel from the source record, keeping its CRC-32. The layout is miniz's as PyTorch writes
it: every record's bytes aligned to 64, a data descriptor after every non-empty record, zip64
fields from 4 GiB on, storages in key order. torch relies on that layout when it computes storage
offsets itself (``map_location="meta"``, ``calculate_storage_offsets``); ``tests`` check it.
"""

from __future__ import annotations

import io
import pickle
import secrets
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.formats.digests import OnBytes
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
    target: Path, obj: Any, storage_key: dict[int, str], source: Path, on_bytes: OnBytes | None = None
) -> None:
    """Write ``obj`` as a torch archive at the new file ``target``, storages copied from ``source``."""
    prefix, records = read_records(source)
    data_pkl, sources = pickle_like_torch(obj, storage_key)
    missing = [key for key in sources if f"data/{key}" not in records]
    if missing:
        raise UnreadableInputError(f"the archive has no record for storage {missing[0]!r}", source)
    small = [(".format_version", b"1"), (".storage_alignment", str(ALIGNMENT).encode())]
    kept = [name for name in records if name not in _REGENERATED and not name.startswith("data/")]
    head = [n for n in kept if n == "byteorder"]
    tail = [n for n in kept if n != "byteorder"]
    with new_file(target) as handle, open(source, "rb", buffering=0) as src:
        writer = _ZipWriter(handle.fileno(), prefix)
        writer.add_bytes("data.pkl", data_pkl)
        for name, data in small:
            writer.add_bytes(name, data)
        for name in head:
            writer.add_copy(name, src.fileno(), records[name], on_bytes)
        for new_key, old_key in enumerate(sources):
            writer.add_copy(f"data/{new_key}", src.fileno(), records[f"data/{old_key}"], on_bytes)
        for name in tail:
            writer.add_copy(name, src.fileno(), records[name], on_bytes)
        writer.add_bytes(".data/serialization_id", writer.serialization_id())
        writer.finish()


@dataclass(frozen=True)
class _Entry:
    name: bytes
    header_offset: int
    size: int
    crc: int


class _ZipWriter:
    """Stored records, each aligned as PyTorch's miniz writer aligns them; then the central directory."""

    def __init__(self, fd: int, prefix: str):
        self._fd, self._prefix, self._position = fd, prefix, 0
        self._entries: list[_Entry] = []

    def _start(self, name: str, size: int, crc: int) -> int:
        encoded = f"{self._prefix}/{name}".encode()
        cursor = self._position
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
        self._write(local + encoded + extra)
        self._entries.append(_Entry(encoded, cursor, size, crc))
        return self._position

    def _end(self, size: int, crc: int) -> None:
        if not size:
            return
        big = size >= _MAX32 or self._entries[-1].header_offset >= _MAX32
        self._write(struct.pack("<IIQQ" if big else "<IIII", _DESCRIPTOR, crc, size, size))

    def _write(self, data: bytes) -> None:
        pwrite_all(self._fd, data, self._position)
        self._position += len(data)

    def add_bytes(self, name: str, data: bytes) -> None:
        crc = zlib.crc32(data)
        self._start(name, len(data), crc)
        self._write(data)
        self._end(len(data), crc)

    def add_copy(self, name: str, src: int, record: Record, on_bytes: OnBytes | None) -> None:
        at = self._start(name, record.size, record.crc)
        copy_range(src, record.offset, self._fd, at, record.size, on_bytes)
        self._position += record.size
        self._end(record.size, record.crc)

    def serialization_id(self) -> bytes:
        """Like PyTorch's: 20 random digits, then 20 digits derived from the CRC-32 of every record."""
        combined = 0
        for entry in self._entries:
            combined = zlib.crc32(struct.pack("<I", entry.crc), combined)
        return f"{secrets.randbits(64):020d}{combined:020d}".encode()

    def finish(self) -> None:
        start = self._position
        for entry in self._entries:
            wide = [v for v in (entry.size, entry.size, entry.header_offset) if v >= _MAX32]
            extra = struct.pack(f"<HH{len(wide)}Q", 0x0001, 8 * len(wide), *wide) if wide else b""
            size, offset = (_FULL if v >= _MAX32 else v for v in (entry.size, entry.header_offset))
            flags = _STORED_WITH_DESCRIPTOR if entry.size else _UTF8
            fixed = (_CENTRAL, 0, 0, flags, 0, 0, 0, entry.crc, size, size, len(entry.name), len(extra), 0, 0, 0, 0)
            self._write(struct.pack("<IHHHHHHIIIHHHHHII", *fixed, offset) + entry.name + extra)
        count, directory_size, end64 = len(self._entries), self._position - start, self._position
        # Like miniz in PyTorch: always the zip64 end record and its locator, then the classic end record.
        self._write(struct.pack("<IQHHIIQQQQ", _END64, 44, 0x031E, 45, 0, 0, count, count, directory_size, start))
        self._write(struct.pack("<IIQI", _LOCATOR64, 0, end64, 1))
        short = min(count, 0xFFFF)
        directory_size, start = (_FULL if v >= _MAX32 else v for v in (directory_size, start))
        self._write(struct.pack("<IHHHHIIH", _END, 0, 0, short, short, directory_size, start, 0))
