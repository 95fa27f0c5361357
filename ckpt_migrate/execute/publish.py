"""Where output goes: refuse unsafe targets, stage, fsync, rename; a batch publishes what succeeded.

Output is written into a staging directory beside the target, fsynced, checked against the plan,
then renamed into place, so the target either holds a complete checkpoint or does not exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from ckpt_migrate import interrupts
from ckpt_migrate.core.errors import OutputError, UnreadableInputError, UnrecoverableError
from ckpt_migrate.core.plan import Status
from ckpt_migrate.core.report import CheckpointResult
from ckpt_migrate.formats.adapter import MANIFEST
from ckpt_migrate.formats.digests import Hashes
from ckpt_migrate.formats.files import fsync_directory, fsync_tree

STAGING_MARK = ".ckpt-migrate-staging-"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (clock ticks since boot; Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name, in parentheses, may hold spaces
    return fields[19] if len(fields) > 19 else None


def _host() -> str:
    return "".join(c for c in socket.gethostname() if c.isalnum() or c == ".")[:64] or "host"


def _owner_tag() -> str:
    """``PID-STARTTIME-HOST``: enough for a later run to tell a dead owner from a live one (a reused pid has
    another start time; a staging directory on a shared filesystem from another host is never touched)."""
    return f"{os.getpid()}-{_start_time(os.getpid()) or 0}-{_host()}"


def _owner_dead(tag: str) -> bool:
    """Whether the run that made a staging directory tagged ``tag`` is certainly gone."""
    pid_text, _, rest = tag.partition("-")
    start, _, host = rest.partition("-")
    if not pid_text.isdigit() or (rest and host != _host()):
        return False  # not ours to judge: a foreign name, or another host's run
    pid = int(pid_text)
    if pid == os.getpid():  # this process owns no staging directory yet: an earlier process with this pid left it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    started = _start_time(pid)
    return bool(rest) and start != "0" and started is not None and started != start  # the pid was reused


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging directories killed earlier runs left beside ``out`` (for any output in that directory;
    a live run's are kept)."""
    removed = []
    try:
        candidates = list(out.parent.iterdir())  # not glob(): names may contain [, * or ?
    except OSError:
        return removed
    for candidate in candidates:
        name, mark, tag = candidate.name.rpartition(STAGING_MARK)
        if not mark or not name.startswith(".") or not candidate.is_dir() or candidate.is_symlink():
            continue
        if _owner_dead(tag):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def earlier_batch_output(src: Path, out: Path) -> set[str]:
    """Checkpoints an earlier ``fix`` of the run directory ``src`` already published into ``out``.

    Non-empty only when every entry of ``out`` is such a checkpoint (its manifest names the same
    source), so a repeated batch adds the new checkpoints and never touches anything else.
    """
    done: set[str] = set()
    try:
        entries = list(out.iterdir()) if out.is_dir() else []
    except OSError:
        return set()
    for entry in entries:
        manifest = entry / MANIFEST
        try:
            source = json.loads(manifest.read_text()).get("source") if manifest.is_file() else None
        except (OSError, ValueError, AttributeError):
            return set()
        if not entry.is_dir() or source is None or Path(source) != (src / entry.name).resolve():
            return set()
        done.add(entry.name)
    return done


