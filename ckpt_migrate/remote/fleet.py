"""``inspect`` and ``fix`` for URLs and fleets: one task per checkpoint, run here or on a Dask cluster.

A task (:func:`repair_one`) takes one checkpoint from its source (a URL: streamed down into a temporary
directory; a local path: used in place), runs the local :func:`ckpt_migrate.api.fix` on it (the same
planner, writer, checks and verdicts), and publishes it: to a bucket with the manifest last
(:mod:`ckpt_migrate.remote.publish`), to a local directory by the local staged rename. A checkpoint an
earlier run already published from the same source is skipped, so re-running a batch resumes it.

Executors: ``local`` (one task after another, in this process), ``dask`` (a ``distributed.LocalCluster``,
one single-threaded worker process per CPU) and ``dask://HOST:PORT`` (join a running scheduler). Dask
reschedules the tasks of a lost worker (``distributed.scheduler.allowed-failures``, 3 by default); a
checkpoint whose task still fails is reported as failed, and the others are published.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import (
    CkptMigrateError,
    OutputError,
    UnreadableInputError,
    UnrecoverableError,
    VerificationFailedError,
)
from ckpt_migrate.core.plan import Status
from ckpt_migrate.core.report import CheckpointResult, Report
from ckpt_migrate.formats.adapter import MANIFEST
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.formats.hub import resolve_model
from ckpt_migrate.remote import is_url, local_path_of
from ckpt_migrate.remote.mirror import mirror, visible
from ckpt_migrate.remote.publish import check_remote_target, prepare_target, published_source, upload_checkpoint
from ckpt_migrate.remote.store import Location
from ckpt_migrate.verbs.planning import published_earlier

_NESTED = re.compile(r"^(checkpoint-\d+)/")
_STATUS_OF = {
    UnreadableInputError: Status.UNREADABLE,
    UnrecoverableError: Status.UNRECOVERABLE,
    VerificationFailedError: Status.VERIFY_FAILED,
    OutputError: Status.FAILED,
}


def _remote(location: str | Path | None) -> bool:
    return location is not None and is_url(str(location)) and local_path_of(str(location)) is None


def _local(location: str | Path) -> Path:
    text = str(location)
    return Path(local_path_of(text) or text)


def _join(root: str, relative: str) -> str:
    return root.rstrip("/") if relative == "." else f"{root.rstrip('/')}/{relative}"


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class Mirrors:
    """Local stand-ins for remote locations, and how to say their paths back as URLs."""

    root: Path
    urls: dict[str, str] = field(default_factory=dict)  # local path -> URL

    def add(self, local: Path, url: str) -> Path:
        self.urls[str(local)] = url
        return local

    def swap(self, text: Any) -> Any:
        """``text`` with every mirrored path written as its URL (longest first)."""
        if text is None:
            return None
        text = str(text)
        for local in sorted(self.urls, key=len, reverse=True):
            text = text.replace(local, self.urls[local])
        return text


@contextmanager
def _mirrors() -> Iterator[Mirrors]:
    root = Path(tempfile.mkdtemp(prefix="ckpt-migrate-"))
    try:
        yield Mirrors(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


_NOTHING = "no such file or directory (no object under this prefix)"
_NO_BASE = "base model not found: no object under this prefix"


def _mirror_tree(url: str, target: Path, *, full: bool, missing: str = _NOTHING) -> Location:
    """Mirror ``url`` into ``target``; the location returned holds the ETags of what was mirrored."""
    location = Location.open(url)
    listing = visible(location.listing())
    if not listing:
        raise UnreadableInputError(missing, url)
    target.mkdir(parents=True)
    mirror(location, listing, target, full=full)
    return location


def _base_model(base_model: str | Path | None, mirrors: Mirrors, *, full: bool) -> str | Path | None:
    if not _remote(base_model):
        return None if base_model is None else _local(base_model)
    _mirror_tree(str(base_model), mirrors.root / "base", full=full, missing=_NO_BASE)
    return mirrors.add(mirrors.root / "base", str(base_model).rstrip("/"))


def _relabel(report: Report, mirrors: Mirrors, source: str, out: str | None) -> Report:
    report.source = source  # type: ignore[assignment]  # a URL: reports only print it
    report.out = out  # type: ignore[assignment]
    report.notes = [mirrors.swap(n) for n in report.notes]
    for result in report.checkpoints:
        _relabel_result(result, mirrors)
    return report


def _relabel_result(result: CheckpointResult, mirrors: Mirrors) -> None:
    result.source = mirrors.swap(result.source)
    result.output = mirrors.swap(result.output) if result.output is not None else None
    result.error = mirrors.swap(result.error)
    if result.plan is not None:
        for state in [result.plan.after, *(a.after for a in result.plan.adapters)]:
            state.warnings[:] = [mirrors.swap(w) for w in state.warnings]


def _swapped(exc: CkptMigrateError, mirrors: Mirrors) -> CkptMigrateError:
    """The same error, naming URLs instead of the temporary mirrors."""
    return type(exc)(mirrors.swap(exc.message), mirrors.swap(exc.path) if exc.path is not None else None)


def inspect(src: str, *, base_model: str | Path | None = None, dry_run_fix: bool = False, **options: Any) -> Report:
    """``inspect`` (or ``fix --dry-run``) of a URL: the local planner on a sparse mirror (headers only)."""
    from ckpt_migrate import api

    with _mirrors() as mirrors:
        base = _base_model(base_model, mirrors, full=False)
        if _remote(src):
            _mirror_tree(src, mirrors.root / "src", full=False)
            local = mirrors.add(mirrors.root / "src", src.rstrip("/"))
        else:
            local = _local(src)
        try:
            if dry_run_fix:
                report = api.fix(local, None, base_model=base, dry_run=True, **options)
            else:
                report = api.inspect(local, base_model=base, **options)
        except CkptMigrateError as exc:
            raise _swapped(exc, mirrors) from None
        return _relabel(report, mirrors, src.rstrip("/") if _remote(src) else str(src), None)


# ---------------------------------------------------------------------------------------------- one task


@dataclass(frozen=True)
class FixJob:
    """One checkpoint to repair: ``relative`` below ``src``, into the same place below ``out``."""

    src: str
    relative: str
    out: str
    base_model: str | None
    options: tuple[tuple[str, Any], ...]
    single: bool = False


def source_id(src: str, relative: str) -> str:
    """What the published manifest names as the source: the URL, or the resolved local path (as write.py)."""
    if _remote(src):
        return _join(src, relative)
    return str((_local(src) / relative).resolve())


def _failed(job: FixJob, status: Status, message: str) -> CheckpointResult:
    return CheckpointResult(job.relative, _join(job.src, job.relative), status, error=message)  # type: ignore[arg-type]


def repair_one(job: FixJob) -> CheckpointResult:
    """Repair and publish one checkpoint; its failure is its result's status (raised for a single checkpoint)."""
    try:
        return _repair_one(job)
    except CkptMigrateError as exc:
        if job.single:
            raise
        status = next((s for kind, s in _STATUS_OF.items() if isinstance(exc, kind)), Status.FAILED)
        return _failed(job, status, str(exc))


