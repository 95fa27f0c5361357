"""Drop the Trainer optimizer state once the trainable parameters changed shape.

After a head moves from LoRA into modules_to_save, ``optimizer.pt`` lists parameter groups of the
old parameter set; Trainer's resume then fails with "loaded state dict contains a parameter group
that doesn't match the size of optimizer's group". The file is dropped without being unpickled.
"""

from __future__ import annotations

from ckpt_migrate.plan import CheckpointState

ID = "0003_drop_stale_optimizer"
SUMMARY = "Drop optimizer.pt, whose parameter groups no longer match the repaired trainable parameters"
CAUSED_BY = "follows 0001/0002: optimizer state saved by transformers.Trainer for the broken parameter set"

OPTIMIZER_FILE = "optimizer.pt"


def detect(state: CheckpointState) -> bool:
    return state.trainable_parameters_changed and OPTIMIZER_FILE in state.files


def plan(state: CheckpointState) -> None:
    state.drop_file(OPTIMIZER_FILE, "parameter groups do not match the repaired trainable parameters")
    state.warn(
        "optimizer.pt was dropped: a resumed run starts with fresh Adam moments, and Trainer ignores "
        "scheduler.pt without optimizer.pt, so the learning-rate schedule restarts"
    )
