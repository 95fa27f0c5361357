"""sha256 of files, computed off the main thread: hashlib releases the GIL, so hashes overlap copies.

The manifest records the sha256 of every input read and every output written. Since unchanged bytes
are copied by the kernel and never pass through Python, every hash is a read of its own: inputs on
:class:`Hashes`' threads (started as early as the planner knows a file will be read), outputs by a
:class:`FollowingSha256` that reads a file back while it is being written. Hashes read the page cache
through read-only maps (no copy into a buffer) and run at a lower CPU priority than the copies and
the imports the run waits for: they fill the CPU time those leave, mostly the final fsync's.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError

#: Buffer size where bytes are read rather than mapped or copied in the kernel: 1 MiB stays in the CPU
#: cache between the read and its use (8 MiB measured 1.5-4x the system time for the same bytes).
CHUNK_BYTES = 1024 * 1024
OnBytes = Callable[[int], None]


class Abandoned(Exception):
    """A hash that is no longer wanted stopped early."""


def both(*callbacks: OnBytes | None) -> OnBytes:
    """One byte counter that reports to every given one."""
    present = [c for c in callbacks if c is not None]

    def report(count: int) -> None:
        for callback in present:
            callback(count)

    return report


#: Bytes hashed per mapping: sha256 reads the page cache through a read-only map, not a copy of it
#: (``read`` into a buffer cost 1.4 s of system time per 2.4 GiB here, on top of sha256's 1.9 s), and
#: the GIL is taken once per window, so a thread holding it (``import torch``) barely slows the hash.
WINDOW_BYTES = 8 * 1024 * 1024


def hash_mapped(
    fd: int, digest: Any, start: int, end: int, on_bytes: OnBytes | None = None, stop: threading.Event | None = None
) -> None:
    """Feed bytes ``start:end`` of the open file ``fd`` to ``digest``, through read-only maps.

    A map of a file that another process truncates faults (SIGBUS) when read: the size is checked before
    every window, which leaves a window's hash (milliseconds) for such a race rather than the whole file.
    Filesystems that cannot map files are read with ``pread`` instead.
    """
    while start < end:
        if stop is not None and stop.is_set():
            raise Abandoned()
        size = os.fstat(fd).st_size
        if size < end:
            raise OSError(f"file is {size} bytes, shorter than the {end} to hash")
        base = start - start % mmap.ALLOCATIONGRANULARITY
        stop_at = min(end, base + WINDOW_BYTES)
        try:
            with mmap.mmap(fd, stop_at - base, prot=mmap.PROT_READ, offset=base) as mapped:
                with memoryview(mapped) as view:
                    digest.update(view[start - base :])
        except (OSError, ValueError):  # no mmap on this filesystem (procfs, some FUSE)
            _hash_read(fd, digest, start, stop_at)
        if on_bytes:
            on_bytes(stop_at - start)
        start = stop_at


def _hash_read(fd: int, digest: Any, start: int, end: int) -> None:
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    while start < end:
        got = os.preadv(fd, [view[: min(len(buffer), end - start)]], start)
        if got == 0:
            raise OSError("file ended early while it was hashed")
        digest.update(view[:got])
        start += got


def yield_cpu() -> None:
    """Lower the calling thread's CPU priority (Linux: niceness is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def sha256_file(path: Path, on_bytes: OnBytes | None = None, stop: threading.Event | None = None) -> str:
    """The sha256 of a file's bytes; raises :class:`Abandoned` once ``stop`` is set."""
    yield_cpu()
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        try:
            hash_mapped(handle.fileno(), digest, 0, os.fstat(handle.fileno()).st_size, on_bytes, stop)
        except OSError as exc:
            raise UnreadableInputError(f"changed while it was read ({exc})", path) from None
    return digest.hexdigest()


class FollowingSha256:
    """The sha256 of a file that is being written front to back, computed while it is written.

    A thread reads back (from the page cache) every byte the writer reports with :meth:`advance`,
    so hashing overlaps the writing and the fsync; :meth:`hexdigest` waits for the last bytes.
    What it hashes is what the file holds, not what the writer meant to write.
    """

    def __init__(self, path: Path, on_bytes: OnBytes | None = None):
        self._path, self._on_bytes = path, on_bytes
        self._written, self._closed, self._error = 0, False, None
        self._changed = threading.Condition()
        self._digest = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, name=f"sha256 {path.name}", daemon=True)
        self._thread.start()

    def advance(self, count: int) -> None:
        """``count`` more bytes are written, right after the ones reported before."""
        with self._changed:
            self._written += count
            self._changed.notify()

    def close(self) -> None:
        """No more bytes will come (also on failure: the thread then stops)."""
        with self._changed:
            self._closed = True
            self._changed.notify()

    def hexdigest(self) -> str:
        self.close()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def _run(self) -> None:
        yield_cpu()
        done = 0
        try:
            with open(self._path, "rb", buffering=0) as handle:
                while True:
                    with self._changed:
                        while self._written == done and not self._closed:
                            self._changed.wait()
                        written, closed = self._written, self._closed
                    if written == done and closed:
                        return
                    hash_mapped(handle.fileno(), self._digest, done, written, self._on_bytes)
                    done = written
        except Exception as exc:  # noqa: BLE001 - handed to the caller of hexdigest()
            self._error = exc


def _hash_threads() -> int:
    """Threads for input hashes: leave one CPU to the main thread, whose planning (imports, unpickling) and
    writes are what the run waits for (on 2 CPUs, two hash threads left planning 2/3 of a CPU)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return max(1, min(2, cpus - 1))


def _key(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Hashes:
    """sha256 of input files on background threads, started ahead of need and used only if the file is
    unchanged when the hash is asked for (same device, inode, size and modification time)."""

    def __init__(self, threads: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=threads or _hash_threads(), thread_name_prefix="sha256")
        self._jobs: dict[Path, tuple[tuple[int, int, int, int], Future[str], threading.Event, bool]] = {}

    def start(self, path: Path, on_bytes: OnBytes | None = None) -> None:
        """Begin hashing ``path`` (once; nothing happens for a missing file)."""
        path = _key(path)
        if path in self._jobs:
            return
        try:
            identity = _identity(path)
        except OSError:
            return
        stop = threading.Event()
        self._jobs[path] = (identity, self._pool.submit(sha256_file, path, on_bytes, stop), stop, on_bytes is not None)

    def result(self, path: Path, on_bytes: OnBytes | None = None) -> str:
        """The sha256 of ``path`` as it is now: the hash started ahead if the file did not change since, else
        a new one computed here. ``on_bytes`` hears of the bytes a hash started without it counted."""
        job = self._jobs.pop(_key(path), None)
        if job is not None:
            identity, future, _, counted = job
            if not future.cancel():
                digest = future.result()
                if _identity(path) == identity:
                    if on_bytes and not counted:
                        on_bytes(identity[2])
                    return digest
        return sha256_file(path, on_bytes)

    def forget(self, path: Path) -> None:
        """The file will not be read after all: stop hashing it."""
        job = self._jobs.pop(_key(path), None)
        if job is not None:
            job[2].set()
            job[1].cancel()

    def forget_under(self, directory: Path) -> None:
        """Stop hashing every file below ``directory`` (a checkpoint that will not be written)."""
        for path in [p for p in self._jobs if p.is_relative_to(_key(directory))]:
            self.forget(path)

    def close(self) -> None:
        """Stop every hash still running or queued, and wait for the threads."""
        for path in list(self._jobs):
            self.forget(path)
        self._pool.shutdown(wait=True, cancel_futures=True)
