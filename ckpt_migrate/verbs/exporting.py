"""The ``export`` pipeline: repair one checkpoint in memory, prove it on the base model, merge it into a standalone
model and publish it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError, VerificationFailedError
from ckpt_migrate.core.options import parse_version
from ckpt_migrate.core.plan import CheckpointPlan, Options, Status
from ckpt_migrate.core.report import CheckpointResult, Report
from ckpt_migrate.formats.checkpoint import find_checkpoints
from ckpt_migrate.formats.hub import resolve
from ckpt_migrate.planner import plan_checkpoint
from ckpt_migrate.progress import label, phase, steps
from ckpt_migrate.verbs.checking import verify_after_proof
from ckpt_migrate.verbs.planning import base_model_of, refuse_misfitting_base, verify_wanted


def export_model(
    src: str | Path,
    out: str | Path | None,
    planning: dict[str, Any],
    *,
    base_model: str | Path | None,
    dtype: str,
    dry_run: bool,
    max_shard_bytes: int,
    progress: bool | None,
    adapter: str | None,
    verify: bool | None = None,
) -> Report:
    """:func:`ckpt_migrate.api.export` (``out`` checked to be given unless ``dry_run``; ``planning``: its planning
    options, as given)."""
    from ckpt_migrate.core.errors import UnrecoverableError
    from ckpt_migrate.execute.export import DTYPE_NAMES, plan_export

    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPE_NAMES)}")
    src = resolve(src, what="SRC")
    out_path = Path(out) if out is not None else None
    relatives = find_checkpoints(src)
    if len(relatives) != 1:
        raise UnreadableInputError(f"export takes one checkpoint; this holds {', '.join(relatives)}", src)
    report = Report("export", src, dry_run, out_path)
    base = base_model_of(src, relatives, base_model, report.notes)
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
        target = parse_version("transformers_version", written_by if isinstance(written_by, str) else None)
    except ValueError:  # no readable release: the installed one, as fix does
        target = None
    options = Options.from_arguments(planning, target_transformers=target, merge_into_base=True)
    repair = plan_checkpoint(src / relatives[0], relatives[0], base, options)
    result = CheckpointResult(relatives[0], src / relatives[0], repair.status, repair)
    report.checkpoints = [result]
    if repair.status is Status.UNRECOVERABLE:
        if not dry_run:  # a base that does not fit the adapter is the reason to give (exit 5), not what follows
            refuse_misfitting_base(repair, base)
        raise UnrecoverableError("; ".join(repair.unrecoverable), result.source)
    merged = chosen_adapter(repair, adapter, report.notes)
    from ckpt_migrate.proof import CAUSE_BASE, planned, prove_adapter, untestable_target

    # before anything is planned to be written: a base that does not fit is named as such (exit 5)
    if dry_run or out_path is None:
        result.proof = planned(base)
    else:  # proven as the installed stack loads it: a plan for another major keeps that major's module names
        installed = merged
        if untestable_target(options.target_transformers) is not None:
            for_installed = replace(options, target_transformers=None)
            replanned = plan_checkpoint(src / relatives[0], relatives[0], base, for_installed)
            installed = chosen_adapter(replanned, adapter, [])
        with phase("static proof: building the model on the meta device", progress):
            result.proof = prove_adapter(installed.after, base, merged=True)
    if result.proof.state == "failed" and result.proof.cause == CAUSE_BASE:
        raise result.proof.error(result.source)
    report.export = plan_export(merged, base, dtype, max_shard_bytes)  # its refusals name what the merge lacks
    if result.proof.state == "failed":
        raise result.proof.error(result.source)
    if dry_run or out_path is None:
        return report
    from ckpt_migrate.execute.export import output_bytes, write_export
    from ckpt_migrate.execute.publish import staged_output
    from ckpt_migrate.progress import Budget, byte_bar

    # each output byte is written, then read back for its sha256; held to that (shard headers are not counted)
    total = 2 * sum(output_bytes(t, report.export.cast_to) for t in report.export.tensors)
    name = label(relatives[0], src)
    check = verify_wanted(verify, base, None, report.notes)
    with staged_output(out_path) as staging:
        with byte_bar(total, f"export {name}", progress) as bar:
            budget = Budget(bar.update, total)
            write_export(report.export, staging, budget)
            budget.finish()
        if check:  # plain transformers on the staged model against the source computed unmerged; publish a pass only
            with steps(f"verify {name}", progress):
                source = result.source if merged is repair else result.source / merged.relative  # its subfolder
                verdict = verify_after_proof(staging, base.directory, source=source)
            verdict.checkpoint = str(out_path)  # the report names the output, not the staging directory
            result.verification = verdict.to_dict()
            if not verdict.ok:
                message = "verification failed, not published: " + "; ".join(verdict.reasons)
                raise VerificationFailedError(message, result.source)
    result.output = out_path
    return report


def chosen_adapter(repair: CheckpointPlan, name: str | None, notes: list[str]) -> CheckpointPlan:
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
