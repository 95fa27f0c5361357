"""Fold a head that a non-LoRA tuner *and* modules_to_save both wrapped into a plain modules_to_save head.

peft <= 0.12 with ``target_modules="all-linear"`` on a sequence/token classification model injects
every tuner (LoHa, LoKr, AdaLoRA, IA3, VeRA, BOFT, OFT, HRA, FourierFT, Poly, LN Tuning), not only
LoRA, into the head, then wraps that head in a ModulesToSaveWrapper. The trained copy is saved as
``<m>.base_layer.*`` plus the tuner's tensors at ``<m>.``; ``original_module``/``modules_to_save``
duplicates ride along. Current peft cannot load it (KeyError), peft 0.12 loses the trained head.

Each tuner-wrapped module of the head is rebuilt alone and merged by the installed peft's own layer
code (:mod:`ckpt_migrate.migrations._tuner_merge`); its weight and bias become ``<m>.weight``/``<m>.bias``.
That is exact only where the installed release computes what the producing release computed, and
where the head has a single weight at all: otherwise (Poly, OFT and LoKr across peft 0.14, a release
newer than the tables) the checkpoint is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.heads import move_heads_to_modules_to_save, replant_head
from ckpt_migrate.core.migration import Context, TensorSource
from ckpt_migrate.core.peft_layout import PREFIX, parse_module_key, short_name
from ckpt_migrate.core.plan import CheckpointState, PlannedTensor, Source, SourceKind
from ckpt_migrate.core.tuners import (
    Tuner,
    ia3_feedforward,
    installed_peft,
    lokr_alpha_rewrite_pending,
    tuner_heads,
    tuner_modules,
    tuner_of,
)
from ckpt_migrate.migrations._tuner_fold import TunerFold, fold_refusal, holder_config, ia3_loadable

ID = "0007_fold_double_wrapped_tuner_head"
SUMMARY = "Fold a head wrapped by a non-LoRA tuner (LoHa, LoKr, AdaLoRA, IA3, VeRA, BOFT, ...) and modules_to_save"
CAUSED_BY = (
    "peft <= 0.12.0, all-linear on SEQ_CLS/TOKEN_CLS with any tuner (huggingface/peft#2027; fixed in 0.13.0 by #2028)"
)
#: The head's tuner tensors become a plain modules_to_save head: what is trained, and its names, change.
CHANGES_TRAINABLE_PARAMETERS = True

#: Per-module config dicts keyed by module-name patterns, cleaned of entries only the heads used.
PATTERNS = {"LOHA": ("rank_pattern", "alpha_pattern"), "LOKR": ("rank_pattern", "alpha_pattern")}


def detect(state: CheckpointState, context: Context) -> bool:
    # A LoKr config migration 0011 makes mean the same in every release is folded after that rewrite.
    return bool(tuner_heads(state)) and not lokr_alpha_rewrite_pending(state.config)


def _refusal(state: CheckpointState, context: Context, tuner: Tuner | None, heads: set[str]) -> str | None:
    """Why the trained heads cannot be written as plain weights that every target computes as trained."""
    why = fold_refusal(state.config, context.options.target_peft, tuner, heads, "wrapped twice by")
    if why or tuner is None:
        return why
    if tuner.peft_type == "VERA":
        in_heads = {m: p for head in heads for m, p in tuner_modules(state, tuner, under=head).items()}
        lacking = sorted(m for m, parts in in_heads.items() if not set(tuner.shared) <= set(parts))
        if lacking:
            return (
                f"VeRA head module {', '.join(lacking)} was saved without its projections (save_projection false): "
                "peft regenerates them at the size of the whole model, which the head alone does not give"
            )
    return None


def _feedforward(state: CheckpointState, module: str, parts: dict[str, str], weight: PlannedTensor) -> bool:
    """IA3: whether the producer treated ``module`` as feedforward, checked against ia3_l's orientation."""
    feedforward = ia3_feedforward(state.config, module)
    out_features, in_features = weight.shape
    expected = (1, in_features) if feedforward else (out_features, 1)
    shape = state.tensors[parts["ia3_l"]].shape
    if shape != expected:
        raise UnreadableInputError(
            f"IA3 head module {module!r}: ia3_l has shape {shape}, but feedforward_modules makes it "
            f"{'' if feedforward else 'not '}feedforward ({expected})",
            state.source_dir / state.weights_file,
        )
    return feedforward


