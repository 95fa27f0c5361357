"""The verbs, each a documented function: ``inspect``, ``fix``, ``verify``, ``list_migrations``.

The CLI is a thin layer over these; none of them imports torch, transformers or peft unless it
computes tensors or loads a model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_migrate.core.errors import (
    CkptMigrateError,
    UnreadableInputError,
    UsageError,
    VerificationFailedError,
)
from ckpt_migrate.core.migration import Migration
from ckpt_migrate.core.plan import CheckpointPlan, Options, Status
from ckpt_migrate.core.report import CheckpointResult, Report
from ckpt_migrate.formats.adapter import ADAPTER_CONFIG
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.formats.checkpoint import find_checkpoints
from ckpt_migrate.formats.digests import Hashes
from ckpt_migrate.formats.hub import resolve, resolve_cached, resolve_model
from ckpt_migrate.planner import plan_checkpoint
from ckpt_migrate.progress import label, phase

if TYPE_CHECKING:
    from ckpt_migrate.verification import VerifyResult

__all__ = ["CheckpointResult", "Report", "export", "fix", "inspect", "list_migrations", "load", "verify"]


def list_migrations() -> list[Migration]:
    """The known migrations, in the order they run.

    >>> [m.ID for m in list_migrations()][0]
    '0001_fold_double_wrapped_head'
    """
    from ckpt_migrate.migrations import MIGRATIONS

    return list(MIGRATIONS)


def _base_model(src: Path, relatives: list[str], base_model: str | Path | None, notes: list[str]) -> BaseModel | None:
    """``--base-model`` (a path or a Hub id), else the adapter's ``base_model_name_or_path`` if it is at hand."""
    if base_model is not None:
        return BaseModel.open(resolve_model(base_model))
    for relative in relatives:
        config = src / relative / ADAPTER_CONFIG
        try:
            name = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue  # planning reports the unreadable config
        found = resolve_cached(name)
        if found is not None and BaseModel(found).has_safetensors():
            notes.append(f"--base-model not given: using {name!r} from {config.name} ({found})")
            return BaseModel.open(found)
        return None
    return None


def _plan_all(
    src: Path, base_model: str | Path | None, options: Options, notes: list[str]
) -> tuple[list[CheckpointResult], BaseModel | None]:
    """Every checkpoint's plan, each with the static proof it will get (no torch), and the base model used."""
    from ckpt_migrate.proof import planned

    relatives = find_checkpoints(src)
    base = _base_model(src, relatives, base_model, notes)
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
        proof = planned(base, options.target_transformers) if plan.status is Status.REPAIRABLE else None
        results.append(CheckpointResult(relative, directory, plan.status, plan, error=error, proof=proof))
    return results, base


