"""Plain files: durable new files (exclusive create, fsync), byte-for-byte copies in the kernel, JSON.

Every file the tool writes goes through :func:`new_file`, so none is ever overwritten and none is
published before its bytes are on disk. Bytes that are copied unchanged never pass through Python:
:func:`copy_range` asks the kernel (``copy_file_range``, a reflink where the filesystem shares blocks;
else ``sendfile``) and reads and writes only where the kernel refuses both.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.formats.digests import CHUNK_BYTES, FollowingSha256, OnBytes, both


@contextlib.contextmanager
def new_file(path: str | Path) -> Iterator[BinaryIO]:
    """Create ``path`` (refusing an existing one), yield it for writing, then flush and fsync it."""
    with open(path, "xb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


class EarlyWriteback:
    """Puts a file's dirty pages on disk while its writer goes on copying or computing.

    After every ``STEP_BYTES`` written (:meth:`wrote`), and when the writer pauses to compute a tensor
    (:meth:`pause`, which may first wait seconds for ``import torch``), an ``fdatasync`` starts on a
    thread unless one is running, so the disk writes from the first step on and the final fsync has
    little left to do. Without it, the kernel starts writeback only at its dirty threshold (10% of
    RAM), and a multi-GB file waits for its whole fsync at the end.
    """

    MIN_BYTES = 64 * 1024 * 1024
    STEP_BYTES = 256 * 1024 * 1024

    def __init__(self, fd: int):
        self._fd, self._unsynced = fd, 0
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def wrote(self, count: int) -> None:
        self._unsynced += count
        if self._unsynced >= self.STEP_BYTES:
            self.pause()

    def pause(self) -> None:
        if self._unsynced < self.MIN_BYTES or (self._thread is not None and self._thread.is_alive()):
            return
        self._unsynced = 0
        self._thread = threading.Thread(target=self._sync, name="writeback", daemon=True)
        self._thread.start()

    def _sync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:  # raised by join(): the kernel reports a writeback error to an fd only once
            self._error = exc

    def join(self) -> None:
        """Wait for a running fdatasync (before the file is closed) and raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error


def write_new(path: str | Path, data: bytes) -> str:
    """Write ``data`` to the new file ``path`` durably; return its sha256."""
    with new_file(path) as handle:
        handle.write(data)
    return hashlib.sha256(data).hexdigest()


#: Kernel copies are issued in pieces of this size (a multiple of any block size), so progress moves.
KERNEL_COPY_BYTES = 256 * 1024 * 1024
#: Alignment at which a reflinking filesystem can share blocks between source and copy.
BLOCK_BYTES = 4096
#: errno values meaning "this kernel or filesystem cannot do that copy": fall back, they are not I/O errors.
_REFUSED = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.ENOTSOCK}
)


def _kernel_copy(kind: str, src: int, src_offset: int, dst: int, dst_offset: int, count: int) -> int:
    if kind == "copy_file_range":
        return os.copy_file_range(src, dst, count, src_offset, dst_offset)
    os.lseek(dst, dst_offset, os.SEEK_SET)  # sendfile writes at the file position of ``dst``
    return os.sendfile(dst, src, src_offset, count)


def _pieces(src_offset: int, dst_offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(offset into the range, size) pieces; when both sides share their block phase, the pieces after
    the first start on block boundaries, so a reflinking filesystem can share the whole blocks."""
    start = 0
    if (src_offset - dst_offset) % BLOCK_BYTES == 0 and dst_offset % BLOCK_BYTES:
        first = min(length, BLOCK_BYTES - dst_offset % BLOCK_BYTES)
        yield 0, first
        start = first
    while start < length:
        size = min(KERNEL_COPY_BYTES, length - start)
        yield start, size
        start += size


def copy_range(
    src: int, src_offset: int, dst: int, dst_offset: int, length: int, on_bytes: OnBytes | None = None
) -> None:
    """Copy ``length`` bytes between open files at explicit offsets, in the kernel when it allows.

    ``os.copy_file_range`` first, then ``os.sendfile``, then ``pread``/``pwrite`` through an 8 MiB
    buffer, for whatever the kernel refuses (EXDEV, EINVAL, ENOSYS, EOPNOTSUPP, …) or leaves undone.
    A source that ends before ``src_offset + length`` raises :class:`UnreadableInputError`.
    """
    methods = [m for m in ("copy_file_range", "sendfile") if hasattr(os, m)]
    buffer: bytearray | None = None
    for begin, size in _pieces(src_offset, dst_offset, length):
        done = 0
        while done < size:
            at_src, at_dst, want = src_offset + begin + done, dst_offset + begin + done, size - done
            if methods:
                try:
                    got = _kernel_copy(methods[0], src, at_src, dst, at_dst, want)
                except OSError as exc:
                    if exc.errno not in _REFUSED:
                        raise
                    got = 0
                if got == 0:  # refused, or a filesystem that copies nothing (procfs, some FUSE): next method
                    methods.pop(0)
                    continue
            else:
                buffer = buffer if buffer is not None else bytearray(CHUNK_BYTES)
                got = os.preadv(src, [memoryview(buffer)[: min(want, len(buffer))]], at_src)
                if got == 0:
                    raise UnreadableInputError("file shrank while copying", _fd_path(src))
                pwrite_all(dst, memoryview(buffer)[:got], at_dst)
            done += got
            if on_bytes:
                on_bytes(got)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of the open file ``fd`` (its file position is not used)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _fd_path(fd: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def copy_file(source: Path, target: Path, on_bytes: OnBytes | None = None) -> str:
    """Copy a file's bytes (never interpreting them) to the new file ``target``, in the kernel when it allows.

    Returns the sha256 of ``target`` as written, read back while it is written; ``on_bytes`` counts
    the bytes copied and the bytes hashed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb", buffering=0) as src, new_file(target) as dst:
        digest = FollowingSha256(target, on_bytes)
        try:
            copy_range(src.fileno(), 0, dst.fileno(), 0, os.fstat(src.fileno()).st_size, both(on_bytes, digest.advance))
        finally:
            digest.close()
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
