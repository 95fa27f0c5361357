"""Run the migration index over one checkpoint to build its plan (no tensor data is read)."""

from __future__ import annotations

from pathlib import Path

from ckpt_migrate.core.migration import Context, ExplainingMigration
from ckpt_migrate.core.plan import CheckpointPlan, Options, Status
from ckpt_migrate.formats.adapter import BIN_WEIGHTS, SAFETENSORS_WEIGHTS
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.formats.checkpoint import load_state

RETRAIN_WARNING = (
    "retraining is preferred: this repair reproduces the trained model exactly, but a run resumed "
    "from it is not identical to an uninterrupted one"
)


def plan_checkpoint(
    directory: Path, relative: str = ".", base_model: BaseModel | None = None, options: Options | None = None
) -> CheckpointPlan:
    """Detect what is wrong with one checkpoint and plan its repair, migration by migration.

    Migrations run in number order; one that a later one makes necessary (0003 drops the optimizer
    state once 0007 changed the trainable parameters) runs in a further pass, until none is left.
    """
    from ckpt_migrate.migrations import MIGRATIONS

    before = load_state(directory)
    after = before.clone()
    context = Context(source=before, base_model=base_model, options=options or Options())
    fails_on = tuple(line for m in MIGRATIONS if isinstance(m, ExplainingMigration) for line in m.failures(before))
    ran: list[str] = []

    def finish(status: Status) -> CheckpointPlan:
        not_needed = tuple(m.ID for m in MIGRATIONS if m.ID not in ran)
        return CheckpointPlan(directory, relative, status, tuple(ran), before, after, not_needed, fails_on)

    pending = list(MIGRATIONS)
    while pending:
        needed = [m for m in pending if m.ID not in after.applied and m.detect(after, context)]
        if not needed:
            break
        migration = needed[0]
        migration.plan(after, context)
        ran.append(migration.ID)
        pending = [m for m in pending if m is not migration and m.ID not in after.applied]
        if after.unrecoverable:
            return finish(Status.UNRECOVERABLE)
    ran.sort(key=[m.ID for m in MIGRATIONS].index)
    if not ran:
        return finish(Status.CLEAN)
    after.applied = before.applied + ran
    if after.weights_file == BIN_WEIGHTS:
        after.drop_file(BIN_WEIGHTS, f"rewritten as {SAFETENSORS_WEIGHTS}")
        after.weights_file = SAFETENSORS_WEIGHTS
    if after.trainable_parameters_changed:
        after.warn(RETRAIN_WARNING)
    return finish(Status.REPAIRABLE)
