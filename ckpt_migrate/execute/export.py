"""Export a standalone model: the base with every adapter delta folded in and the repaired head in place.

The plan is data, made from headers only: every base tensor is copied (byte ranges, never loaded),
or folded with its module's LoRA (``W + s * B @ A``, the same fold the head repair uses), or merged
with its module's other tuner by the installed peft's own layer code (the merge migration 0007 uses
for heads), or replaced by the adapter's full tensor (the heads ``modules_to_save`` holds, after the
repair migrations ran in memory). Writing streams shard by shard: memory holds one computed tensor at a time.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError, UnrecoverableError
from ckpt_migrate.core.heads import lora_modules, plan_fold
from ckpt_migrate.core.lora_init import init_of, is_replayed, replay_refusal
from ckpt_migrate.core.peft_layout import head_root, parse_lora_key, parse_module_key, strip_prefix
from ckpt_migrate.core.plan import CheckpointPlan, CheckpointState, PlannedTensor, Source, SourceKind
from ckpt_migrate.core.tuners import (
    CHECKED_FROM,
    CHECKED_UP_TO,
    Tuner,
    installed_peft,
    math_differs,
    tuner_modules,
    tuner_of,
)
from ckpt_migrate.formats.adapter import EXPORT_MANIFEST
from ckpt_migrate.formats.base_model import SHARD_INDEX, SINGLE_FILE, BaseModel
from ckpt_migrate.formats.dtypes import DTYPES
from ckpt_migrate.migrations._tuner_fold import module_fold, replay_unsupported, replayed_lora_weight

MANIFEST = EXPORT_MANIFEST
#: The migration whose ``compute`` merges one module with a non-LoRA tuner by peft's own layer code.
TUNER_MERGE = "0007_fold_double_wrapped_tuner_head"
#: Files of the base model directory that travel with the exported model (tokenizer, generation defaults).
CARRIED_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|.*\.model|"
    r"generation_config\.json|preprocessor_config\.json|chat_template\..*)$"
)
_HEAD_SUFFIXES = {"SEQ_CLS": "ForSequenceClassification", "TOKEN_CLS": "ForTokenClassification"}
#: A class name of a task head (``...ForImageClassification``, ``...ForQuestionAnswering``): nothing to resolve.
_TASK_CLASS = re.compile(r"For\w*(Classification|QuestionAnswering)$")
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True)
class ExportPlan:
    """Everything ``export`` writes, decided from headers and JSON only."""

    repair: CheckpointPlan
    base: Path
    tensors: tuple[PlannedTensor, ...]  # named as the model names them, in base order
    merged: tuple[str, ...]  # modules whose adapter delta was folded into the base weight
    from_adapter: tuple[str, ...]  # tensors the adapter holds whole (repaired heads, trained biases)
    config: dict[str, Any]
    carried: tuple[str, ...]  # base files copied as they are
    cast_to: str | None  # safetensors dtype of every floating tensor, or None to keep the base's
    shards: tuple[tuple[str, tuple[str, ...]], ...]  # file name -> tensor names


def _refuse_unsupported(repair: CheckpointPlan) -> Tuner | None:
    """The non-LoRA tuner to merge (None for LoRA), or the reason the adapter cannot be merged exactly."""
    config = repair.after.config
    if not config:
        raise UnreadableInputError("export merges an adapter, and this plan has none", repair.source)
    if config.get("peft_type") == "LORA":
        if any(".lora_embedding_" in name for name in repair.after.tensors):
            raise UnrecoverableError("export does not merge embedding LoRA (lora_embedding_A/B) yet", repair.source)
        why = replay_refusal(config)
        if why:
            raise UnrecoverableError(f"export: {why}, so the weights training ran on cannot be rebuilt", repair.source)
        why = replay_unsupported(config) if is_replayed(config) else None
        if why:
            raise UnrecoverableError(f"export: {why}", repair.source)
        return None
    tuner = tuner_of(config)
    if tuner is None or tuner.refuse:
        why = tuner.refuse if tuner else "this tool knows no merge for it"
        raise UnrecoverableError(f"export cannot merge a {config.get('peft_type')} adapter: {why}", repair.source)
    installed = installed_peft()
    if not CHECKED_FROM <= installed <= CHECKED_UP_TO:
        raise UnrecoverableError(
            f"export merges {tuner.name} with the installed peft's layer code, and peft {installed} is not among the "
            f"releases compared with the producing one ({CHECKED_FROM} to {CHECKED_UP_TO})",
            repair.source,
        )
    why = math_differs(tuner, config, installed)
    if why:
        raise UnrecoverableError(f"export: {why}", repair.source)
    return tuner


def _config(base: BaseModel, repair: CheckpointPlan, cast_to: str | None, num_labels: int | None) -> dict[str, Any]:
    """The base's config.json, with the head class the adapter was trained for and the exported dtype."""
    config = dict(base.config())
    architectures = list(config.get("architectures") or [])
    suffix = _HEAD_SUFFIXES.get(repair.after.config.get("task_type") or "")
    task_type = repair.after.config.get("task_type")
    if not architectures:  # a config AutoConfig wrote: the class transformers maps model_type to for this adapter
        model_class = base.choose(repair.after.config, repair.after.tensors).model_class
        config["architectures"] = [model_class] if model_class else []
    elif not task_type and not _TASK_CLASS.search(architectures[0]):
        # A bare backbone (ViTModel, Wav2Vec2ForPreTraining) under a classifier peft trained without a task_type:
        # the class its head modules fit, when exactly one does (transformers is imported only here).
        try:
            model_class = base.choose(repair.after.config, repair.after.tensors).model_class
        except UnreadableInputError:
            model_class = None
        config["architectures"] = [model_class] if model_class else architectures
    elif suffix and not architectures[0].endswith(suffix):
        stem = re.sub(r"(For[A-Za-z]+|Model)$", "", architectures[0])
        config["architectures"] = [stem + suffix]
    if config.get("architectures") != architectures:
        if num_labels is not None and "id2label" not in config:
            config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
            config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    if cast_to is not None:
        name = next(n for n, d in DTYPE_NAMES.items() if d == cast_to)
        config["dtype" if "dtype" in config else "torch_dtype"] = name
    return config


