"""The verbs: ``inspect`` a checkpoint, ``fix`` it, list the known migrations."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_migrate.base_model import BaseModel
from ckpt_migrate.checkpoint import find_checkpoints
from ckpt_migrate.errors import (
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_REPAIRABLE,
    EXIT_UNREADABLE,
    EXIT_UNRECOVERABLE,
    EXIT_VERIFY_FAILED,
    CkptMigrateError,
    OutputError,
    UnreadableInputError,
    UnrecoverableError,
    VerificationFailedError,
)
from ckpt_migrate.migrate import Migration, known_migrations, plan_checkpoint
from ckpt_migrate.plan import CheckpointPlan

_FAILURE_CODES = {
    "unrecoverable": EXIT_UNRECOVERABLE,
    "unreadable": EXIT_UNREADABLE,
    "verify_failed": EXIT_VERIFY_FAILED,
}


@dataclass
class CheckpointResult:
    """The outcome for one checkpoint: its plan (when it could be read) and what happened."""

    relative: str
    source: Path
    status: str
    plan: CheckpointPlan | None = None
    output: Path | None = None
    error: str | None = None
    verification: dict | None = None

    @property
    def failed(self) -> bool:
        return self.status in _FAILURE_CODES


@dataclass
class Report:
    """What a command found and did, for every checkpoint under the source."""

    command: str
    source: Path
    dry_run: bool
    out: Path | None = None
    checkpoints: list[CheckpointResult] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        failures = [c for c in self.checkpoints if c.failed]
        if self.command == "inspect":
            if failures:
                return max(_FAILURE_CODES[c.status] for c in failures)
            return EXIT_REPAIRABLE if any(c.status == "repairable" for c in self.checkpoints) else EXIT_OK
        if not failures:
            return EXIT_OK
        if len(failures) < len(self.checkpoints):
            return EXIT_PARTIAL
        return max(_FAILURE_CODES[c.status] for c in failures)


class _NothingToPublish(Exception):
    """Raised inside the staging context so that a batch in which every checkpoint failed publishes nothing."""


def _write_and_publish(
    report: Report,
    to_write: list[CheckpointResult],
    out: Path,
    verify_with_base: str | Path | None,
    progress: bool | None,
) -> None:
    """Write every repairable checkpoint into one staging directory, then publish what succeeded.

    In a batch, a checkpoint that turns out unreadable while writing (or fails verification) is
    left out and reported; output errors such as a full disk abort everything.
    """
    from tqdm import tqdm

    from ckpt_migrate.writer import bytes_to_process, staged_output, write_checkpoint

    single = len(report.checkpoints) == 1
    total = sum(bytes_to_process(c.plan) for c in to_write if c.plan is not None)
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=None if progress is None else not progress)
    try:
        with bar, staged_output(out) as staging:
            for index, result in enumerate(to_write, 1):
                assert result.plan is not None
                bar.set_description(f"{result.relative} ({index}/{len(to_write)})")
                target = staging / result.relative
                target.mkdir(parents=True, exist_ok=True)
                try:
                    write_checkpoint(result.plan, target, bar.update)
                except (UnreadableInputError, UnrecoverableError) as exc:
                    if single:
                        raise
                    shutil.rmtree(target, ignore_errors=True)
                    result.status, result.error = "unreadable", str(exc)
                    continue
                if verify_with_base is not None and not _verified(result, target, verify_with_base, single):
                    shutil.rmtree(target)
                    continue
                result.status, result.output = "repaired", out / result.relative
            if not any(c.status == "repaired" for c in to_write):
                raise _NothingToPublish
    except _NothingToPublish:
        pass  # every checkpoint failed and says why; staging is gone and --out was not created


def _verified(result: CheckpointResult, staged: Path, base_model: str | Path | None, single: bool) -> bool:
    from ckpt_migrate.verify import verify_checkpoint

    verdict = verify_checkpoint(staged, base_model, source_dir=result.source)
    result.verification = verdict.to_dict()
    if verdict.ok:
        return True
    message = "verification failed, not published: " + "; ".join(verdict.reasons)
    if single:
        raise VerificationFailedError(message, result.source)
    result.status, result.error = "verify_failed", message
    return False


def list_migrations() -> list[Migration]:
    """The known migrations, in the order they run."""
    return known_migrations()


OPTIMIZER_CHOICES = ("drop", "remap")


def _plan_all(src: Path, base_model: str | Path | None, optimizer: str = "drop") -> list[CheckpointResult]:
    if optimizer not in OPTIMIZER_CHOICES:
        raise ValueError(f"optimizer must be one of {OPTIMIZER_CHOICES}")
    relatives = find_checkpoints(src)
    base = BaseModel(base_model) if base_model is not None else None
    results = []
    for relative in relatives:
        directory = src / relative
        try:
            plan = plan_checkpoint(directory, relative, base, {"optimizer": optimizer})
        except CkptMigrateError as exc:
            if relatives == ["."]:
                raise
            results.append(CheckpointResult(relative, directory, "unreadable", error=str(exc)))
            continue
        error = "; ".join(plan.after.unrecoverable) or None
        results.append(CheckpointResult(relative, directory, plan.status, plan, error=error))
    return results


def inspect(src: str | Path, *, base_model: str | Path | None = None, optimizer: str = "drop") -> Report:
    """Say what each checkpoint at ``src`` is, what is wrong with it, and the repair plan.

    Reads only ``adapter_config.json``, file sizes and safetensors headers (a ``.bin`` adapter is
    loaded with ``torch.load(weights_only=True)``).
    """
    src = Path(src)
    return Report("inspect", src, dry_run=True, checkpoints=_plan_all(src, base_model, optimizer))


def fix(
    src: str | Path,
    out: str | Path | None = None,
    *,
    base_model: str | Path | None = None,
    dry_run: bool = False,
    progress: bool | None = None,
    optimizer: str = "drop",
    verify: bool = False,
) -> Report:
    """Repair every broken checkpoint at ``src`` into ``out`` (mirroring a run directory's layout).

    With ``dry_run`` nothing is written and the report predicts exactly what a real run writes.
    Clean checkpoints are not written. ``progress`` shows a byte counter on stderr (``None``: only
    when stderr is a terminal). ``optimizer``: ``"drop"`` the stale ``optimizer.pt`` (default) or
    ``"remap"`` it onto the repaired parameters (needs ``base_model`` for the parameter order).
    ``verify`` runs :func:`ckpt_migrate.verify.verify_checkpoint` on each staged checkpoint against
    its source and publishes only those that pass (needs ``base_model``).

    >>> fix("run", "run-fixed", base_model="bart-base").exit_code  # doctest: +SKIP
    0
    """
    from ckpt_migrate.writer import check_output_target, earlier_batch_output

    src = Path(src)
    out_path = Path(out) if out is not None else None
    if out_path is None and not dry_run:
        raise OutputError("--out is required unless --dry-run is given")
    if verify and base_model is None:
        raise OutputError("--verify needs --base-model DIR to load the repaired checkpoint")
    if out_path is not None:
        check_output_target(src, out_path, allow_earlier_batch=True)
    report = Report("fix", src, dry_run, out_path, _plan_all(src, base_model, optimizer))
    done = earlier_batch_output(src, out_path) if out_path is not None and len(report.checkpoints) > 1 else set()
    if done:
        for result in report.checkpoints:
            if result.relative in done and result.status == "repairable":
                result.status, result.output = "repaired", out_path / result.relative
                result.plan.after.warn(f"already repaired into {result.output} by an earlier run; skipped")
    to_write = [c for c in report.checkpoints if c.status == "repairable"]
    if dry_run or not to_write or out_path is None:
        return report
    _write_and_publish(report, to_write, out_path, base_model if verify else None, progress)
    return report
