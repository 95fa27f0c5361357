"""Drop (or, with ``--optimizer remap``, rebuild) Trainer's optimizer state once the trainable parameters changed.

After a head moves from LoRA into modules_to_save, ``optimizer.pt`` lists parameter groups of the
old parameter set; Trainer's resume then fails with "loaded state dict contains a parameter group
that doesn't match the size of optimizer's group". By default the file is dropped without being
unpickled. ``remap`` rebuilds it (see :mod:`ckpt_migrate.optimizer_remap`), falling back to ``drop``
with a warning whenever the old parameter layout cannot be proven from shapes.
"""

from __future__ import annotations

from ckpt_migrate.plan import CheckpointState

ID = "0003_drop_stale_optimizer"
SUMMARY = "Drop or remap optimizer.pt, whose parameter groups no longer match the repaired parameters"
CAUSED_BY = "follows 0001/0002: optimizer state saved by transformers.Trainer for the broken parameter set"

OPTIMIZER_FILE = "optimizer.pt"
DROP_WARNING = (
    "optimizer.pt was dropped: a resumed run starts with fresh Adam moments, and Trainer ignores "
    "scheduler.pt without optimizer.pt, so the learning-rate schedule restarts"
)


def detect(state: CheckpointState) -> bool:
    return state.trainable_parameters_changed and OPTIMIZER_FILE in state.files


def plan(state: CheckpointState) -> None:
    if state.options.get("optimizer") == "remap":
        failure = _plan_remap(state)
        if failure is None:
            return
        state.warn(f"--optimizer remap fell back to drop: {failure}")
    state.drop_file(OPTIMIZER_FILE, "parameter groups do not match the repaired trainable parameters")
    state.warn(DROP_WARNING)


def _plan_remap(state: CheckpointState) -> str | None:
    from ckpt_migrate.optimizer_remap import RemapProofFailed, plan_remap

    if state.base_model is None or state.original is None:
        return "the parameter order comes from the base model's config: pass --base-model DIR"
    try:
        rewrite = plan_remap(state.original, state, state.base_model.directory)
    except (RemapProofFailed, OSError, ValueError, KeyError, TypeError) as exc:
        return f"could not prove the old parameter layout ({exc})"
    state.rewrite_file(OPTIMIZER_FILE, rewrite)
    state.warn(
        "optimizer.pt was remapped: Adam moments of unchanged parameters and the learning-rate schedule "
        "continue; the folded head weights start with fresh moments, so a resumed run differs from an "
        "uninterrupted one"
    )
    return None