def plan_export(
    repair: CheckpointPlan, base: BaseModel, dtype: str = "auto", max_shard_bytes: int = 5 * 10**9
) -> ExportPlan:
    """Plan the merged model from a checkpoint's (in-memory) repair plan and its base model."""
    tuner = _refuse_unsupported(repair)
    cast_to = None if dtype == "auto" else DTYPE_NAMES[dtype]
    state = repair.after
    lora = lora_modules(state)
    tuned = tuner_modules(state, tuner) if tuner else {}
    _check_linear(base, tuner.name if tuner else "", tuned, repair)
    replayed = tuner is None and is_replayed(state.config)
    if replayed:
        _check_linear(base, f"LoRA with init_lora_weights={init_of(state.config)!r}", lora, repair)

    def is_delta(name: str) -> bool:
        return bool(parse_lora_key(name) if tuner is None else parse_module_key(name, tuner.kinds))

    whole = {strip_prefix(n): t for n, t in state.tensors.items() if strip_prefix(n) and not is_delta(n)}
    from_adapter = sorted(whole)
    planned: list[PlannedTensor] = []
    merged: set[str] = set()
    conv1d = _conv1d_modules(base, lora, state)
    for name in base.tensor_names():
        module, _, param = name.rpartition(".")
        if name in whole:
            planned.append(_renamed(whole.pop(name), name))
            continue
        weight = base.planned(name)
        if param == "weight" and module in lora and replayed:
            planned.append(_replayed_merge(state, module, lora.pop(module), base, weight))
            merged.add(module)
        elif param == "weight" and module in lora:
            folded = plan_fold(state, module, lora.pop(module), weight, conv1d=module in conv1d)
            planned.append(_renamed(folded, name))
            merged.add(module)
        elif param in ("weight", "bias") and module in tuned:
            planned.append(_tuner_merge(state, tuner, module, tuned[module], base, param, weight))
            merged.add(module)
        else:
            planned.append(weight)
    unmerged = sorted(set(lora) | (set(tuned) - merged))
    if unmerged:
        raise UnrecoverableError(
            f"adapter modules {unmerged} have no weight in the base model {base.directory}: is --base-model the "
            "model this adapter was trained on?"
        )
    planned += [_renamed(t, name) for name, t in sorted(whole.items())]  # e.g. a head the base lacks
    head_outputs = [t.shape[0] for t in planned if head_root(t.name) and t.name.endswith(".weight") and t.shape]
    num_labels = min(head_outputs) if head_outputs else None
    carried = tuple(sorted(p.name for p in base.directory.iterdir() if p.is_file() and CARRIED_FILES.match(p.name)))
    return ExportPlan(
        repair=repair,
        base=base.directory,
        tensors=tuple(planned),
        merged=tuple(sorted(merged)),
        from_adapter=tuple(from_adapter),
        config=_config(base, repair, cast_to, num_labels),
        carried=carried,
        cast_to=cast_to,
        shards=_shards(planned, cast_to, max_shard_bytes),
    )


