"""Plain files: durable new files (exclusive create, fsync), byte-for-byte copies, sha256.

Every file the tool writes goes through :func:`new_file`, so none is ever overwritten and none is
published before its bytes are on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ckpt_migrate.core.errors import UnreadableInputError

COPY_CHUNK_BYTES = 8 * 1024 * 1024
OnBytes = Callable[[int], None]


@contextlib.contextmanager
def new_file(path: str | Path) -> Iterator[BinaryIO]:
    """Create ``path`` (refusing an existing one), yield it for writing, then flush and fsync it."""
    with open(path, "xb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_new(path: str | Path, data: bytes) -> str:
    """Write ``data`` to the new file ``path`` durably; return its sha256."""
    with new_file(path) as handle:
        handle.write(data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, on_bytes: OnBytes | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(COPY_CHUNK_BYTES):
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return digest.hexdigest()


def copy_file(source: Path, target: Path, on_bytes: OnBytes | None = None) -> str:
    """Copy a file's bytes (never interpreting them) to the new file ``target``; return their sha256."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, new_file(target) as dst:
        while chunk := src.read(COPY_CHUNK_BYTES):
            dst.write(chunk)
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return digest.hexdigest()


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every directory below ``root`` (file entries are durable once their directory is)."""
    for dirpath, _, _ in os.walk(root):
        fsync_directory(Path(dirpath))


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; anything else is an :class:`UnreadableInputError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UnreadableInputError("missing", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableInputError(f"cannot read: {exc}", path) from exc
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also integers beyond sys.get_int_max_str_digits
        raise UnreadableInputError(f"invalid JSON ({exc})", path) from exc
    if not isinstance(value, dict):
        raise UnreadableInputError("expected a JSON object", path)
    return value
