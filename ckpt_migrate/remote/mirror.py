"""Mirror a remote checkpoint tree into a local directory, for the local planner and writer to run on.

Two depths:

- **sparse** (``inspect``, dry runs): every object becomes a local file of its full size, holding only
  the bytes planning reads, the rest a hole (``truncate``; nothing else is fetched):

  - ``*.json`` and ``adapter_model.bin`` (the planner loads it weights-only), and any file up to
    :data:`SMALL_FILE_BYTES` (``rng_state.pth``, ``README.md``): whole;
  - ``*.safetensors``: the 8-byte length and the JSON header (what ``read_header`` reads);
  - other torch zip archives (``optimizer.pt``...): the central directory and the ``data.pkl`` record,
    the only record ``pickle_globals`` and ``load_skeleton`` read (storages are never read while planning);
  - anything else: nothing (planning uses only its name and size).

  ``tests/test_remote.py`` checks the claim: over every fixture, the report of the sparse mirror equals
  the report of the checkpoint itself.
- **full** (``fix``): every object of one checkpoint streamed down in bounded ranged reads.

A directory holding the staging marker of an unfinished remote ``fix`` and no manifest is not there
(:func:`visible`): no command sees it.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

from ckpt_migrate.formats.adapter import BIN_WEIGHTS, MANIFEST
from ckpt_migrate.formats.pickles import MAX_PICKLE_BYTES
from ckpt_migrate.formats.safetensors import MAX_HEADER_BYTES
from ckpt_migrate.remote.store import Location

STAGING_MARKER = ".ckpt-migrate-staging"
SMALL_FILE_BYTES = 64 * 1024
#: First read of a safetensors file: its length prefix and, for most adapters, all of its header.
HEADER_PROBE_BYTES = 64 * 1024
_ZIP_TAIL_BYTES = 64 * 1024
_ZIP_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")
_END, _END64_LOCATOR = b"PK\x05\x06", b"PK\x06\x07"


def visible(listing: dict[str, int]) -> dict[str, int]:
    """``listing`` without the directories an unfinished ``fix`` left (staging marker, no manifest), and
    without the stray marker of one that was killed after its manifest was written."""
    parents = {name.rpartition("/")[0] for name in listing if name.rpartition("/")[2] == STAGING_MARKER}
    unfinished = {p for p in parents if f"{p}/{MANIFEST}".lstrip("/") not in listing}
    kept = {}
    for name, size in listing.items():
        if name.rpartition("/")[2] == STAGING_MARKER:
            continue
        if any(p == "" or name.startswith(p + "/") for p in unfinished):
            continue
        kept[name] = size
    return kept


def mirror(
    location: Location,
    listing: dict[str, int],
    target: Path,
    *,
    full: bool,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Materialise ``listing`` (relative name -> size, as :meth:`Location.listing` gives) below ``target``."""
    for name, size in sorted(listing.items()):
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if full:
            location.download(name, size, path, on_bytes)
        else:
            _sparse_file(location, name, size, path)


def _sparse_file(location: Location, name: str, size: int, path: Path) -> None:
    base = name.rpartition("/")[2]
    with open(path, "xb") as handle:
        if base.endswith(".json") or base == BIN_WEIGHTS or size <= SMALL_FILE_BYTES:
            handle.write(location.read_all(name))
        elif base.endswith(".safetensors"):
            _put(handle, 0, _safetensors_header(location, name, size))
        elif base.endswith(_ZIP_SUFFIXES):
            for offset, data in _zip_pickle_ranges(location, name, size, path, handle):
                _put(handle, offset, data)
        handle.truncate(size)


def _put(handle, offset: int, data: bytes) -> None:
    handle.seek(offset)
    handle.write(data)
    handle.flush()


def _safetensors_header(location: Location, name: str, size: int) -> bytes:
    """The length prefix and the header: one ranged read, a second only for a header over 64 KiB."""
    head = location.read_range(name, 0, min(size, HEADER_PROBE_BYTES))
    if len(head) < 8:
        return head
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER_BYTES or length > size - 8:
        return head[:8]  # read_header refuses it from the length alone, as it does the real file
    if 8 + length > len(head):
        head += location.read_range(name, len(head), 8 + length)
    return head[: 8 + length]


def _zip_pickle_ranges(location: Location, name: str, size: int, path: Path, handle) -> list[tuple[int, bytes]]:
    """The central directory, then each top-level ``data.pkl`` record (local header and data): zipfile and
    the planner's pickle readers read nothing else. Not a zip: just the tail (the planner refuses it alike)."""
    tail_start = max(0, size - _ZIP_TAIL_BYTES)
    tail = location.read_range(name, tail_start, size)
    _put(handle, tail_start, tail)
    directory_start = _central_directory_start(tail, tail_start)
    if directory_start is not None and 0 <= directory_start < tail_start:
        _put(handle, directory_start, location.read_range(name, directory_start, tail_start))
    ranges: list[tuple[int, bytes]] = []
    try:
        with zipfile.ZipFile(path) as archive:
            records = [i for i in archive.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError):
        return ranges
    for info in records:
        if info.file_size > MAX_PICKLE_BYTES:
            continue  # refused from the central directory's size alone
        local = location.read_range(name, info.header_offset, min(size, info.header_offset + 30))
        if len(local) < 30:
            continue
        name_length, extra_length = struct.unpack_from("<HH", local, 26)
        end = min(size, info.header_offset + 30 + name_length + extra_length + info.compress_size)
        ranges.append((info.header_offset, local + location.read_range(name, info.header_offset + 30, end)))
    return ranges


def _central_directory_start(tail: bytes, tail_start: int) -> int | None:
    at = tail.rfind(_END)
    if at < 0 or at + 22 > len(tail):
        return None
    offset = struct.unpack_from("<I", tail, at + 16)[0]
    locator = at - 20
    if offset == 0xFFFFFFFF and locator >= 0 and tail[locator : locator + 4] == _END64_LOCATOR:
        end64 = struct.unpack_from("<Q", tail, locator + 8)[0] - tail_start
        if 0 <= end64 and end64 + 56 <= len(tail):
            return struct.unpack_from("<Q", tail, end64 + 48)[0]
        return None
    return offset
