"""The verbs' steps shared by ``inspect``, ``fix``, ``export`` and ``load``: which base model, every checkpoint's plan,
and the refusal of a base that does not fit the adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import CkptMigrateError
from ckpt_migrate.core.plan import CheckpointPlan, Options, Status
from ckpt_migrate.core.report import CheckpointResult
from ckpt_migrate.formats.adapter import ADAPTER_CONFIG
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.formats.checkpoint import find_checkpoints
from ckpt_migrate.formats.hub import resolve_cached, resolve_model
from ckpt_migrate.planner import plan_checkpoint


def base_model_of(src: Path, relatives: list[str], base_model: str | Path | None, notes: list[str]) -> BaseModel | None:
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


def plan_all(
    src: Path, base_model: str | Path | None, options: Options, notes: list[str]
) -> tuple[list[CheckpointResult], BaseModel | None]:
    """Every checkpoint's plan, each with the static proof it will get (no torch), and the base model used."""
    from ckpt_migrate.proof import planned

    relatives = find_checkpoints(src)
    base = base_model_of(src, relatives, base_model, notes)
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


def refuse_misfitting_base(plan: CheckpointPlan, base: BaseModel) -> None:
    """Exit 5 when the source adapter's own tensors do not fit the base (another architecture or size)."""
    from ckpt_migrate.proof import CAUSE_BASE, prove_adapter

    for state in [plan.before] * bool(plan.before.weights_file) + [a.before for a in plan.adapters]:
        proof = prove_adapter(state, base)
        if proof.state == "failed" and proof.cause == CAUSE_BASE:
            raise proof.error(plan.source)


def verify_wanted(verify: bool | None, base: BaseModel | None, target: str | None, notes: list[str]) -> bool:
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


def published_earlier(result: CheckpointResult, output: Any, published: Path, base: BaseModel | None) -> None:
    """Report ``result`` as an earlier run's output at ``output`` (its files at ``published``, headers enough): repaired
    only once those files pass the static proof now, else written, not proven; nothing is written."""
    from ckpt_migrate.proof import prove_published

    result.output = output
    result.proof = prove_published(published, base)
    result.status = Status.REPAIRED if result.proof.passed else Status.WRITTEN
    done = "repaired" if result.proof.passed else "written"
    result.plan.after.warn(f"already {done} into {output} by an earlier run; skipped")