def inspect(
    src: str | Path,
    *,
    base_model: str | Path | None = None,
    optimizer: str = "drop",
    target_transformers: str | None = None,
    target_peft: str | None = None,
    allow_lossy: bool = False,
    progress: bool | None = None,
) -> Report:
    """Say what each checkpoint at ``src`` is, what is wrong with it, and the repair plan.

    Reads only ``adapter_config.json``, file sizes and safetensors headers (a ``.bin`` adapter is
    loaded with ``torch.load(weights_only=True)``). ``progress``: name a planning phase that takes over a second on
    stderr (``None``: when it is a terminal).

    >>> inspect("run/checkpoint-500").exit_code  # doctest: +SKIP
    3
    """
    from ckpt_migrate.remote import as_local, wants_fleet

    src, base_model = as_local(src), as_local(base_model)
    if wants_fleet(src, base_model):  # a URL: the planner on a sparse local mirror (headers only)
        from ckpt_migrate.remote.fleet import inspect as inspect_remote

        choices = {"optimizer": optimizer, "target_transformers": target_transformers, "target_peft": target_peft}
        return inspect_remote(str(src), base_model=base_model, allow_lossy=allow_lossy, **choices)
    options = Options.parse(optimizer, target_transformers, target_peft, allow_lossy)
    src = resolve(src, what="SRC")
    report = Report("inspect", src, dry_run=True)
    with phase(f"planning {src.name or src} (headers only)", progress):
        report.checkpoints, base = _plan_all(src, base_model, options, report.notes)
    report.base_model = base.directory if base is not None else None
    return report


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
    verify: bool | None = None,
    allow_lossy: bool = False,
    executor: str = "local",
) -> Report:
    """Repair every broken checkpoint at ``src`` into ``out`` (mirroring a run directory's layout).

    With ``dry_run`` nothing is written and the report predicts exactly what a real run writes.
    Clean checkpoints are not written. ``progress`` shows a byte counter on stderr (``None``: only
    when stderr is a terminal). ``optimizer``: ``"drop"`` the stale ``optimizer.pt`` (default) or
    ``"remap"`` it onto the repaired parameters (needs ``base_model`` for the parameter order).
    ``target_transformers`` / ``target_peft``: the releases that will resume the checkpoint
    (default: the installed ones). Before anything is published, each output gets the static proof
    (:mod:`ckpt_migrate.proof`) on the base model, when one is at hand; a failed proof refuses the checkpoint
    (exit 4, or 5 when the base does not fit the adapter). ``verify`` runs :func:`verify` on each staged checkpoint
    against its source and publishes only those that pass (needs a base model; ``None``: when the base's weights
    are at most ``proof.AUTO_VERIFY_MAX_BYTES``). ``allow_lossy``: write the best repair of a
    checkpoint that lost trained values (refused by default), recording the loss in the report and the manifest.
    ``src``, ``out`` and ``base_model`` may be URLs (``s3://``...); ``executor``: ``"local"``, ``"dask"`` or
    ``"dask://HOST:PORT"`` (one task per checkpoint, see :mod:`ckpt_migrate.remote.fleet`).

    >>> fix("run", "run-fixed", base_model="bart-base").exit_code  # doctest: +SKIP
    0
    """
    from ckpt_migrate.remote import as_local, wants_fleet

    src, out, base_model = as_local(src), as_local(out), as_local(base_model)
    if wants_fleet(src, out, base_model, executor=executor):
        from ckpt_migrate.remote.fleet import fix as fix_fleet

        choices = {"optimizer": optimizer, "target_transformers": target_transformers, "target_peft": target_peft}
        return fix_fleet(
            str(src), None if out is None else str(out), base_model=base_model, dry_run=dry_run, progress=progress,
            executor=executor, verify=verify, allow_lossy=allow_lossy, **choices,
        )  # fmt: skip
    from ckpt_migrate.execute.publish import check_output_target
    from ckpt_migrate.execute.write import deferring_proofs, hash_ahead

    options = Options.parse(optimizer, target_transformers, target_peft, allow_lossy)
    src = resolve(src, what="SRC")
    out_path = Path(out) if out is not None else None
    if out_path is None and not dry_run:
        raise UsageError("--out is required unless --dry-run is given")
    if out_path is not None:
        check_output_target(src, out_path, allow_earlier_batch=True)
    hashes = Hashes() if not dry_run else None
    try:
        if hashes is not None:
            hash_ahead(src, options, hashes)
        report = Report("fix", src, dry_run, out_path)
        with phase(f"planning {src.name or src} (headers only)", progress), deferring_proofs(not dry_run):
            report.checkpoints, base = _plan_all(src, base_model, options, report.notes)
        report.base_model = base.directory if base is not None else None
        if verify and base is None:  # asked for, and no base at hand: the command line is incomplete
            raise UsageError(
                "--verify needs a base model: pass --base-model DIR (the adapter's base_model_name_or_path is not "
                "at hand)"
            )
        wanted = _verify_wanted(verify, base, options.target_transformers, report.notes)
        _write_all(report, out_path, base, wanted, progress, hashes, options.target_transformers)
    finally:
        if hashes is not None:
            hashes.close()
    return report


VERIFY_PHASE = "loading it on the base model twice (two seeds), and the source unmerged"


