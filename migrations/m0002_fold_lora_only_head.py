"""Fold a head that carries LoRA but was never saved whole, using the base model's head weights.

A head LoRA-wrapped without being in modules_to_save (BART/T5 ``classification_head``, a config
without ``task_type``, an explicit target list hitting the head) trains only ``lora_A/B``; the head's
base weights were randomly initialised and exist only where the user saved them. With
``--base-model`` holding those weights, the head is rebuilt exactly; without them it cannot be.

An init that rewrote the targeted weights before training (PiSSA, OLoRA: ``W - s * B0 @ A0``) rewrote the head's
too: its weight is then merged by peft's own LoRA layer, which replays that init on the base model's weight first
(:func:`ckpt_migrate.migrations._tuner_fold.replayed_lora_weight`); an init that cannot be replayed is refused.
"""

from __future__ import annotations

from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.heads import lora_modules, move_heads_to_modules_to_save, plan_fold, wrapped_heads
from ckpt_migrate.core.lora_init import is_replayed, replay_refusal
from ckpt_migrate.core.migration import Context, TensorSource
from ckpt_migrate.core.peft_layout import PREFIX, head_root
from ckpt_migrate.core.plan import CheckpointState, PlannedTensor
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.migrations._tuner_fold import replay_unsupported, replayed_lora_weight

ID = "0002_fold_lora_only_head"
SUMMARY = "Rebuild a LoRA-only head (base weights never saved) from --base-model into modules_to_save"
CAUSED_BY = (
    "any peft: heads peft does not know (classification_head) or no task_type (huggingface/peft#2027 follow-ups)"
)
#: The head's tuner tensors become a plain modules_to_save head: what is trained, and its names, change.
CHANGES_TRAINABLE_PARAMETERS = True

RETRAIN = "retrain with the head listed in modules_to_save (and not in target_modules)"


def _lora_heads(state: CheckpointState) -> dict[str, list[str]]:
    """Heads carrying LoRA outside any modules_to_save wrapper (double-wrapped heads are 0001's)."""
    heads: dict[str, list[str]] = {}
    wrapped = wrapped_heads(state)
    for module in lora_modules(state):
        root = head_root(module)
        if root is not None and root not in wrapped:
            heads.setdefault(root, []).append(module)
    return heads


def detect(state: CheckpointState, context: Context) -> bool:
    return bool(_lora_heads(state))


def plan(state: CheckpointState, context: Context) -> None:
    heads = _lora_heads(state)
    base = context.base_model
    names = ", ".join(sorted(heads))
    if base is None:
        state.unrecoverable.append(
            f"head {names} carries LoRA but its base weights were never saved in the adapter; "
            "pass --base-model DIR with the head weights training started from, or " + RETRAIN
        )
        return
    why = replay_refusal(state.config) or (replay_unsupported(state.config) if is_replayed(state.config) else None)
    if why:
        state.unrecoverable.append(
            f"head {names}: {why}, so the head weights training ran on are not those of {base.directory}; " + RETRAIN
        )
        return
    head_modules: set[str] = set()
    new_tensors: list[PlannedTensor] = []
    for head, modules in sorted(heads.items()):
        base_names = base.names_under(head)
        missing = [m for m in modules if not base.has(f"{m}.weight")]
        if not base_names or missing:
            state.unrecoverable.append(
                f"head {head!r} was randomly initialised when training started and its weights are not in "
                f"{base.directory}; the trained head cannot be reconstructed: " + RETRAIN
            )
            return
        parts_by_module = lora_modules(state, under=head)
        head_modules |= set(parts_by_module)
        for name in base_names:
            module, _, param = name.rpartition(".")
            if param == "weight" and module in parts_by_module:
                new_tensors.append(_head_weight(state, base, module, parts_by_module[module], name))
            else:
                new_tensors.append(base.planned(name, PREFIX))
        for parts in parts_by_module.values():
            for tensor_name in parts.values():
                state.remove_tensor(tensor_name)
    for tensor in new_tensors:
        state.add_tensor(tensor)
    move_heads_to_modules_to_save(state, set(heads), head_modules)
    state.warn(
        f"head {names} was rebuilt from {base.directory}: this is exact only if those are the head weights "
        "the training started from (check with the trained model's logits if you have them)"
    )


def _head_weight(
    state: CheckpointState, base: BaseModel, module: str, parts: dict[str, str], name: str
) -> PlannedTensor:
    """The trained weight of a LoRA-wrapped head module: W + s * B @ A, or peft's merge after replaying the init."""
    if not is_replayed(state.config):
        return plan_fold(state, module, parts, base.planned(name, PREFIX))
    bias = base.locate(f"{module}.bias")[0].path if base.has(f"{module}.bias") else None
    try:
        return replayed_lora_weight(state, module, parts, base.planned(name), bias, ID, PREFIX + name)
    except ValueError as exc:
        raise UnreadableInputError(f"head module {module!r}: {exc}", state.source_dir / state.weights_file) from None


def compute(tensor: PlannedTensor, read: TensorSource) -> Any:
    """A head weight whose init peft's own layer replays before its merge (float64, cast to the weight's dtype)."""
    from ckpt_migrate.migrations._tuner_merge import merged_parameter

    return merged_parameter(tensor, read)


def failures(state: CheckpointState) -> list[str]:
    return [
        f"every peft: loads, but head {head!r} is re-initialised at random on every load (only its LoRA was saved)"
        for head in sorted(_lora_heads(state))
    ]