def check_output_target(src: Path, out: Path, allow_earlier_batch: bool = False) -> None:
    """Refuse an output that would overwrite data or land inside the source.

    With ``allow_earlier_batch``, ``out`` may hold checkpoints an earlier batch run published.
    """
    try:
        src_resolved, out_resolved = src.resolve(), out.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise OutputError(f"cannot resolve the path ({exc})", out) from exc
    if out_resolved == src_resolved or out_resolved.is_relative_to(src_resolved):
        raise OutputError("--out must not be the source or inside it", out)
    if src_resolved.is_relative_to(out_resolved):
        raise OutputError("--out must not contain the source", out)
    try:
        occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    except OSError as exc:
        raise OutputError(f"cannot inspect the output directory: {exc.strerror or exc}", out) from exc
    if occupied and not (allow_earlier_batch and earlier_batch_output(src, out)):
        raise OutputError("--out exists and is not an empty directory; refusing to overwrite", out)
    if not out_resolved.parent.is_dir():  # as cp and rsync: --out itself is created, never its parents
        if out_resolved.parent.exists():
            raise OutputError("the parent of --out is not a directory", out_resolved.parent)
        raise OutputError(
            "the parent of --out does not exist (only --out itself is created: mkdir -p it)", out_resolved.parent
        )
    if not os.access(out_resolved.parent, os.W_OK):
        raise OutputError("parent directory is not writable", out_resolved.parent)


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success fsync and rename it to ``out``, else remove it.

    If ``out`` is a non-empty directory (an earlier batch's output), each staged entry is renamed
    into it instead; entries are never replaced. A staging directory left empty publishes nothing.
    """
    out = out.resolve()
    remove_stale_staging(out)
    staging = out.parent / f".{out.name}{STAGING_MARK}{_owner_tag()}"
    try:
        staging.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot create staging directory: {exc.strerror}", staging) from exc
    interrupts.live_staging.add(staging)
    try:
        yield staging
        if interrupts.interrupted():  # a Ctrl-C some library swallowed (it re-raised another error, then recovered)
            raise KeyboardInterrupt
        if not any(staging.iterdir()):
            staging.rmdir()
            return
        fsync_tree(staging)
        if out.is_dir() and any(out.iterdir()):
            for entry in sorted(staging.iterdir()):
                if (out / entry.name).exists():
                    raise OutputError("already exists; refusing to overwrite", out / entry.name)
                os.rename(entry, out / entry.name)
            staging.rmdir()
        else:
            os.rename(staging, out)
        interrupts.live_staging.discard(staging)
        interrupts.published.append(out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"writing failed: {exc.strerror or exc}", exc.filename or out) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if not staging.exists():
            interrupts.live_staging.discard(staging)
    # Published: --out is complete. Making the rename durable is best effort; failing it must not report
    # "nothing was published" nor remove anything.
    with contextlib.suppress(OSError):
        fsync_directory(out.parent)


def write_and_publish(
    results: list[CheckpointResult],
    out: Path,
    *,
    single: bool,
    check: Callable[[CheckpointResult, Path], bool] | None = None,
    progress: bool | None = None,
    hashes: Hashes | None = None,
) -> None:
    """Write every repairable checkpoint of ``results`` into one staging directory, then publish what succeeded.

    In a batch, a checkpoint that turns out unreadable while writing, or that ``check`` rejects, is
    left out and its result says why; output errors such as a full disk abort everything. A single
    checkpoint's failure is raised. ``hashes``: input hashes the caller started ahead (see ``write_checkpoint``).
    """
    from ckpt_migrate.execute.write import bytes_to_process, write_checkpoint
    from ckpt_migrate.progress import byte_bar, label

    to_write = [r for r in results if r.status is Status.REPAIRABLE and r.plan is not None]
    total = sum(bytes_to_process(r.plan) for r in to_write)
    names = [label(r.relative, r.source) for r in to_write]
    first = (names[0] if len(names) == 1 else f"{names[0]} (1/{len(names)})") if names else ""
    bar = byte_bar(total, first, progress)
    with bar, staged_output(out) as staging:
        for index, result in enumerate(to_write, 1):
            if len(to_write) > 1:
                bar.set_description(f"{names[index - 1]} ({index}/{len(to_write)})")
            target = staging / result.relative
            target.mkdir(parents=True, exist_ok=True)
            counted_before = bar.n
            try:
                write_checkpoint(result.plan, target, bar.update, hashes)
            except (UnreadableInputError, UnrecoverableError) as exc:
                if single:
                    raise
                shutil.rmtree(target, ignore_errors=True)
                result.status, result.error = Status.UNREADABLE, str(exc)
                bar.update(max(0, bytes_to_process(result.plan) - (bar.n - counted_before)))  # its share is done
                continue
            if check is not None and not check(result, target):
                shutil.rmtree(target)
                continue
            result.status, result.output = Status.REPAIRED, out / result.relative
