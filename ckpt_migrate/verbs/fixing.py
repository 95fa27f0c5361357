"""The ``fix`` pipeline on local paths: plan every checkpoint (headers only), write each into staging while its static
proof runs, verify it when wanted, publish what passed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError, UsageError, VerificationFailedError
from ckpt_migrate.core.plan import Options, Status
from ckpt_migrate.core.report import CheckpointResult, Report
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.formats.digests import Hashes
from ckpt_migrate.formats.hub import resolve
from ckpt_migrate.progress import label, phase, steps
from ckpt_migrate.verbs.checking import verify_after_proof
from ckpt_migrate.verbs.planning import plan_all, published_earlier, verify_wanted


def fix_local(
    src: str | Path,
    out: str | Path | None,
    options: Options,
    *,
    base_model: str | Path | None,
    dry_run: bool,
    progress: bool | None,
    verify: bool | None,
) -> Report:
    """:func:`ckpt_migrate.api.fix` of local paths (``out`` checked to be given unless ``dry_run``)."""
    from ckpt_migrate.execute.publish import check_output_target
    from ckpt_migrate.execute.write import hash_ahead

    src = resolve(src, what="SRC")
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_output_target(src, out_path, allow_earlier_batch=True)
    hashes = Hashes() if not dry_run else None
    try:
        if hashes is not None:
            hash_ahead(src, options, hashes)
        report = Report("fix", src, dry_run, out_path)
        with phase(f"planning {src.name or src} (headers only)", progress):
            report.checkpoints, base = plan_all(src, base_model, options, report.notes)
        report.base_model = base.directory if base is not None else None
        if verify and base is None:  # asked for, and no base at hand: the command line is incomplete
            raise UsageError(
                "--verify needs a base model: pass --base-model DIR (the adapter's base_model_name_or_path is not "
                "at hand)"
            )
        wanted = verify_wanted(verify, base, options.target_transformers, report.notes)
        _write_all(report, out_path, base, wanted, progress, hashes, options.target_transformers)
    finally:
        if hashes is not None:
            hashes.close()
    return report


def _write_all(
    report: Report,
    out_path: Path | None,
    base: BaseModel | None,
    verify: bool,
    progress: bool | None,
    hashes: Hashes | None,
    target_transformers: str | None = None,
) -> None:
    from ckpt_migrate.execute.publish import earlier_batch_output, write_and_publish

    src, dry_run = report.source, report.dry_run
    single = len(report.checkpoints) == 1
    done = earlier_batch_output(src, out_path) if out_path is not None and not single else set()
    for result in report.checkpoints:
        if result.relative in done and result.status is Status.REPAIRABLE and result.plan is not None:
            published_earlier(result, out_path / result.relative, out_path / result.relative, base)
        if hashes is not None and result.status is not Status.REPAIRABLE:
            hashes.forget_under(result.source)
    if dry_run or out_path is None or not any(c.status is Status.REPAIRABLE for c in report.checkpoints):
        return

    proofs = _start_proofs(report.checkpoints, base, progress, target_transformers)

    def checked(result: CheckpointResult, staged: Path) -> bool:
        """The static proof (it ran while the checkpoint was written), then ``verify`` when wanted."""
        name = label(result.relative, result.source)
        with phase(f"static proof of {name}: building the model on the meta device", progress):
            result.proof = proofs[result.relative].result()
        if result.proof.state == "failed":
            error = result.proof.error(result.source)
            if single:
                raise error
            status = Status.UNREADABLE if isinstance(error, UnreadableInputError) else Status.UNRECOVERABLE
            result.status, result.error = status, str(error.message)
            return False
        return not verify or verified(result, staged)

    def verified(result: CheckpointResult, staged: Path) -> bool:
        # every adapter of the checkpoint: the one at its top, and each in a subfolder ("adapters" in the record)
        subfolders = [a.relative for a in result.plan.adapters] if result.plan else []
        places = ([] if result.plan and result.plan.before.weights_file is None else ["."]) + subfolders
        verdicts = {}
        for place in places:
            what = label(result.relative, result.source) + ("" if place == "." else f"/{place}")
            with steps(f"verify {what}", progress):
                verdicts[place] = verify_after_proof(staged / place, base.directory, source=result.source / place)
        for place, verdict in verdicts.items():  # the report names the output, not the staging directory
            verdict.checkpoint = str(out_path / result.relative / place if place != "." else out_path / result.relative)
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

    try:
        write_and_publish(report.checkpoints, out_path, single=single, check=checked, progress=progress, hashes=hashes)
    finally:
        for future in proofs.values():
            future.cancel()
    for result in report.checkpoints:  # "repaired" only where the static proof passed
        if result.status is Status.REPAIRED and not (result.proof and result.proof.passed):
            result.status = Status.WRITTEN


def _start_proofs(
    results: list[CheckpointResult],
    base: BaseModel | None,
    progress: bool | None = None,
    target_transformers: str | None = None,
) -> dict[str, Any]:
    """The static proof of each checkpoint to write, started on a thread: it overlaps the copies (the kernel's,
    outside the GIL), and its verdict is awaited before that checkpoint is published."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from ckpt_migrate.proof import import_before_writing, not_run, prove_plan, untestable_target

    to_write = [r for r in results if r.status is Status.REPAIRABLE and r.plan is not None]
    why_not = "no base model at hand (pass --base-model)" if base is None else untestable_target(target_transformers)
    if why_not is not None:
        done: dict[str, Any] = {}
        for result in to_write:
            done[result.relative] = Future()
            done[result.relative].set_result(not_run(why_not))
        return done
    with phase("importing torch, transformers and peft", progress):
        import_before_writing([r.plan for r in to_write if r.plan is not None])
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="static proof")
    try:
        return {r.relative: pool.submit(prove_plan, r.plan, base) for r in to_write}
    finally:
        pool.shutdown(wait=False)
