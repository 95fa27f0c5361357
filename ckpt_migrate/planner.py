"""Run the migration index over one checkpoint to build its plan (no tensor data is read).

A checkpoint is planned as a whole: the adapter at its top (if any) with the Trainer files, and every adapter in
a subfolder (peft saves each adapter but "default" in a subfolder named after it). The subfolder adapters are
planned first; if any of their trainable parameters changed, so did the checkpoint's, for the Trainer files.
"""

from __future__ import annotations

from pathlib import Path

from ckpt_migrate.core.heads import heads_carrying_tuner_tensors
from ckpt_migrate.core.lora_init import reload_refusal
from ckpt_migrate.core.migration import Context, ExplainingMigration
from ckpt_migrate.core.plan import CheckpointPlan, CheckpointState, Options, Status
from ckpt_migrate.formats.adapter import BIN_WEIGHTS, SAFETENSORS_WEIGHTS
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.formats.checkpoint import load_state, load_subfolder_adapters
from ckpt_migrate.formats.trainer_files import classify

RETRAIN_WARNING = (
    "retraining is preferred: a run resumed from this repair is not identical to an uninterrupted one "
    "(what the repair itself reproduces is under 'reproduces')"
)
LOSSY_RETRAIN_WARNING = (
    "retraining is preferred: this repair is lossy, it does NOT reproduce the trained model (see the losses), "
    "and a run resumed from it is not identical to an uninterrupted one"
)


def _run(
    before: CheckpointState, context: Context, changed_elsewhere: bool = False
) -> tuple[CheckpointState, list[str]]:
    """Plan one adapter (with the files beside it): the state as it will be written and the migrations that ran.

    ``changed_elsewhere``: the trainable parameters of another adapter of the checkpoint changed.
    """
    from ckpt_migrate.migrations import MIGRATIONS

    after = before.clone()
    after.trainable_parameters_changed = changed_elsewhere
    ran: list[str] = []
    # Number order; a migration that a later one makes necessary (0003 drops the optimizer state once 0007
    # changed the trainable parameters) runs in a further pass, until none is left.
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
            return after, ran
        # declared by the migration (the contract): the steps that drop stale state (0003, 0009) detect it
        after.trainable_parameters_changed |= migration.CHANGES_TRAINABLE_PARAMETERS
    for head, names in sorted(heads_carrying_tuner_tensors(after).items()):  # never call such a head clean
        after.unrecoverable.append(
            f"head {head!r} still carries tuner tensors in a layout this tool does not recognise "
            f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); peft cannot load it as trained"
        )
    why = _adapter_refusal(before, after, context.options) if ran and not after.unrecoverable else None
    if why:
        after.unrecoverable.append(why)
    if ran and not after.unrecoverable:
        after.applied = before.applied + ran
        if after.weights_file == BIN_WEIGHTS:
            after.drop_file(BIN_WEIGHTS, f"rewritten as {SAFETENSORS_WEIGHTS}")
            after.weights_file = SAFETENSORS_WEIGHTS
    return after, ran


def _adapter_refusal(before: CheckpointState, after: CheckpointState, options: Options) -> str | None:
    """Why the repaired adapter, loaded by peft as an adapter, would not compute the trained model.

    A head-only adapter (``target_modules=["score"]``) keeps no module to adapt once its head is a plain
    modules_to_save module. Every config peft loads must target a module: writing one would mean inventing a layer
    the run never trained (zero, so the logits would hold, but a resumed run would train it and the adapter would
    claim it), so the checkpoint is refused and ``export`` (which merges, ``merge_into_base``) writes the trained
    model exactly. An init peft cannot redo when it loads (PiSSA with a randomised SVD, ...) is refused too.
    """
    if options.merge_into_base:
        return None
    if after.config.get("target_modules") == [] and before.config.get("target_modules"):
        return (
            f"every target_modules entry of this adapter ({before.config['target_modules']}) is in its head, so once "
            "the head is a plain modules_to_save module no module is left to adapt, and no peft loads such an "
            "adapter (0.12: ValueError: Target modules set() not found in the base model; newest: "
            "NoMatchingPeftModuleError); `ckpt-migrate export` merges it into the base model instead"
        )
    return reload_refusal(after.config)


def _status(after: CheckpointState, ran: list[str]) -> Status:
    return Status.UNRECOVERABLE if after.unrecoverable else Status.REPAIRABLE if ran else Status.CLEAN


def plan_checkpoint(
    directory: Path, relative: str = ".", base_model: BaseModel | None = None, options: Options | None = None
) -> CheckpointPlan:
    """Detect what is wrong with one checkpoint (every adapter in it) and plan its repair, migration by migration."""
    from ckpt_migrate.migrations import MIGRATIONS

    options = options or Options()
    subfolders: list[CheckpointPlan] = []
    for name, sub_before in load_subfolder_adapters(directory).items():
        sub_after, sub_ran = _run(sub_before, Context(source=sub_before, base_model=base_model, options=options))
        subfolders.append(_plan(sub_before, sub_after, sub_ran, directory / name, name))
    before = load_state(directory)
    changed = any(a.after.trainable_parameters_changed for a in subfolders)
    after, ran = _run(before, Context(source=before, base_model=base_model, options=options), changed)
    for sub in subfolders:  # a subfolder's dropped file (its .bin, rewritten as safetensors) is the checkpoint's too
        for file, why in sub.after.dropped_files.items():
            after.drop_file(f"{sub.relative}/{file}", why)
    ran_anywhere = set(ran).union(*(a.migrations for a in subfolders))
    statuses = {_status(after, ran), *(a.status for a in subfolders)}
    status = next(s for s in (Status.UNRECOVERABLE, Status.REPAIRABLE, Status.CLEAN) if s in statuses)
    if status is Status.REPAIRABLE and after.trainable_parameters_changed:
        unknown = [name for name in sorted(after.files) if classify(name, after.weights_file is not None) is None]
        if unknown:
            after.warn(
                f"copied unexamined: {', '.join(unknown)}: files this tool does not know; any of them that holds "
                "optimizer or model state of the trained parameters no longer matches the repaired ones"
            )
        lossy = after.losses or any(a.after.losses for a in subfolders)
        after.warn(LOSSY_RETRAIN_WARNING if lossy else RETRAIN_WARNING)
    fails_on = _failures(before) + [f"adapter {a.relative}: {line}" for a in subfolders for line in a.fails_on]
    return CheckpointPlan(
        directory,
        relative,
        status,
        tuple(m.ID for m in MIGRATIONS if m.ID in ran_anywhere),
        before,
        after,
        tuple(m.ID for m in MIGRATIONS if m.ID not in ran_anywhere),
        tuple(fails_on),
        tuple(subfolders),
    )


def _plan(
    before: CheckpointState, after: CheckpointState, ran: list[str], directory: Path, name: str
) -> CheckpointPlan:
    from ckpt_migrate.migrations import MIGRATIONS

    not_needed = tuple(m.ID for m in MIGRATIONS if m.ID not in ran)
    failures = tuple(_failures(before))
    return CheckpointPlan(directory, name, _status(after, ran), tuple(ran), before, after, not_needed, failures)


def _failures(state: CheckpointState) -> list[str]:
    from ckpt_migrate.migrations import MIGRATIONS

    return [line for m in MIGRATIONS if isinstance(m, ExplainingMigration) for line in m.failures(state)]