def _repair_one(job: FixJob) -> CheckpointResult:
    with _mirrors() as mirrors:
        try:
            return _repair_in(job, mirrors)
        except CkptMigrateError as exc:
            raise _swapped(exc, mirrors) from None


def _repair_in(job: FixJob, mirrors: Mirrors) -> CheckpointResult:
    from ckpt_migrate import api

    options = dict(job.options)
    identity = source_id(job.src, job.relative)
    target = Location.open(job.out).child(job.relative) if _remote(job.out) else None
    local_out = mirrors.root / "out" if target is not None else _local(job.out) / job.relative
    earlier = published_source(target) if target is not None else _local_published_source(local_out)
    already = earlier == identity
    if target is not None and not already:
        already = not prepare_target(target, identity)
    origin = None
    if _remote(job.src):
        url = _join(job.src, job.relative)
        origin = _mirror_tree(url, mirrors.root / "src", full=not already)
        local_src = mirrors.add(mirrors.root / "src", url)
    else:
        local_src = _local(job.src) / job.relative
    base = _base_model(job.base_model, mirrors, full=not already)
    if already:  # published by an earlier run: plan it (headers only) to report it, write nothing
        report = api.fix(local_src, None, base_model=base, dry_run=True, **options)
        result = report.checkpoints[0]
        if result.status is Status.REPAIRABLE:  # proven on what was published (its headers, mirrored), not assumed
            published = local_out
            if target is not None:
                published = mirrors.add(mirrors.root / "published", target.url)
                _mirror_tree(target.url, published, full=False)
            output = target.url if target is not None else local_out
            published_earlier(result, output, published, None if base is None else BaseModel(resolve_model(base)))
    else:
        staged = mirrors.root / "out" if target is not None else local_out
        report = api.fix(local_src, staged, base_model=base, progress=False, **options)
        result = report.checkpoints[0]
        if result.status in (Status.REPAIRED, Status.WRITTEN):  # written: published, not proven (no base model)
            if target is not None:
                upload_checkpoint(staged, target, identity, origin)
                result.output = target.url  # type: ignore[assignment]
            elif _remote(job.src):
                _rename_source(staged / MANIFEST, identity)
    result.relative = job.relative
    _relabel_result(result, mirrors)
    return result