def _check_linear(base: BaseModel, what: str, tuned: dict[str, Any], repair: CheckpointPlan) -> None:
    """peft's merge of ``what`` (a non-LoRA tuner, a replayed LoRA init) is rebuilt on a plain nn.Linear: refuse any
    other module class."""
    if not tuned:
        return
    state = repair.after
    # the architecture on the meta device: classes, no weights
    modules = dict(base.meta_model(state.config, state.tensors).named_modules())
    absent = sorted(m for m in tuned if m not in modules)
    if absent:
        raise UnrecoverableError(
            f"the base model {base.directory} has no module {', '.join(absent[:3])}: is --base-model the model this "
            "adapter was trained on?",
            repair.source,
        )
    # GPT-2's Conv1D (weight stored (in, out)) is told by class: peft 0.12 saves fan_in_fan_out false even there.
    other = {m: type(modules.get(m)).__name__ for m in tuned if type(modules.get(m)).__name__ != "Linear"}
    if other:
        listed = ", ".join(f"{m} ({cls})" for m, cls in sorted(other.items())[:3])
        raise UnrecoverableError(f"export merges {what} into nn.Linear modules only, not {listed}", repair.source)


def _tuner_merge(
    state: CheckpointState,
    tuner: Tuner | None,
    module: str,
    parts: dict[str, str],
    base: BaseModel,
    param: str,
    base_tensor: PlannedTensor,
) -> PlannedTensor:
    """``module.<param>`` merged with its tuner by the installed peft's layer (migration 0007's compute)."""
    assert tuner is not None
    bias = base.has(f"{module}.bias")
    files = (base.locate(f"{module}.weight")[0].path, base.locate(f"{module}.bias")[0].path if bias else None)
    try:
        fold = module_fold(state, tuner, module, parts, param, bias, files)
    except ValueError as exc:
        raise UnrecoverableError(f"export: {tuner.name} module {module}: {exc}", state.source_dir) from None
    formula = f"{param} of the installed peft's {tuner.name} merge: {module} + {', '.join(sorted(parts))}"
    source = Source(SourceKind.COMPUTED, base_tensor.name, migration=TUNER_MERGE, formula=formula, payload=fold)
    return PlannedTensor(base_tensor.name, base_tensor.shape, base_tensor.dtype, source)


