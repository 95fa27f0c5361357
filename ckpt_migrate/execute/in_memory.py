"""Repair on load: the repaired adapter built in memory and handed to peft, for people who cannot write files."""

from __future__ import annotations

from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError, UnrecoverableError
from ckpt_migrate.core.plan import CheckpointPlan, Status
from ckpt_migrate.formats.base_model import BaseModel


def load_repaired(plan: CheckpointPlan, base: BaseModel, auto_class_name: str, is_trainable: bool = False) -> Any:
    """A peft model: ``base`` loaded with transformers, the plan's repaired adapter loaded into it by peft.

    The adapter's tensors are computed exactly as ``fix`` writes them (copies, folds), and handed to peft's
    own ``set_peft_model_state_dict``; an adapter tensor peft does not use is an error, not a warning.
    """
    import peft
    from peft.utils import set_peft_model_state_dict

    from ckpt_migrate.execute.derived_buffers import derived_buffer
    from ckpt_migrate.execute.tensors import TensorReader, value

    if plan.status is Status.UNRECOVERABLE:
        raise UnrecoverableError("; ".join(plan.unrecoverable), plan.source)
    if not plan.after.config:
        raise UnreadableInputError("no adapter here: load the checkpoint with transformers directly", plan.source)
    reader = TensorReader.of(plan)
    tensors = {tensor.name: value(reader, tensor) for tensor in plan.after.tensors.values()}
    model, _ = base.load(auto_class_name, seed=0)
    config = peft.PeftConfig.from_peft_type(**plan.after.config)
    config.inference_mode = not is_trainable
    peft_model = peft.get_peft_model(model, config)
    loaded = set_peft_model_state_dict(peft_model, tensors)
    # Buffers this peft derives rather than loads (BOFT's boft_P since peft 0.13) are used when equal.
    unused = [k for k in loaded.unexpected_keys if not derived_buffer(peft_model, k, tensors.get(k))]
    if unused:
        raise UnreadableInputError(f"peft did not use adapter tensors {sorted(unused)[:4]}", plan.source)
    return peft_model if is_trainable else peft_model.eval()