def _local_published_source(directory: Path) -> str | None:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def _rename_source(manifest: Path, source: str) -> None:
    """Name the URL, not the temporary mirror, as the source of a published local manifest (atomic replace)."""
    data = json.loads(manifest.read_text(encoding="utf-8"))
    data["source"] = source
    staged = manifest.with_name(f".{manifest.name}.{os.getpid()}")
    staged.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(staged, manifest)


# ---------------------------------------------------------------------------------------------- the batch


def discover(src: str) -> list[str]:
    """The checkpoints at ``src`` (``"."`` or ``checkpoint-N``), found as the local code finds them."""
    from ckpt_migrate.formats.checkpoint import find_checkpoints

    if not _remote(src):
        return find_checkpoints(_local(src))
    location = Location.open(src)
    listing = visible(location.listing())
    if not listing:
        raise UnreadableInputError(_NOTHING, src)
    with _mirrors() as mirrors:  # names and sizes only: empty files stand for the objects
        for name in listing:
            (mirrors.root / name).parent.mkdir(parents=True, exist_ok=True)
            (mirrors.root / name).touch()
        try:
            return find_checkpoints(mirrors.root)
        except CkptMigrateError as exc:
            raise type(exc)(exc.message, src) from None


def fix(
    src: str,
    out: str | None,
    *,
    base_model: str | Path | None = None,
    dry_run: bool = False,
    progress: bool | None = None,
    executor: str = "local",
    **options: Any,
) -> Report:
    """``fix`` of URLs or on a Dask cluster: one :func:`repair_one` task per checkpoint, one batch report."""
    src = str(src).rstrip("/")
    if dry_run:
        return inspect(src, base_model=base_model, dry_run_fix=True, **options)
    out = str(out).rstrip("/")  # given: api.fix checked it (core/options.require_out)
    if options.get("verify") and base_model is None:
        raise OutputError("--verify needs --base-model DIR to load the repaired checkpoint")
    if _remote(base_model) and not visible(Location.open(str(base_model)).listing()):
        raise UnreadableInputError(_NO_BASE, str(base_model))  # once, not once per checkpoint after its download
    relatives = discover(src)
    if "." in relatives and len(relatives) > 1:
        raise UnreadableInputError(
            "holds an adapter at its top and checkpoint-* directories: a remote or fleet fix takes them "
            "separately (pass the top and each checkpoint-N, or use a local path with --executor local)",
            src,
        )
    _check_target(src, out, relatives)
    single = relatives == ["."]
    frozen = tuple(sorted(options.items()))
    base = None if base_model is None else str(base_model)
    jobs = [FixJob(src, relative, out, base, frozen, single) for relative in relatives]
    results = run_jobs(jobs, executor, progress)
    display_src = src if _remote(src) else _local(src)
    display_out = out if _remote(out) else _local(out)
    report = Report("fix", display_src, False, display_out)  # type: ignore[arg-type]
    report.checkpoints = results
    return report


