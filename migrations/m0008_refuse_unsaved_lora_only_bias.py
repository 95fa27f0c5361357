"""Refuse an adapter whose trained biases peft never saved (``bias="lora_only"``), or record the loss.

With ``bias="lora_only"`` peft makes the bias of every LoRA-wrapped module trainable, but its
``get_peft_model_state_dict`` looks that bias up as ``<m>.bias`` while the tensor is ``<m>.base_layer.bias``, so
none is saved. The trained values exist nowhere: the checkpoint reloads with the base model's biases and computes
something else (the double-wrapped head is the exception: its copy is saved whole, bias included). Which modules
have a bias at all only the base model tells (``--base-model``): LLaMA-like models have none and lose nothing;
without it the tool cannot tell and refuses too.

By default this refuses (exit 4, nothing written), naming what is lost. With ``--allow-lossy`` the best repair is
written (those biases as the base model has them) and the loss is recorded in the report, the manifest and the
final warning.
"""

from __future__ import annotations

from ckpt_migrate.core.heads import lora_modules
from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.peft_layout import PREFIX
from ckpt_migrate.core.plan import CheckpointState

ID = "0008_refuse_unsaved_lora_only_bias"
SUMMARY = "Refuse a bias='lora_only' adapter whose trained biases peft never saved (--allow-lossy: record the loss)"
CAUSED_BY = (
    "peft <= 0.19 with bias='lora_only': get_peft_model_state_dict saves <m>.bias, the trained tensor is "
    "<m>.base_layer.bias (huggingface/peft#3306)"
)

UPSTREAM = "peft saves <m>.bias, the trained tensor is <m>.base_layer.bias: huggingface/peft#3306"


def _unsaved(state: CheckpointState, context: Context) -> list[str]:
    """Biases ``bias="lora_only"`` trained and the adapter lacks: all of them, or those the base model has."""
    source = context.source  # the adapter as read: the modules LoRA wrapped during training
    if source.config.get("bias") != "lora_only":
        return []
    names = [
        f"{module}.bias"
        for module in sorted(lora_modules(source))
        if not {f"{PREFIX}{module}.base_layer.bias", f"{PREFIX}{module}.bias"} & set(source.tensors)
    ]
    base = context.base_model
    return [name for name in names if base.has(name)] if base is not None else names


def detect(state: CheckpointState, context: Context) -> bool:
    return bool(_unsaved(state, context))


def plan(state: CheckpointState, context: Context) -> None:
    names = _unsaved(state, context)
    listed = ", ".join(names)
    if context.base_model is not None:
        lost = f"the trained biases of {len(names)} LoRA-wrapped modules were never saved ({UPSTREAM}): {listed}"
        advice = ""
    else:
        lost = (
            f"the trained biases of the {len(names)} LoRA-wrapped modules, those that have one, were never saved "
            f"({UPSTREAM}): {listed}"
        )
        advice = "; pass --base-model DIR to tell which have a bias (nothing is lost if none has)"
    if not context.options.allow_lossy:
        state.unrecoverable.append(
            f"bias='lora_only': {lost}; no repair reproduces the trained model{advice}; --allow-lossy writes the "
            "best repair (these biases as the base model has them), or retrain with bias='none' or a peft that "
            "saves them"
        )
        return
    state.losses.append(f"{lost}; the output has the base model's biases there")


def failures(state: CheckpointState) -> list[str]:
    if state.config.get("bias") != "lora_only" or not lora_modules(state):
        return []
    return [
        "every peft: loads, but the biases bias='lora_only' trained are not in the checkpoint (the base model's are "
        "used): the logits differ from the trained model's, unless the LoRA-wrapped modules have no bias"
    ]