def _verify_wanted(verify: bool | None, base: BaseModel | None, target: str | None, notes: list[str]) -> bool:
    """``verify`` as asked; unasked (None), whenever the base is small enough to load quickly and the output is
    for the installed transformers' major (``verify`` loads it with the installed stack)."""
    from ckpt_migrate.proof import AUTO_VERIFY_MAX_BYTES, base_weights_bytes, untestable_target

    if verify is not None or base is None:
        return bool(verify)
    if untestable_target(target) is not None:
        notes.append(f"not verified numerically: {untestable_target(target)}")
        return False
    size = base_weights_bytes(base)
    if size <= AUTO_VERIFY_MAX_BYTES:
        return True
    notes.append(
        f"not verified numerically: the base's weights ({size / 1e9:.1f} GB) exceed {AUTO_VERIFY_MAX_BYTES / 1e9:g} "
        "GB (pass --verify to load it anyway)"
    )
    return False


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
    from ckpt_migrate.execute.write import settle_unwritten

    src, dry_run = report.source, report.dry_run
    single = len(report.checkpoints) == 1
    done = earlier_batch_output(src, out_path) if out_path is not None and not single else set()
    for result in report.checkpoints:
        if result.relative in done and result.status is Status.REPAIRABLE and result.plan is not None:
            result.status, result.output = Status.REPAIRED, out_path / result.relative
            result.plan.after.warn(f"already repaired into {result.output} by an earlier run; skipped")
            settle_unwritten(result.plan)
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
            with phase(f"verify {what}: {VERIFY_PHASE}", progress):
                verdicts[place] = _verify(staged / place, base.directory, source=result.source / place)
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
        return {r.relative: pool.submit(_after_remap_proof, prove_plan, r.plan, base) for r in to_write}
    finally:
        pool.shutdown(wait=False)


def _after_remap_proof(prove: Any, plan: CheckpointPlan, base: BaseModel) -> Any:
    from ckpt_migrate.execute.write import proofs_done

    proofs_done(plan)  # a remap proven while writing imports what the static proof imports: not both at once
    return prove(plan, base)


def _chosen_adapter(repair: CheckpointPlan, name: str | None, notes: list[str]) -> CheckpointPlan:
    """The plan of the adapter to merge: ``name`` (a subfolder adapter, or "default" at the top), else the top
    one, else the only one; the others are named in a note."""
    plans = ({"default": repair} if repair.before.weights_file else {}) | {
        a.relative.strip("/"): a for a in repair.adapters
    }
    if not plans:
        raise UnreadableInputError(
            "export merges an adapter, and this checkpoint has none (adapter_config.json): a full model loads "
            "with transformers as it is",
            repair.source,
        )
    if name is None and len(plans) > 1 and "default" not in plans:
        raise UnreadableInputError(f"the checkpoint holds adapters {', '.join(sorted(plans))}: pass --adapter NAME")
    chosen = name or ("default" if "default" in plans else next(iter(plans), None))
    if chosen not in plans:
        held = ", ".join(sorted(plans)) or "none"
        raise UnreadableInputError(f"no adapter {chosen!r} in the checkpoint (it holds: {held})", repair.source)
    others = sorted(set(plans) - {chosen})
    if others:
        notes.append(f"merged adapter {chosen!r}; the checkpoint also holds {', '.join(others)} (--adapter NAME)")
    return plans[chosen]