def _plan_module(state: CheckpointState, tuner: Tuner, module: str, parts: dict[str, str]) -> list[PlannedTensor]:
    where = state.source_dir / state.weights_file
    weight = state.tensors.get(f"{PREFIX}{module}.base_layer.weight")
    if weight is None or len(weight.shape) != 2:
        raise UnreadableInputError(f"head module {module!r} is wrapped twice but has no trained 2-D base weight", where)
    bias = state.tensors.get(f"{PREFIX}{module}.base_layer.bias")
    feedforward = tuner.peft_type == "IA3" and _feedforward(state, module, parts, weight)
    holder = holder_config(tuner, state.config, module, feedforward)
    fold = TunerFold(
        tuner.peft_type,
        module,
        "weight",
        json.dumps(holder, sort_keys=True),
        tuple(sorted(parts.items())),
        weight.name,
        bias.name if bias is not None else "",
    )
    merged_from = ", ".join(sorted(parts))
    planned = []
    for param, base in (("weight", weight), ("bias", bias)):
        if base is None:
            continue
        formula = f"{param} of peft {installed_peft()}'s {tuner.name} merge: {module}.base_layer + {merged_from}"
        source = Source(SourceKind.COMPUTED, base.name, migration=ID, formula=formula, payload=_replace(fold, param))
        planned.append(PlannedTensor(f"{PREFIX}{module}.{param}", base.shape, base.dtype, source))
    return planned


def _replace(fold: TunerFold, param: str) -> TunerFold:
    return dataclasses.replace(fold, param=param)


def _check_trained_copies(state: CheckpointState, tuner: Tuner, by_head: dict[str, dict[str, dict[str, str]]]) -> None:
    """Every module whose tuner tensors the wrapper copied must have the trained copy's tensors too."""
    for head, modules in by_head.items():
        copied = set()
        for name in state.tensors:
            parsed = parse_module_key(name, tuner.kinds)
            if parsed is not None and parsed.module.startswith(f"{head}.modules_to_save"):
                copied.add(parsed.module.replace(f"{head}.modules_to_save", head, 1))
        if copied - set(modules):
            raise UnreadableInputError(
                f"head {head!r} is wrapped twice but the trained {tuner.name} tensors of "
                f"{', '.join(sorted(copied - set(modules)))} are missing",
                state.source_dir / state.weights_file,
            )


def plan(state: CheckpointState, context: Context) -> None:
    tuner = tuner_of(state.config)
    heads = tuner_heads(state)
    reason = _refusal(state, context, tuner, heads)
    if reason is not None:
        state.unrecoverable.append(reason)
        return
    assert tuner is not None  # _refusal refuses a method the table lacks
    by_head = {head: tuner_modules(state, tuner, under=head) for head in sorted(heads)}
    _check_trained_copies(state, tuner, by_head)
    try:
        folds = {
            head: [t for module, parts in sorted(modules.items()) for t in _plan_module(state, tuner, module, parts)]
            for head, modules in by_head.items()
        }
    except ValueError as exc:
        state.unrecoverable.append(f"{tuner.name}: {exc}: the alpha the head was trained with cannot be told")
        return
    planned: list[PlannedTensor] = []
    for head, new in folds.items():
        computed = {short_name(t.name) for t in new}
        planned += new + replant_head(state, head, computed, lambda n: parse_module_key(n, tuner.kinds) is not None)
    head_modules = {module for modules in by_head.values() for module in modules}
    for tensor in planned:
        state.add_tensor(tensor)
    body = set(tuner_modules(state, tuner))
    move_heads_to_modules_to_save(state, heads, head_modules, body=body, patterns=PATTERNS.get(tuner.peft_type, ()))
    if tuner.peft_type == "IA3":
        ia3_loadable(state, body, context.source.config.get("target_modules"))


def compute(tensor: PlannedTensor, read: TensorSource) -> Any:
    """The merged weight or bias of one head module, by the installed peft (float64, cast to the head's dtype)."""
    from ckpt_migrate.migrations._tuner_merge import merged_parameter

    return merged_parameter(tensor, read)


def failures(state: CheckpointState) -> list[str]:
    tuner, heads = tuner_of(state.config), tuner_heads(state)
    if not heads:
        return []
    modules = sorted(tuner_modules(state, tuner, under=min(heads))) if tuner else []
    config = state.config
    feedforward, targets = config.get("feedforward_modules"), config.get("target_modules")
    if isinstance(feedforward, list) and isinstance(targets, list) and not set(feedforward) <= set(targets):
        return ["every peft: ValueError: `feedforward_modules` should be a subset of `target_modules`"]
    return [
        f"peft >= 0.13: the adapter does not load (KeyError: '{PREFIX}{modules[0] if modules else min(heads)}.weight')",
        f"peft <= 0.12: the trained head {', '.join(sorted(heads))} is not restored (the head it is loaded onto is "
        "used, or loading fails)",
    ]
