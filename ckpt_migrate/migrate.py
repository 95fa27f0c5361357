"""Run the migration index over one checkpoint to build its plan (no tensor data is read)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ckpt_migrate.checkpoint import BIN_WEIGHTS, SAFETENSORS_WEIGHTS, load_state
from ckpt_migrate.plan import CheckpointPlan, CheckpointState

RETRAIN_WARNING = (
    "retraining is preferred: this repair reproduces the trained model exactly, but a run resumed "
    "from it is not identical to an uninterrupted one"
)


@dataclass(frozen=True)
class Migration:
    id: str
    summary: str
    caused_by: str
    detect: Callable[[CheckpointState], bool]
    plan: Callable[[CheckpointState], None]


def _from_module(module: ModuleType) -> Migration:
    return Migration(module.ID, module.SUMMARY, module.CAUSED_BY, module.detect, module.plan)


def known_migrations() -> list[Migration]:
    """The migration index, in the order migrations run."""
    from ckpt_migrate.migrations import MIGRATIONS

    return [_from_module(module) for module in MIGRATIONS]


def plan_checkpoint(
    directory: Path, relative: str = ".", base_model: object = None, options: dict[str, Any] | None = None
) -> CheckpointPlan:
    """Detect what is wrong with one checkpoint and plan its repair.

    ``options``: ``{"optimizer": "drop" | "remap"}`` (default drop).
    """
    before = load_state(directory)
    before.options = dict(options or {})
    after = before.clone()
    after.base_model = before.base_model = base_model
    after.original = before
    ran: list[str] = []
    for migration in known_migrations():
        if migration.id in after.applied or not migration.detect(after):
            continue
        migration.plan(after)
        ran.append(migration.id)
        if after.unrecoverable:
            return CheckpointPlan(directory, relative, "unrecoverable", ran, before, after)
    if not ran:
        return CheckpointPlan(directory, relative, "clean", [], before, after)
    after.applied = before.applied + ran
    if after.weights_file == BIN_WEIGHTS:
        after.drop_file(BIN_WEIGHTS, f"rewritten as {SAFETENSORS_WEIGHTS}")
        after.weights_file = SAFETENSORS_WEIGHTS
    if after.trainable_parameters_changed:
        after.warn(RETRAIN_WARNING)
    return CheckpointPlan(directory, relative, "repairable", ran, before, after)