def export(
    src: str | Path,
    out: str | Path | None = None,
    *,
    base_model: str | Path | None = None,
    dtype: str = "auto",
    dry_run: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    progress: bool | None = None,
    adapter: str | None = None,
    allow_lossy: bool = False,
) -> Report:
    """Write a standalone model: ``base_model`` with every adapter delta of ``src`` folded in and its repaired head.

    ``src`` (a checkpoint, broken or repaired; a path or a Hub id) is repaired in memory by the same
    migrations as ``fix``, with the same refusals. Plain transformers loads the result with the Auto
    class of its ``config.json`` (the base's, with the head class the adapter was trained for).
    ``dtype``: ``"auto"`` (the base's) or ``float32``/``bfloat16``/``float16``. ``adapter``: which adapter of a
    checkpoint holding several (peft's subfolder name; default: the one at the top, else the only one).
    ``allow_lossy``: as for ``fix``, merge the best repair of a checkpoint that lost trained values, recording the loss.

    >>> export("run/checkpoint-500", "merged", base_model="acme/tiny-llama").exit_code  # doctest: +SKIP
    0
    """
    from ckpt_migrate.core.errors import UnrecoverableError
    from ckpt_migrate.execute.export import DTYPE_NAMES, plan_export

    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPE_NAMES)}")
    src = resolve(src, what="SRC")
    out_path = Path(out) if out is not None else None
    if out_path is None and not dry_run:
        raise UsageError("--out is required unless --dry-run is given")
    relatives = find_checkpoints(src)
    if len(relatives) != 1:
        raise UnreadableInputError(f"export takes one checkpoint; this holds {', '.join(relatives)}", src)
    report = Report("export", src, dry_run, out_path)
    base = _base_model(src, relatives, base_model, report.notes)
    if base is None:
        raise UnreadableInputError("export needs --base-model (the adapter's base_model_name_or_path is not at hand)")
    report.base_model = base.directory
    if out_path is not None:
        from ckpt_migrate.execute.publish import check_output_target

        check_output_target(src, out_path)
    # The deltas merge into the base checkpoint's own tensor names: module renames (0012) target the transformers
    # release that wrote it, not the installed one (transformers converts the merged model's names on load).
    # merge_into_base: an adapter peft would refuse to load (a head-only one) is fine to merge.
    written_by = base.config().get("transformers_version")
    try:
        target = Options.parse("drop", written_by if isinstance(written_by, str) else None, None).target_transformers
    except ValueError:  # no readable release: the installed one, as fix does
        target = None
    options = Options(target_transformers=target, allow_lossy=allow_lossy, merge_into_base=True)
    repair = plan_checkpoint(src / relatives[0], relatives[0], base, options)
    result = CheckpointResult(relatives[0], src / relatives[0], repair.status, repair)
    report.checkpoints = [result]
    if repair.status is Status.UNRECOVERABLE:
        if not dry_run:  # a base that does not fit the adapter is the reason to give (exit 5), not what follows
            _refuse_misfitting_base(repair, base)
        raise UnrecoverableError("; ".join(repair.unrecoverable), result.source)
    chosen = _chosen_adapter(repair, adapter, report.notes)
    from ckpt_migrate.proof import CAUSE_BASE, planned, prove_adapter, untestable_target

    # before anything is planned to be written: a base that does not fit is named as such (exit 5)
    if dry_run or out_path is None:
        result.proof = planned(base)
    else:  # proven as the installed stack loads it: a plan for another major keeps that major's module names
        installed = chosen
        if untestable_target(options.target_transformers) is not None:
            for_installed = replace(options, target_transformers=None)
            replanned = plan_checkpoint(src / relatives[0], relatives[0], base, for_installed)
            installed = _chosen_adapter(replanned, adapter, [])
        with phase("static proof: building the model on the meta device", progress):
            result.proof = prove_adapter(installed.after, base, merged=True)
    if result.proof.state == "failed" and result.proof.cause == CAUSE_BASE:
        raise result.proof.error(result.source)
    report.export = plan_export(chosen, base, dtype, max_shard_bytes)  # its refusals name what the merge lacks
    if result.proof.state == "failed":
        raise result.proof.error(result.source)
    if dry_run or out_path is None:
        return report
    from ckpt_migrate.execute.export import output_bytes, write_export
    from ckpt_migrate.execute.publish import staged_output
    from ckpt_migrate.progress import Budget, byte_bar

    # each output byte is written, then read back for its sha256; held to that (shard headers are not counted)
    total = 2 * sum(output_bytes(t, report.export.cast_to) for t in report.export.tensors)
    bar = byte_bar(total, f"export {label(relatives[0], src)}", progress)
    with bar, staged_output(out_path) as staging:
        budget = Budget(bar.update, total)
        write_export(report.export, staging, budget)
        budget.finish()
    result.output = out_path
    return report


RETRAIN_ON_LOAD = (
    "ckpt-migrate: retraining is preferred: this model was repaired in memory, and training on from it starts "
    "with fresh optimizer state, so the run is not identical to an uninterrupted one"
)