def _check_target(src: str, out: str, relatives: list[str]) -> None:
    if _remote(src) or _remote(out):
        check_remote_target(source_id(src, ".") if not _remote(src) else src, out)
    if _remote(out):
        listing = Location.open(out).listing()
        ours = {r for r in relatives if r != "."}
        stray = [n for n in listing if not (ours and _NESTED.match(n) and _NESTED.match(n).group(1) in ours)]
        if stray and relatives != ["."]:
            raise OutputError("--out exists and is not empty; refusing to overwrite", out)
        return  # a single checkpoint's prefix is judged by prepare_target
    local_out = _local(out)
    if relatives == ["."]:
        return  # the task's own fix checks a single checkpoint's --out
    entries = list(local_out.iterdir()) if local_out.is_dir() else []
    if any(e.name not in relatives and not e.name.startswith(".") for e in entries):
        raise OutputError("--out exists and is not empty; refusing to overwrite", local_out)
    try:
        local_out.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output directory: {exc.strerror or exc}", local_out) from None


def run_jobs(jobs: list[FixJob], executor: str, progress: bool | None) -> list[CheckpointResult]:
    """Every job's result, in job order; progress counts checkpoints done out of the total."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="ckpt", desc="checkpoints", disable=None if progress is None else not progress)
    with bar:
        if executor == "local":
            results = []
            for job in jobs:
                results.append(repair_one(job))
                bar.update(1)
            return results
        return _run_on_dask(jobs, executor, bar.update)


def _client(executor: str) -> Any:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise OutputError("--executor dask needs dask.distributed: pip install 'ckpt-migrate[dask]'") from None
    if executor == "dask":
        cluster = LocalCluster(threads_per_worker=1, dashboard_address=None)
        return Client(cluster), cluster
    if executor.startswith("dask://"):
        address = "tcp://" + executor[len("dask://") :]
        try:
            return Client(address, timeout="20s"), None
        except Exception as exc:  # noqa: BLE001 - no scheduler there: one line
            raise OutputError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    raise OutputError(f"unknown executor {executor!r} (local, dask, or dask://HOST:PORT)")


def _lost(exc: Exception) -> str:
    """Why a task has no result, in one line: its worker died (as often as the scheduler allows), or it crashed.
    Either way nothing of it is published (an upload cut short has no manifest), so re-running resumes."""
    if type(exc).__name__ == "KilledWorker":
        reason = "its Dask worker was lost while repairing it (distributed.scheduler.allowed-failures exceeded)"
    else:
        reason = f"its task failed on the cluster ({type(exc).__name__}: {exc})"
    return f"{reason}; re-run to resume"


def _run_on_dask(jobs: list[FixJob], executor: str, done: Callable[[int], None]) -> list[CheckpointResult]:
    from distributed import as_completed

    client, cluster = _client(executor)
    try:
        futures = {
            client.submit(
                repair_one, job, key=f"ckpt-migrate-{os.getpid()}-{i}-{job.relative}", pure=False, retries=1
            ): i
            for i, job in enumerate(jobs)
        }
        results: list[CheckpointResult | None] = [None] * len(jobs)
        for future in as_completed(futures):
            index = futures[future]
            try:
                results[index] = future.result()
            except CkptMigrateError:
                raise  # a single checkpoint's failure, raised as the local code raises it
            except Exception as exc:  # noqa: BLE001 - KilledWorker (its worker lost too often) or a crash
                results[index] = _failed(jobs[index], Status.FAILED, _lost(exc))
            done(1)
        return [r for r in results if r is not None]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
