"""Fold the LoRA of a head that peft wrapped with LoRA *and* modules_to_save into a plain saved head.

peft <= 0.12 with ``target_modules="all-linear"`` on a sequence/token classification model injected
LoRA into the head, then wrapped the LoRA-wrapped head in a ModulesToSaveWrapper. The trained copy is
saved as ``<head>.base_layer.*`` plus ``<head>.lora_A/B``; ``original_module`` and ``modules_to_save``
LoRA duplicates ride along. The effective weight is folded exactly: ``W + s * B @ A`` (DoRA: rescaled
rows), written as ``<head>.weight`` the way current peft saves a modules_to_save module.

A second adapter's file (``task_b/``, added with ``add_adapter``) holds its own head copy: ``<head>.base_layer.*``,
trained, and the LoRA that copy inherited from the first adapter, saved under that adapter's name
(``<head>.lora_A.default.weight``). peft's ``set_adapter`` makes every LoRA layer, those inside head copies too,
run the active adapter only, so that LoRA never computed anything for task_b: it is dropped and the copy's base
layer becomes ``<head>.weight`` as it is.
"""

from __future__ import annotations

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.heads import (
    lora_modules,
    move_heads_to_modules_to_save,
    plan_fold,
    replant_head,
    wrapped_heads,
)
from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.peft_layout import PREFIX, parse_lora_key
from ckpt_migrate.core.plan import CheckpointState, PlannedTensor

ID = "0001_fold_double_wrapped_head"
SUMMARY = "Fold a head wrapped by both LoRA and modules_to_save into a plain modules_to_save head"
CAUSED_BY = "peft <= 0.12.0, all-linear on SEQ_CLS/TOKEN_CLS (huggingface/peft#2027; fixed in 0.13.0 by #2028, #2033)"
#: The head's tuner tensors become a plain modules_to_save head: what is trained, and its names, change.
CHANGES_TRAINABLE_PARAMETERS = True


def detect(state: CheckpointState, context: Context) -> bool:
    return bool(wrapped_heads(state))


def plan(state: CheckpointState, context: Context) -> None:
    heads = wrapped_heads(state)
    head_modules: set[str] = set()
    for head in sorted(heads):
        folded = lora_modules(state, under=head)
        head_modules |= set(folded)
        new_tensors: list[PlannedTensor] = []
        for module, parts in sorted(folded.items()):
            weight_name = f"{PREFIX}{module}.base_layer.weight"
            if weight_name not in state.tensors:
                raise UnreadableInputError(
                    f"head {head!r} is wrapped twice but its trained weight {weight_name} is missing",
                    state.source_dir / state.weights_file,
                )
            new_tensors.append(plan_fold(state, module, parts, state.tensors[weight_name]))
        computed = {f"{module}.weight" for module in folded}
        new_tensors += replant_head(state, head, computed, lambda name: parse_lora_key(name) is not None)
        for tensor in new_tensors:
            state.add_tensor(tensor)
    move_heads_to_modules_to_save(state, heads, head_modules)


def failures(state: CheckpointState) -> list[str]:
    lines = []
    for head in sorted(wrapped_heads(state)):
        first = min(lora_modules(state, under=head), default=head)
        lines.append(
            f"peft >= 0.13: the adapter does not load (KeyError: '{PREFIX}{first}.weight'; DistilBERT-like heads: "
            "TypeError: modules_to_save cannot be applied to modules of type <class 'peft.tuners.lora.layer.Linear'>)"
        )
        # peft 0.8-0.10 saved "modules_to_save": null for SEQ_CLS; such configs reload as trained in 0.8-0.12.
        if state.config.get("modules_to_save"):
            lines.append(
                f"peft 0.8 to 0.12: loads, but the trained head {head!r} is silently replaced: the logits change"
            )
    return lines