def _replayed_merge(
    state: CheckpointState, module: str, parts: dict[str, str], base: BaseModel, base_tensor: PlannedTensor
) -> PlannedTensor:
    """``module.weight``: peft's LoRA layer replays the init on the base weight (PiSSA, OLoRA), then merges A/B."""
    bias = base.locate(f"{module}.bias")[0].path if base.has(f"{module}.bias") else None
    try:
        return replayed_lora_weight(state, module, parts, base_tensor, bias, TUNER_MERGE, base_tensor.name)
    except ValueError as exc:
        raise UnrecoverableError(f"export: {exc}", state.source_dir) from None


def _conv1d_modules(base: BaseModel, lora: dict[str, dict[str, str]], state: Any) -> set[str]:
    """LoRA modules that are transformers ``Conv1D`` (weight stored (in, out)): only a square weight needs asking."""
    square = [
        m
        for m, parts in lora.items()
        if state.tensors[parts["lora_A"]].shape[-1] == state.tensors[parts["lora_B"]].shape[0]
    ]
    if not square:
        return set()
    # the architecture on the meta device: classes, no weights
    modules = dict(base.meta_model(state.config, state.tensors).named_modules())
    return {m for m in square if type(modules.get(m)).__name__ == "Conv1D"}


def _renamed(tensor: PlannedTensor, name: str) -> PlannedTensor:
    return PlannedTensor(name, tensor.shape, tensor.dtype, tensor.source)


def output_bytes(tensor: PlannedTensor, cast_to: str | None) -> int:
    dtype = cast_to if cast_to and DTYPES[tensor.dtype].floating else tensor.dtype
    return DTYPES[dtype].size * math.prod(tensor.shape)


def _shards(tensors: list[PlannedTensor], cast_to: str | None, limit: int) -> tuple[tuple[str, tuple[str, ...]], ...]:
    groups: list[list[str]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = output_bytes(tensor, cast_to)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(tensor.name)
        size += nbytes
    if len(groups) == 1:
        return ((SINGLE_FILE, tuple(groups[0])),)
    total = len(groups)
    return tuple((f"model-{i:05d}-of-{total:05d}.safetensors", tuple(g)) for i, g in enumerate(groups, 1))


def write_export(plan: ExportPlan, target: Path, on_bytes: Any = None) -> dict[str, Any]:
    """Write the planned model into the empty directory ``target``; return its manifest."""
    from ckpt_migrate import __version__
    from ckpt_migrate.execute.tensors import TensorReader, output_tensors
    from ckpt_migrate.formats import files
    from ckpt_migrate.formats.safetensors import write_safetensors

    before = plan.repair.before
    reader = TensorReader(before.source_dir / before.weights_file)
    by_name = {t.name: t for t in plan.tensors}
    fold_with_torch = "torch" in sys.modules  # imported by the plan's meta model: its fold is the cheaper one then
    outputs: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    for filename, names in plan.shards:
        tensors = output_tensors([by_name[n] for n in names], reader, plan.cast_to, fold_with_torch)
        outputs[filename] = write_safetensors(target / filename, tensors, {"format": "pt"}, on_bytes)
        weight_map.update(dict.fromkeys(names, filename))
    if len(plan.shards) > 1:
        total = sum(output_bytes(t, plan.cast_to) for t in plan.tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        outputs[SHARD_INDEX] = files.write_new(target / SHARD_INDEX, json.dumps(index, indent=2).encode())
    outputs["config.json"] = files.write_new(target / "config.json", json.dumps(plan.config, indent=2).encode())
    for name in plan.carried:
        outputs[name] = files.copy_file(plan.base / name, target / name)
    manifest = {
        "tool": "ckpt-migrate",
        "tool_version": __version__,
        "source": str(before.source_dir.resolve()),
        "base_model": str(plan.base.resolve()),
        "repair_migrations": list(plan.repair.migrations),
        "peft_type": plan.repair.after.config.get("peft_type"),
        "merged_modules": list(plan.merged),
        "losses": list(plan.repair.losses),
        "tensors_from_adapter": list(plan.from_adapter),
        "files_copied_from_base": list(plan.carried),
        "outputs_sha256": dict(sorted(outputs.items())),
    }
    files.write_new(target / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
