"""Refuse an adapter whose trained biases peft never saved (``bias="lora_only"`` and alike), or record the loss.

With ``bias="lora_only"`` peft makes the bias of every LoRA-wrapped module trainable, but its
``get_peft_model_state_dict`` looks that bias up as ``<m>.bias`` while the tensor is ``<m>.base_layer.bias``, so
none is saved. The trained values exist nowhere: the checkpoint reloads with the base model's biases and computes
something else (the double-wrapped head is the exception: its copy is saved whole, bias included). Which modules
have a bias at all only the base model tells (``--base-model``): LLaMA-like models have none and lose nothing;
without it the tool cannot tell and refuses too. The same code loses AdaLoRA's ``lora_only`` and BOFT's
``boft_only`` biases (peft 0.12 ``save_and_load.py``), and VeRA saves only ``vera_lambda_*`` (and its projections),
so its ``vera_only`` biases are lost too.

By default this refuses (exit 4, nothing written), naming what is lost. With ``--allow-lossy`` the best repair is
written (those biases as the base model has them) and the loss is recorded in the report, the manifest and the
final warning.
"""

from __future__ import annotations

from ckpt_migrate.core.heads import lora_modules
from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.peft_layout import PREFIX
from ckpt_migrate.core.plan import CheckpointState
from ckpt_migrate.core.tuners import tuner_modules, tuner_of

ID = "0008_refuse_unsaved_lora_only_bias"
SUMMARY = "Refuse a bias='lora_only' adapter whose trained biases peft never saved (--allow-lossy: record the loss)"
CAUSED_BY = (
    "peft <= 0.19 with bias='lora_only': get_peft_model_state_dict saves <m>.bias, the trained tensor is "
    "<m>.base_layer.bias (huggingface/peft#3306); in peft 0.12 also AdaLoRA lora_only, BOFT boft_only, VeRA vera_only"
)
CHANGES_TRAINABLE_PARAMETERS = False

UPSTREAM = "peft saves <m>.bias, the trained tensor is <m>.base_layer.bias: huggingface/peft#3306"
#: VeRA's get_peft_model_state_dict (peft 0.12) keeps vera_lambda_* and the projections, whatever ``bias`` says.
UPSTREAM_VERA = "peft's VeRA saves only vera_lambda_* and its projections, no bias"


#: peft_type -> the ``bias`` value that trains the biases of the tuner's modules without saving them (peft <= 0.12).
UNSAVED_BIAS = {"LORA": "lora_only", "ADALORA": "lora_only", "BOFT": "boft_only", "VERA": "vera_only"}


def _wrapped_modules(state: CheckpointState) -> list[str]:
    """The modules the adapter's tuner wrapped during training (outside modules_to_save copies)."""
    tuner = tuner_of(state.config)
    return sorted(tuner_modules(state, tuner) if tuner is not None else lora_modules(state))


def _bias_option(state: CheckpointState) -> str | None:
    """The adapter's ``bias`` value when it is one whose trained biases peft never saved."""
    bias = state.config.get("bias")
    return bias if bias == UNSAVED_BIAS.get(state.config.get("peft_type", "LORA")) else None


def _unsaved(state: CheckpointState, context: Context) -> list[str]:
    """Biases ``bias="lora_only"`` (or alike) trained and the adapter lacks: all of them, or those the base has."""
    source = context.source  # the adapter as read: the modules the tuner wrapped during training
    if _bias_option(source) is None:
        return []
    names = [
        f"{module}.bias"
        for module in _wrapped_modules(source)
        if not {f"{PREFIX}{module}.base_layer.bias", f"{PREFIX}{module}.bias"} & set(source.tensors)
    ]
    base = context.base_model
    return [name for name in names if base.has(name)] if base is not None else names


def detect(state: CheckpointState, context: Context) -> bool:
    return bool(_unsaved(state, context))


def plan(state: CheckpointState, context: Context) -> None:
    names = _unsaved(state, context)
    listed = ", ".join(names)
    wrapped = f"{state.config.get('peft_type', 'LORA')}-wrapped"
    upstream = UPSTREAM_VERA if state.config.get("peft_type") == "VERA" else UPSTREAM
    if context.base_model is not None:
        lost = f"the trained biases of {len(names)} {wrapped} modules were never saved ({upstream}): {listed}"
        advice = ""
    else:
        lost = (
            f"the trained biases of the {len(names)} {wrapped} modules, those that have one, were never saved "
            f"({upstream}): {listed}"
        )
        advice = "; pass --base-model DIR to tell which have a bias (nothing is lost if none has)"
    if not context.options.allow_lossy:
        state.unrecoverable.append(
            f"bias={_bias_option(context.source)!r}: {lost}; no repair reproduces the trained model{advice}; "
            "--allow-lossy writes the "
            "best repair (these biases as the base model has them), or retrain with bias='none' or a peft that "
            "saves them"
        )
        return
    state.losses.append(f"{lost}; the output has the base model's biases there")


def failures(state: CheckpointState) -> list[str]:
    if _bias_option(state) is None or not _wrapped_modules(state):
        return []
    return [
        f"every peft: loads, but the biases bias={_bias_option(state)!r} trained are not in the checkpoint (the base "
        "model's are "
        "used): the logits differ from the trained model's, unless the wrapped modules have no bias"
    ]