def load(base_model: str | Path, checkpoint: str | Path, *, is_trainable: bool = False) -> Any:
    """The peft model of ``checkpoint`` on ``base_model`` with the repair applied in memory; nothing is written.

    Refuses what ``fix`` refuses (a LoRA-only head whose base weights are not in ``base_model``, …). The
    transformers Auto class comes from the base's ``architectures``, else its ``model_type`` and the adapter's
    ``task_type`` (or, without one, the top-level modules its tensors use).

    >>> model = load("acme/tiny-llama", "run/checkpoint-500")  # doctest: +SKIP
    >>> model(input_ids=ids).logits  # the trained model's logits  # doctest: +SKIP
    """
    from ckpt_migrate.execute.in_memory import load_repaired
    from ckpt_migrate.verification import choose_auto_class

    base = BaseModel.open(resolve_model(base_model))
    src = resolve(checkpoint, what="checkpoint")
    relatives = find_checkpoints(src)
    if len(relatives) != 1:
        raise UnreadableInputError(f"load takes one checkpoint; this holds {', '.join(relatives)}", src)
    plan = plan_checkpoint(src / relatives[0], relatives[0], base, Options())
    if plan.status is Status.UNRECOVERABLE:
        _refuse_misfitting_base(plan, base)
    elif plan.after.config:
        from ckpt_migrate.proof import prove_plan

        proof = prove_plan(plan, base)
        if proof.state == "failed":
            raise proof.error(plan.source)
    auto_class = choose_auto_class(base.config(), plan.after.config, base.directory / "config.json", plan.after.tensors)
    if is_trainable and plan.status is Status.REPAIRABLE:
        import warnings

        warnings.warn(RETRAIN_ON_LOAD, UserWarning, stacklevel=2)
    return load_repaired(plan, base, auto_class, is_trainable)


def _refuse_misfitting_base(plan: CheckpointPlan, base: BaseModel) -> None:
    """Exit 5 when the source adapter's own tensors do not fit the base (another architecture or size)."""
    from ckpt_migrate.proof import CAUSE_BASE, prove_adapter

    for state in [plan.before] * bool(plan.before.weights_file) + [a.before for a in plan.adapters]:
        proof = prove_adapter(state, base)
        if proof.state == "failed" and proof.cause == CAUSE_BASE:
            raise proof.error(plan.source)


def verify(
    checkpoint: str | Path, base_model: str | Path, *, source: str | Path | None = None, progress: bool | None = None
) -> VerifyResult:
    """Load ``checkpoint`` onto ``base_model`` with the installed transformers and peft and judge it.

    With ``source`` (the broken original) also compare with the source's own function, computed
    without folding. See :mod:`ckpt_migrate.verification` for every check.

    >>> verify("fixed/checkpoint-500", "bart-base", source="run/checkpoint-500").ok  # doctest: +SKIP
    True
    """
    with phase(f"verify {Path(checkpoint).name}: {VERIFY_PHASE}", progress):
        return _verify(checkpoint, base_model, source=source)


def _verify(checkpoint: str | Path, base_model: str | Path | None, *, source: str | Path | None) -> VerifyResult:
    """``verify``, after the static proof: a base that does not fit the adapter is exit 5, any other failed proof
    a reason of the verdict (exit 8)."""
    from ckpt_migrate.formats.checkpoint import load_state
    from ckpt_migrate.proof import CAUSE_BASE, prove_adapter
    from ckpt_migrate.verification import verify_checkpoint

    proof = None
    directory = Path(checkpoint)
    base = BaseModel(resolve_model(base_model)) if base_model is not None else None
    if base is not None and base.has_safetensors() and (directory / ADAPTER_CONFIG).is_file():
        proof = prove_adapter(load_state(directory), base)
        if proof.state == "failed" and proof.cause == CAUSE_BASE:
            raise proof.error(directory, "the static proof failed")
    verdict = verify_checkpoint(checkpoint, base_model, source_dir=source)
    if proof is not None and proof.state == "failed":
        verdict.reasons.insert(0, f"static proof: {proof.reason}")
        verdict.ok = False
    return verdict
