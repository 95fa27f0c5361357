"""Fail fast when a PEFT model is about to train a classification head it cannot save.

Two mistakes silently re-randomise a task head on every reload:

* the head carries LoRA layers (peft <= 0.12 ``all-linear`` on SEQ_CLS/TOKEN_CLS wraps it twice,
  huggingface/peft#2027; any peft LoRA-wraps heads it does not know, such as BART/T5
  ``classification_head``, or any head when ``task_type`` is missing): only ``lora_A/B`` are
  saved, never the head's randomly initialised base weights;
* the head is neither saved by ``save_pretrained`` (not in ``modules_to_save``) nor present in the
  base checkpoint, so its weights are random at every load.

:func:`check_model` raises :class:`HeadWrappedError` for either; :class:`HeadGuardCallback` (a
``transformers.TrainerCallback``, imported lazily) runs it when ``Trainer.train()`` starts::

    from ckpt_migrate.guard import HeadGuardCallback
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[HeadGuardCallback()])
    trainer.train()  # raises HeadWrappedError before the first step if the head would be lost

Importing this module imports neither torch, transformers nor peft.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.peft_layout import PREFIX, WRAPPER_SEGMENTS, head_root
from ckpt_migrate.formats.base_model import SHARD_INDEX, SINGLE_FILE, BaseModel

__all__ = [
    "HeadGuardCallback",  # noqa: F822 - built lazily by __getattr__ (imports transformers)
    "HeadProblem",
    "HeadWrappedError",
    "check_model",
    "find_head_problems",
]


@dataclass(frozen=True)
class HeadProblem:
    """One head that would be lost: which head, why, and the modules or parameters involved."""

    head: str
    kind: Literal["lora", "unsaved", "trained_unsaved"]
    names: tuple[str, ...]
    message: str


class HeadWrappedError(ValueError):
    """A classification head carries LoRA layers or would not be saved; ``problems`` lists each head."""

    def __init__(self, problems: list[HeadProblem]):
        self.problems = list(problems)
        heads = sorted({p.head for p in self.problems})
        self.heads = heads
        self.modules = sorted({name for p in self.problems for name in p.names})
        noun = "classification head" if len(heads) == 1 else "classification heads"
        lines = [f"{noun} {', '.join(repr(h) for h in heads)} would be lost after saving:"]
        lines += [f"  - {p.message}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass
class _PeftView:
    """The transformers model inside whatever wrapper, and the peft objects found on it."""

    inner: Any
    state_owner: Any = None
    key_prefix: str = PREFIX
    adapter_names: list[str] = field(default_factory=list)
    uses_peft: bool = False


def _unwrap(model: Any) -> _PeftView:
    # DDP/DeepSpeed-style wrappers keep the real model in ``.module``
    while hasattr(model, "module") and not hasattr(model, "peft_config") and hasattr(model.module, "state_dict"):
        model = model.module
    view = _PeftView(inner=model)
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # PeftModel
        view.inner = model.get_base_model()
    elif hasattr(model, "peft_config") and hasattr(model, "model") and hasattr(model, "targeted_module_names"):
        view.inner = model.model  # a bare LoraModel / BaseTuner
        view.key_prefix = "model."
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and configs:
        view.state_owner = model
        view.adapter_names = list(configs)
        view.uses_peft = True
    return view


def _peft_classes() -> tuple[type, ...] | None:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # no peft: nothing can wrap a head
        return None
    return BaseTunerLayer, ModulesToSaveWrapper


def _clean(name: str) -> tuple[str, bool]:
    """``score.modules_to_save.default.weight`` -> (``score.weight``, False); original_module copies -> True."""
    parts = name.split(".")
    out: list[str] = []
    index = 0
    while index < len(parts):
        part = parts[index]
        if part == "original_module":
            return ".".join(out + parts[index + 1 :]), True
        if part == "modules_to_save" and out:
            index += 2  # skip the adapter name too
            continue
        if part == "base_layer":
            index += 1
            continue
        out.append(part)
        index += 1
    return ".".join(out), False


def _saved_keys(view: _PeftView) -> set[str]:
    """Names (relative to the transformers model) of every tensor ``save_pretrained`` writes, all adapters."""
    if view.state_owner is None:
        return set()
    from peft.utils import get_peft_model_state_dict

    keys: set[str] = set()
    for adapter in view.adapter_names:
        for key in get_peft_model_state_dict(view.state_owner, adapter_name=adapter):
            keys.add(key[len(view.key_prefix) :] if key.startswith(view.key_prefix) else key)
    return keys


def _local_base_dir(view: _PeftView, base_model_dir: str | os.PathLike[str] | None) -> Path | None:
    """A local directory holding the base checkpoint, if one can be found without the network."""
    candidates: list[Path] = []
    if base_model_dir is not None:
        candidates.append(Path(base_model_dir))
    name = getattr(view.inner, "name_or_path", None) or getattr(
        getattr(view.inner, "config", None), "_name_or_path", ""
    )
    if name:
        candidates.append(Path(name))
    for directory in candidates:
        if directory.is_dir() and BaseModel(directory).has_safetensors():
            return directory
    if name and base_model_dir is None and not Path(name).exists():
        try:  # a hub id already in the local cache
            from huggingface_hub import try_to_load_from_cache

            for filename in (SINGLE_FILE, SHARD_INDEX):
                cached = try_to_load_from_cache(name, filename)
                if isinstance(cached, str):
                    return Path(cached).parent
        except Exception:  # noqa: BLE001 - any cache trouble means "unknown"
            return None
    return None


def _base_has(base_dir: Path | None) -> Any:
    """``name -> bool`` over the tensor names of the base checkpoint (headers only), or None if unreadable."""
    if base_dir is None:
        return None
    base = BaseModel(base_dir)
    try:
        base.has("")
    except UnreadableInputError:  # an unreadable base is "unknown", not a crash inside training
        return None
    return base.has


_FIX = (
    "fix: list {head!r} in modules_to_save and keep it out of target_modules (name the body modules instead of "
    "'all-linear', or on peft >= 0.14 add exclude_modules=[{head!r}])"
)


_UNSAVED = {
    "trained_unsaved": "head {head!r} has trainable parameters save_pretrained does not write ({names}): their "
    "training is lost",
    "unsaved": "head {head!r} parameters {names} are not saved by save_pretrained and are not in the base checkpoint "
    "{base_dir}: they are randomly initialised on every load",
    "unknown": "head {head!r} parameters {names} are not saved by save_pretrained and the base checkpoint cannot be "
    "checked for them (pass base_model_dir= a local model directory with safetensors); unless that checkpoint holds "
    "them they are random on every load",
}


def find_head_problems(model: Any, *, base_model_dir: str | os.PathLike[str] | None = None) -> list[HeadProblem]:
    """Every classification head of ``model`` that carries LoRA or whose weights would not be saved.

    ``model`` is a ``PeftModel``, a peft tuner, or a transformers model with peft adapters injected.
    ``base_model_dir`` is the local checkpoint the model was loaded from (default: its
    ``name_or_path`` when that is a local directory with safetensors, or a cached hub snapshot).
    """
    classes = _peft_classes()
    if classes is None:
        return []
    tuner_layer, wrapper = classes
    view = _unwrap(model)
    inner = view.inner
    if not hasattr(inner, "named_children"):
        raise TypeError(f"expected a torch module or PeftModel, got {type(model).__name__}")
    if not view.uses_peft and not any(isinstance(m, (tuner_layer, wrapper)) for m in inner.modules()):
        return []  # no adapters: save_pretrained writes the whole model, head included
    heads = [(name, child) for name, child in inner.named_children() if head_root(name) is not None]
    problems: list[HeadProblem] = []
    saved: set[str] | None = None
    has_in_base: Any = False
    base_dir: Path | None = None
    for head, module in heads:
        lora: list[str] = []
        double = False
        for sub_name, sub in module.named_modules():
            if isinstance(sub, tuner_layer):
                clean, _ = _clean(f"{head}.{sub_name}" if sub_name else head)
                if any(seg in sub_name.split(".") for seg in WRAPPER_SEGMENTS) or isinstance(module, wrapper):
                    double = True
                if clean not in lora:
                    lora.append(clean)
        if lora:
            modules = ", ".join(lora)
            how = (
                f"carries LoRA layers ({modules}) inside its modules_to_save wrapper (huggingface/peft#2027): after "
                "saving, current peft cannot load it and the trained head is lost"
                if double
                else f"carries LoRA layers ({modules}): save_pretrained keeps only lora_A/lora_B, never the head's "
                "randomly initialised base weights, so the head is re-randomised on every reload"
            )
            problems.append(HeadProblem(head, "lora", tuple(lora), f"head {head!r} {how}; {_FIX.format(head=head)}"))
            continue
        if saved is None:
            saved = _saved_keys(view)
            base_dir = _local_base_dir(view, base_model_dir)
            has_in_base = _base_has(base_dir)
        found: dict[str, list[str]] = {"trained_unsaved": [], "unsaved": [], "unknown": []}
        for param_name, param in module.named_parameters():
            clean, is_copy = _clean(f"{head}.{param_name}")
            if is_copy or clean in saved:
                continue
            if getattr(param, "requires_grad", False):
                found["trained_unsaved"].append(clean)
            elif has_in_base is None:
                found["unknown"].append(clean)
            elif not has_in_base(clean):
                found["unsaved"].append(clean)
        for kind, names in found.items():
            if names:
                why = _UNSAVED[kind].format(head=head, names=", ".join(names), base_dir=base_dir)
                public_kind = "unsaved" if kind == "unknown" else kind  # unknown: not saved, base not checkable
                problems.append(HeadProblem(head, public_kind, tuple(names), f"{why}; {_FIX.format(head=head)}"))
    return problems


def check_model(model: Any, *, base_model_dir: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`HeadWrappedError` if any classification head of ``model`` would be lost after saving.

    See :func:`find_head_problems` for what is checked and for ``base_model_dir``.
    """
    problems = find_head_problems(model, base_model_dir=base_model_dir)
    if problems:
        raise HeadWrappedError(problems)


def _make_callback_class() -> type:
    from transformers import TrainerCallback

    class HeadGuardCallback(TrainerCallback):
        """Run :func:`ckpt_migrate.guard.check_model` when training begins, before the first step.

        ``base_model_dir``: the local checkpoint the model was loaded from, when its ``name_or_path``
        is not one (used to tell whether a frozen head's weights are saved there).
        """

        def __init__(self, base_model_dir: str | os.PathLike[str] | None = None):
            self.base_model_dir = base_model_dir

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers signature
            model = kwargs.get("model")
            if model is None:
                warnings.warn("HeadGuardCallback: on_train_begin got no model; nothing checked", stacklevel=2)
                return control
            check_model(model, base_model_dir=self.base_model_dir)
            return control

    HeadGuardCallback.__module__ = __name__
    HeadGuardCallback.__qualname__ = "HeadGuardCallback"
    return HeadGuardCallback


def __getattr__(name: str) -> Any:
    if name == "HeadGuardCallback":
        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
