"""Which transformers class a base model is: the one resolver behind ``verify``, ``export``, ``load`` and the remap.

A base's ``config.json`` names its class in ``architectures``; configs written by ``AutoConfig`` (and many
older Hub repositories) do not. Then the class comes from ``model_type`` and the adapter's task: its
``task_type``, or, without one, the top-level modules its tensors use (``projector`` + ``classifier`` is an
audio classifier, not a frame classifier). Every model class is read from transformers' own Auto
mappings (``MODEL_FOR_*_MAPPING_NAMES``), never from a table of ours; only which Auto class serves which
task is written here. transformers is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.peft_layout import strip_prefix
from ckpt_migrate.core.text import listed

#: The Auto classes of a classification head, each with the transformers mapping of its model classes.
CLASSIFICATION = {
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "AutoModelForImageClassification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForAudioClassification": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForAudioFrameClassification": "MODEL_FOR_AUDIO_FRAME_CLASSIFICATION_MAPPING_NAMES",
}
#: Every Auto class a peft adapter's base can be (the optimizer remap builds the training model, whatever it was).
ANY_TASK = {
    **CLASSIFICATION,
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "AutoModel": "MODEL_MAPPING_NAMES",
}
#: peft's task_type -> the Auto class peft's task model wraps.
PEFT_TASKS = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


@dataclass(frozen=True)
class ModelChoice:
    """``auto_class`` loads the base (None: only ``model_class`` is known); ``model_class`` builds it (None: the
    task's mapping has no class for the config's ``model_type``); ``how``: why, for messages."""

    auto_class: str | None
    model_class: str | None
    how: str


def class_names(auto_class: str) -> dict[str, str]:
    """transformers' own mapping of ``auto_class``: model_type -> model class name (the first of a tuple)."""
    from transformers.models.auto import modeling_auto

    mapping = getattr(modeling_auto, ANY_TASK[auto_class], {})
    return {kind: names if isinstance(names, str) else names[0] for kind, names in mapping.items()}


def top_level_modules(tensor_names: Iterable[str]) -> set[str]:
    """Top-level modules an adapter's tensors live in: ``base_model.model.projector.lora_A.weight`` -> projector."""
    return {inner.split(".", 1)[0] for name in tensor_names if (inner := strip_prefix(name))}


def choose_model(
    base_config: Mapping[str, Any],
    adapter_config: Mapping[str, Any] | None = None,
    tensor_names: Iterable[str] = (),
    where: Path | None = None,
    tasks: Mapping[str, str] = CLASSIFICATION,
) -> ModelChoice:
    """The class of the base model among ``tasks``' Auto classes.

    1. a class of ``architectures`` that one of ``tasks``' classification mappings maps;
    2. the adapter's ``task_type`` (the architecture's own class when the task's mapping has it, else the
       task's class for ``model_type``: a ``LlamaForCausalLM`` base of a SEQ_CLS adapter is loaded as
       ``LlamaForSequenceClassification``, as peft's training did);
    3. the classes ``tasks`` map ``model_type`` to whose top-level modules hold every top-level module of
       ``tensor_names`` (built on the meta device), when exactly one does: a ``ViTModel`` or
       ``Wav2Vec2ForPreTraining`` base fine-tuned as a classifier (peft has no image or audio task type), or a
       config without ``architectures``;
    4. with ``tasks`` = :data:`ANY_TASK`, the first class of ``architectures`` as it is.
    """
    architectures = base_config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise UnreadableInputError("'architectures' must be a list of class names", where)
    task_type = (adapter_config or {}).get("task_type")
    model_type = base_config.get("model_type")
    by_task = {auto: class_names(auto) for auto in tasks}
    for architecture in architectures:
        for auto, names in by_task.items():
            if auto in CLASSIFICATION and architecture in names.values():
                return ModelChoice(auto, architecture, f"architectures {architecture}")
    auto = PEFT_TASKS.get(task_type) if isinstance(task_type, str) else None
    if auto in tasks:
        names = by_task[auto]
        known = [a for a in architectures if a in names.values()]
        model_class = known[0] if known else names.get(model_type) if isinstance(model_type, str) else None
        # No class: the Auto class still says how to load it (transformers then judges model_type itself).
        return ModelChoice(auto, model_class, f"model_type {model_type} and task_type {task_type}")
    used = top_level_modules(tensor_names)
    candidates: dict[str, str] = {}
    for auto, names in by_task.items():
        if isinstance(model_type, str) and model_type in names:
            candidates.setdefault(names[model_type], auto)
    fitting = {cls: a for cls, a in candidates.items() if used <= _children(base_config, cls)} if used else {}
    if len(fitting) == 1:
        ((model_class, auto),) = fitting.items()
        return ModelChoice(
            auto, model_class, f"model_type {model_type} and the adapter's modules {listed(sorted(used))}"
        )
    if architectures and tasks is ANY_TASK:
        auto = next((a for a, names in by_task.items() if architectures[0] in names.values()), None)
        return ModelChoice(auto, architectures[0], f"architectures {architectures[0]}")
    described = (
        f"architectures {listed(architectures)} names no {_kinds(tasks)} class"
        if architectures
        else "config.json has no 'architectures'"
        if isinstance(model_type, str)
        else "config.json has neither 'architectures' nor 'model_type'"
    )
    if not candidates:
        fit = f"transformers has no {_kinds(tasks)} class for model_type {model_type!r}"
    elif not used:
        fit = "the adapter has no tensors to tell by"
    else:
        fits = f"fit {listed(sorted(fitting))}" if fitting else f"fit none of {listed(sorted(candidates))}"
        fit = f"its modules {listed(sorted(used))} {fits}"
    raise UnreadableInputError(
        f"cannot tell which model to load: {described}, the adapter's task_type is {task_type!r} and {fit}; add "
        '"architectures" to config.json or task_type to adapter_config.json',
        where,
    )


def _kinds(tasks: Mapping[str, str]) -> str:
    return "/".join(auto.removeprefix("AutoModelFor") if auto != "AutoModel" else "base model" for auto in tasks)


def _children(base_config: Mapping[str, Any], model_class: str) -> set[str]:
    """The top-level module names of ``model_class`` built from ``base_config`` (no weights)."""
    import transformers

    cls = getattr(transformers, model_class, None)
    if cls is None:
        return set()
    try:
        return set(dict(meta_instance(cls, dict(base_config)).named_children()))
    except Exception:  # noqa: BLE001 - a class this config cannot build is not a candidate
        return set()


def meta_instance(model_class: Any, config: Any) -> Any:
    """``model_class(config)`` without weights: on the meta device, or, for the few models whose init reads a
    tensor it builds (ConvNeXt's drop-path rates), with accelerate's empty weights (parameters on meta only)."""
    import torch

    if isinstance(config, dict):
        from transformers import CONFIG_MAPPING

        config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    try:
        with torch.device("meta"):
            return model_class(config)
    except (NotImplementedError, RuntimeError):
        try:
            from accelerate import init_empty_weights
        except ImportError:
            raise
        with init_empty_weights():
            return model_class(config)
