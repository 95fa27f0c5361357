"""Rebuild a head that a non-LoRA tuner wrapped, and that was never saved whole, from --base-model.

The LoRA-only head of migration 0002 happens with every tuner: a head peft does not put in
modules_to_save (BART's ``classification_head``, a config without ``task_type``, an explicit target
list hitting the head) trains only the tuner's tensors (``out_proj.hada_w1_a``, ``out_proj.ia3_l``);
its base weights were randomly initialised and exist only where the user saved them. Every peft loads
such an adapter onto a freshly initialised head. With ``--base-model`` holding the head weights training
started from, each tuned module is merged by the installed peft's own layer code (as in 0007) and the
head moves into modules_to_save; without them the trained head cannot be rebuilt.
"""

from __future__ import annotations

from typing import Any

from ckpt_migrate.core.heads import move_heads_to_modules_to_save
from ckpt_migrate.core.migration import Context, TensorSource
from ckpt_migrate.core.peft_layout import PREFIX, head_root, wrapper_root
from ckpt_migrate.core.plan import CheckpointState, PlannedTensor, Source, SourceKind
from ckpt_migrate.core.tuners import installed_peft, lokr_alpha_rewrite_pending, tuner_modules, tuner_of
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.migrations._tuner_fold import RETRAIN, fold_refusal, ia3_loadable, module_fold

ID = "0010_fold_tuner_only_head"
SUMMARY = "Rebuild a head wrapped by a non-LoRA tuner only (base weights never saved) from --base-model"
CAUSED_BY = (
    "any peft: heads outside modules_to_save (classification_head, no task_type) targeted by LoHa, IA3, ... "
    "(the non-LoRA form of 0002; huggingface/peft#2027 follow-ups)"
)
#: The head's tuner tensors become a plain modules_to_save head: what is trained, and its names, change.
CHANGES_TRAINABLE_PARAMETERS = True


def _tuner_only_heads(state: CheckpointState) -> dict[str, dict[str, dict[str, str]]]:
    """Heads whose modules carry the tuner's tensors outside any modules_to_save wrapper: head -> module -> parts."""
    tuner = tuner_of(state.config)
    if tuner is None:
        return {}
    wrapped = {wrapper_root(strip) for strip in (n[len(PREFIX) :] for n in state.tensors if n.startswith(PREFIX))}
    heads: dict[str, dict[str, dict[str, str]]] = {}
    for module, parts in tuner_modules(state, tuner).items():
        root = head_root(module)
        if root is not None and root not in wrapped and f"{PREFIX}{module}.base_layer.weight" not in state.tensors:
            heads.setdefault(root, {})[module] = parts
    return heads


def detect(state: CheckpointState, context: Context) -> bool:
    # A LoKr config migration 0011 makes mean the same in every release is folded after that rewrite.
    return bool(_tuner_only_heads(state)) and not lokr_alpha_rewrite_pending(state.config)


def _merged(state: CheckpointState, base: BaseModel, module: str, parts: dict[str, str], param: str) -> PlannedTensor:
    tuner = tuner_of(state.config)
    assert tuner is not None
    bias = base.has(f"{module}.bias")
    files = (base.locate(f"{module}.weight")[0].path, base.locate(f"{module}.bias")[0].path if bias else None)
    fold = module_fold(state, tuner, module, parts, param, bias, files)
    planned = base.planned(f"{module}.{param}", PREFIX)
    formula = f"{param} of peft {installed_peft()}'s {tuner.name} merge: --base-model {module} + {', '.join(parts)}"
    source = Source(SourceKind.COMPUTED, planned.source.tensor, migration=ID, formula=formula, payload=fold)
    return PlannedTensor(planned.name, planned.shape, planned.dtype, source)


def plan(state: CheckpointState, context: Context) -> None:
    heads = _tuner_only_heads(state)
    tuner = tuner_of(state.config)
    names = ", ".join(sorted(heads))
    reason = fold_refusal(state.config, context.options.target_peft, tuner, set(heads), "wrapped only by")
    base = context.base_model
    if reason is None and base is None:
        reason = (
            f"head {names} carries {tuner.name if tuner else 'tuner'} tensors but its base weights were never saved in "
            f"the adapter; pass --base-model DIR with the head weights training started from, or {RETRAIN}"
        )
    if reason is not None:
        state.unrecoverable.append(reason)
        return
    assert tuner is not None and base is not None
    new_tensors: list[PlannedTensor] = []
    for head, modules in sorted(heads.items()):
        missing = [m for m in modules if not base.has(f"{m}.weight")]
        if missing:
            state.unrecoverable.append(
                f"head {head!r} was randomly initialised when training started and its weights are not in "
                f"{base.directory}; the trained head cannot be reconstructed: {RETRAIN}"
            )
            return
        for name in base.names_under(head):
            module, _, param = name.rpartition(".")
            try:
                merged = module in modules and param in ("weight", "bias")
                new_tensors.append(
                    _merged(state, base, module, modules[module], param) if merged else base.planned(name, PREFIX)
                )
            except ValueError as exc:
                state.unrecoverable.append(f"{tuner.name} head module {module}: {exc}")
                return
        for parts in modules.values():
            for tensor_name in parts.values():
                if tensor_name.startswith(PREFIX):  # the model's shared projections stay for the body
                    state.remove_tensor(tensor_name)
    for tensor in new_tensors:
        state.add_tensor(tensor)
    head_modules = {module for modules in heads.values() for module in modules}
    patterns = ("rank_pattern", "alpha_pattern") if tuner.alpha else ()
    body = set(tuner_modules(state, tuner))
    move_heads_to_modules_to_save(state, set(heads), head_modules, body=body, patterns=patterns)
    if tuner.peft_type == "IA3":
        ia3_loadable(state, body, context.source.config.get("target_modules"))
    state.warn(
        f"head {names} was rebuilt from {base.directory}: this is exact only if those are the head weights "
        "the training started from (check with the trained model's logits if you have them)"
    )


def compute(tensor: PlannedTensor, read: TensorSource) -> Any:
    """The merged weight or bias of one head module, by the installed peft (float64, cast to the head's dtype)."""
    from ckpt_migrate.migrations._tuner_merge import merged_parameter

    return merged_parameter(tensor, read)


def failures(state: CheckpointState) -> list[str]:
    return [
        f"every peft: loads, but head {head!r} is re-initialised at random on every load (only its tuner tensors "
        "were saved)"
        for head in sorted(_tuner_only_heads(state))
    ]
