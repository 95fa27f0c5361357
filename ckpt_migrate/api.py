"""The verbs, each a documented function: ``inspect``, ``fix``, ``verify``, ``list_migrations``.

The CLI is a thin layer over these; none of them imports torch, transformers or peft unless it
computes tensors or loads a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ckpt_migrate.core.errors import CkptMigrateError, OutputError, VerificationFailedError
from ckpt_migrate.core.migration import Migration
from ckpt_migrate.core.plan import OptimizerPolicy, Options, Status
from ckpt_migrate.core.report import CheckpointResult, Report
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.formats.checkpoint import find_checkpoints
from ckpt_migrate.planner import plan_checkpoint

if TYPE_CHECKING:
    from ckpt_migrate.verify import VerifyResult

__all__ = ["CheckpointResult", "Report", "fix", "inspect", "list_migrations", "verify"]


def list_migrations() -> list[Migration]:
    """The known migrations, in the order they run.

    >>> [m.ID for m in list_migrations()][0]
    '0001_fold_double_wrapped_head'
    """
    from ckpt_migrate.migrations import MIGRATIONS

    return list(MIGRATIONS)


def _version(name: str, value: str | None) -> str | None:
    from packaging.version import InvalidVersion, Version

    try:
        return None if value is None else str(Version(value))
    except InvalidVersion:
        raise ValueError(f"{name} {value!r} is not a version (e.g. 4.44.2)") from None


def _options(
    optimizer: str, target_transformers: str | None, target_peft: str | None, allow_lossy: bool = False
) -> Options:
    """Options from the verbs' keyword arguments; a bad value is a ``ValueError`` (the CLI's usage error)."""
    return Options(
        optimizer=OptimizerPolicy(optimizer),
        target_transformers=_version("target_transformers", target_transformers),
        target_peft=_version("target_peft", target_peft),
        allow_lossy=allow_lossy,
    )


def _plan_all(src: Path, base_model: str | Path | None, options: Options) -> list[CheckpointResult]:
    relatives = find_checkpoints(src)
    base = BaseModel.open(base_model) if base_model is not None else None
    results = []
    for relative in relatives:
        directory = src / relative
        try:
            plan = plan_checkpoint(directory, relative, base, options)
        except CkptMigrateError as exc:
            if relatives == ["."]:
                raise
            results.append(CheckpointResult(relative, directory, Status.UNREADABLE, error=str(exc)))
            continue
        error = "; ".join(plan.unrecoverable) or None
        results.append(CheckpointResult(relative, directory, plan.status, plan, error=error))
    return results


def inspect(
    src: str | Path,
    *,
    base_model: str | Path | None = None,
    optimizer: str = "drop",
    target_transformers: str | None = None,
    target_peft: str | None = None,
    allow_lossy: bool = False,
) -> Report:
    """Say what each checkpoint at ``src`` is, what is wrong with it, and the repair plan.

    Reads only ``adapter_config.json``, file sizes and safetensors headers (a ``.bin`` adapter is
    loaded with ``torch.load(weights_only=True)``).

    >>> inspect("run/checkpoint-500").exit_code  # doctest: +SKIP
    3
    """
    src = Path(src)
    options = _options(optimizer, target_transformers, target_peft, allow_lossy)
    return Report("inspect", src, dry_run=True, checkpoints=_plan_all(src, base_model, options))


def fix(
    src: str | Path,
    out: str | Path | None = None,
    *,
    base_model: str | Path | None = None,
    dry_run: bool = False,
    progress: bool | None = None,
    optimizer: str = "drop",
    target_transformers: str | None = None,
    target_peft: str | None = None,
    verify: bool = False,
    allow_lossy: bool = False,
) -> Report:
    """Repair every broken checkpoint at ``src`` into ``out`` (mirroring a run directory's layout).

    With ``dry_run`` nothing is written and the report predicts exactly what a real run writes.
    Clean checkpoints are not written. ``progress`` shows a byte counter on stderr (``None``: only
    when stderr is a terminal). ``optimizer``: ``"drop"`` the stale ``optimizer.pt`` (default) or
    ``"remap"`` it onto the repaired parameters (needs ``base_model`` for the parameter order).
    ``target_transformers`` / ``target_peft``: the releases that will resume the checkpoint
    (default: the installed ones). ``verify`` runs :func:`verify` on each staged checkpoint against its
    source and publishes only those that pass (needs ``base_model``). ``allow_lossy``: write the best repair of a
    checkpoint that lost trained values (refused by default), recording the loss in the report and the manifest.

    >>> fix("run", "run-fixed", base_model="bart-base").exit_code  # doctest: +SKIP
    0
    """
    from ckpt_migrate.execute.publish import check_output_target, earlier_batch_output, write_and_publish

    options = _options(optimizer, target_transformers, target_peft, allow_lossy)
    src = Path(src)
    out_path = Path(out) if out is not None else None
    if out_path is None and not dry_run:
        raise OutputError("--out is required unless --dry-run is given")
    if verify and base_model is None:
        raise OutputError("--verify needs --base-model DIR to load the repaired checkpoint")
    if out_path is not None:
        check_output_target(src, out_path, allow_earlier_batch=True)
    report = Report("fix", src, dry_run, out_path, _plan_all(src, base_model, options))
    single = len(report.checkpoints) == 1
    done = earlier_batch_output(src, out_path) if out_path is not None and not single else set()
    for result in report.checkpoints:
        if result.relative in done and result.status is Status.REPAIRABLE and result.plan is not None:
            result.status, result.output = Status.REPAIRED, out_path / result.relative
            result.plan.after.warn(f"already repaired into {result.output} by an earlier run; skipped")
    if dry_run or out_path is None or not any(c.status is Status.REPAIRABLE for c in report.checkpoints):
        return report

    def verified(result: CheckpointResult, staged: Path) -> bool:
        # every adapter of the checkpoint: the one at its top, and each in a subfolder ("adapters" in the record)
        subfolders = [a.relative for a in result.plan.adapters] if result.plan else []
        places = ([] if result.plan and result.plan.before.weights_file is None else ["."]) + subfolders
        verdicts = {p: _verify(staged / p, base_model, source=result.source / p) for p in places}
        reasons = [f"{p}: {r}" if p != "." else r for p, v in verdicts.items() for r in v.reasons]
        top = verdicts[places[0]].to_dict()  # the top adapter's verdict (else the first subfolder's), "ok" for all
        result.verification = {**top, "ok": not reasons, "adapters": {p: verdicts[p].to_dict() for p in subfolders}}
        if not reasons:
            return True
        message = "verification failed, not published: " + "; ".join(reasons)
        if single:
            raise VerificationFailedError(message, result.source)
        result.status, result.error = Status.VERIFY_FAILED, message
        return False

    write_and_publish(
        report.checkpoints, out_path, single=single, check=verified if verify else None, progress=progress
    )
    return report


def verify(checkpoint: str | Path, base_model: str | Path, *, source: str | Path | None = None) -> VerifyResult:
    """Load ``checkpoint`` onto ``base_model`` with the installed transformers and peft and judge it.

    With ``source`` (the broken original) also compare with the source's own function, computed
    without folding. See :mod:`ckpt_migrate.verify` for every check.

    >>> verify("fixed/checkpoint-500", "bart-base", source="run/checkpoint-500").ok  # doctest: +SKIP
    True
    """
    return _verify(checkpoint, base_model, source=source)


def _verify(checkpoint: str | Path, base_model: str | Path | None, *, source: str | Path | None) -> VerifyResult:
    from ckpt_migrate.verify import verify_checkpoint

    return verify_checkpoint(checkpoint, base_model, source_dir=source)
