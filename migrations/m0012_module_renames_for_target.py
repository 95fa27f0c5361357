"""Rename the adapter's modules to the names the target transformers gives them (ViT's attention in 5.x, …).

transformers 5.x renamed the modules of some architectures: ViT's ``vit.encoder.layer.0.attention.attention.query``
is ``vit.layers.0.attention.q_proj`` there (``scripts/sweep_module_renames.py`` lists 24 model types of 4.44.2 whose
Linear paths change in 5.24.0: ViT and its kin, DINOv2, Swin, BEiT, CLIP/SigLIP vision towers, RT-DETR, MoE experts,
…). transformers converts a 4.x checkpoint of the model itself when loading it (``conversion_mapping.py``), but
peft 0.21 converts an adapter's tensor names only for model types that have a mapping of their own (not ``vit``)
and its ``target_modules`` only for MoE models: a 4.x ViT adapter fails there with ``NoMatchingPeftModuleError``.

The renames are transformers' own: the base model (``--base-model``) is built on the meta device with the installed
transformers and every adapter module path is renamed by ``get_model_conversion_mapping`` + ``rename_source_key``,
the calls transformers makes for each checkpoint key it loads. Tensor names, ``target_modules``,
``modules_to_save`` and rank/alpha patterns follow. A module the target model lacks and the mapping does not rename,
or whose weights the mapping fuses (MoE experts: tensor operations, not a rename), is refused (exit 4).

Planning needs transformers (and torch, for the meta model) only for model types the sweep did not find unchanged
(:data:`UNCHANGED`, from ``scripts/sweep_module_renames.py`` over 4.44.2 and 5.24.0): other dry runs import
neither. The renames are read from the installed release, so they are planned only when it is the target; a
target of transformers 4.x (``--target-transformers 4.44.2``) keeps the 4.x names. Without a base model the
architecture is unknown and nothing is renamed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from packaging.version import Version

from ckpt_migrate.core.errors import CkptMigrateError
from ckpt_migrate.core.heads import is_lora
from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.peft_layout import (
    PREFIX,
    modules_to_save_matches,
    parse_lora_key,
    parse_module_key,
    pattern_applies,
    strip_prefix,
    target_matches,
)
from ckpt_migrate.core.plan import CheckpointState, PlannedTensor
from ckpt_migrate.core.releases import target_release
from ckpt_migrate.core.text import listed
from ckpt_migrate.core.tuners import tuner_of

ID = "0012_module_renames_for_target"
SUMMARY = "Rename adapter modules to the target transformers' module names (ViT's attention and MLP in 5.x, ...)"
CAUSED_BY = (
    "transformers 5.x renamed modules of ViT, DINOv2, Swin, BEiT, CLIP/SigLIP vision and others; it converts 4.x "
    "checkpoints of the model on load (conversion_mapping.py), peft 0.21 converts adapters only where the model "
    "type has a mapping of its own (not vit) and target_modules only for MoE models"
)
#: The adapter's module names change, and Trainer's optimizer state holds its parameters by position.
CHANGES_TRAINABLE_PARAMETERS = True

#: The first transformers release whose conversion mapping renames modules of 4.x checkpoints.
RENAMES_SINCE = Version("5.0.0")
#: The newest release the gate tables below were read from.
TABLE_CHECKED_UP_TO = Version("5.24.0")
#: Model types whose 4.44.2 parameter names all exist unchanged in 5.24.0 (scripts/sweep_module_renames.py): planning
#: them needs no transformers import.
UNCHANGED = frozenset(
    {
        "albert", "align", "bart", "bert", "bert-generation", "big_bird", "bigbird_pegasus", "biogpt", "bit",
        "blenderbot", "blenderbot-small", "blip", "blip-2", "bloom", "bridgetower", "bros", "camembert", "canine",
        "chinese_clip", "clap", "clip", "clipseg", "clvp", "codegen", "cohere", "convbert", "cpmant", "ctrl", "cvt",
        "data2vec-audio", "data2vec-text", "data2vec-vision", "deberta", "deberta-v2", "decision_transformer",
        "distilbert", "dpr", "dpt", "efficientnet", "electra", "ernie", "falcon", "flaubert", "flava", "fnet",
        "focalnet", "fsmt", "gemma", "gemma2", "git", "glpn", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neox",
        "gpt_neox_japanese", "gptj", "groupvit", "hiera", "hubert", "ibert", "idefics", "idefics2", "imagegpt",
        "jetmoe", "kosmos-2", "layoutlm", "layoutlmv3", "lilt", "llama", "longformer", "longt5", "luke", "lxmert",
        "m2m_100", "mamba", "marian", "markuplm", "maskformer-swin", "mbart", "megatron-bert", "mgp-str", "mistral",
        "mobilebert", "mobilenet_v1", "mobilenet_v2", "mobilevit", "mobilevitv2", "mpnet", "mpt", "mra", "mt5",
        "mvp", "nllb-moe", "nystromformer", "openai-gpt", "opt", "owlv2", "owlvit", "patchtsmixer", "patchtst",
        "pegasus", "pegasus_x", "persimmon", "phi", "phi3", "plbart", "poolformer", "pvt", "pvt_v2", "qwen2",
        "recurrent_gemma", "regnet", "rembert", "resnet", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
        "rwkv", "sam", "seamless_m4t", "seamless_m4t_v2", "seggpt", "siglip", "speecht5", "splinter", "stablelm",
        "starcoder2", "swiftformer", "switch_transformers", "t5", "tapas", "timesformer", "udop", "umt5",
        "unispeech", "unispeech-sat", "univnet", "vilt", "visual_bert", "vitdet", "vits", "wav2vec2",
        "wav2vec2-bert", "wav2vec2-conformer", "wavlm", "whisper", "xclip", "xglm", "xlm", "xlm-roberta",
        "xlm-roberta-xl", "xlnet", "xmod", "yoso",
    }
)  # fmt: skip
#: Model types whose 4.44.2 Linear module paths 5.24.0 renames or drops (the same sweep).
RENAMED = frozenset(
    {
        "altclip", "audio-spectrogram-transformer", "beit", "chinese_clip_vision_model", "clip_vision_model",
        "convnext", "convnextv2", "dinov2", "fastspeech2_conformer", "grounding-dino", "jamba", "mask2former",
        "maskformer", "mixtral", "oneformer", "qwen2_moe", "rt_detr", "segformer", "siglip_vision_model", "swin",
        "vit", "vit_mae", "vit_msn", "vivit",
    }
)  # fmt: skip


@dataclass(frozen=True)
class TargetModel:
    """The base architecture as the target transformers builds it, and how it renames a 4.x checkpoint key."""

    architecture: str
    modules: frozenset[str]
    parameters: frozenset[str]
    rename: Callable[[str], tuple[str, str | None]]  # key -> (its name there, the fusing converter's pattern or None)


_MODELS: dict[tuple[Path, str, Any], TargetModel] = {}


def installed_transformers() -> Version | None:
    """The installed release, from package metadata (nothing imported)."""
    try:
        return Version(version("transformers"))
    except PackageNotFoundError:
        return None


def target_transformers(context: Context) -> Version:
    return target_release("transformers", context.options.target_transformers, TABLE_CHECKED_UP_TO)


def _model_type(context: Context) -> str | None:
    if context.base_model is None:
        return None
    try:
        model_type = context.base_model.config().get("model_type")
    except CkptMigrateError:
        return None  # no config.json: the architecture is unknown (the steps that need the base say so)
    return model_type if isinstance(model_type, str) else None


def _in_scope(state: CheckpointState, context: Context) -> str | None:
    """The base's model type when the target may rename its modules; None when nothing can change."""
    if state.weights_file is None or target_transformers(context) < RENAMES_SINCE:
        return None
    model_type = _model_type(context)
    if model_type is None or (model_type in UNCHANGED and target_transformers(context) <= TABLE_CHECKED_UP_TO):
        return None
    return model_type


def target_model(context: Context, state: CheckpointState) -> TargetModel:
    """The base model's architecture built by the installed transformers (meta device) and its key renamer.

    The class is the base's ``architectures``, else the one its ``model_type`` has for this adapter's task.
    """
    from ckpt_migrate.formats.architecture import top_level_modules

    assert context.base_model is not None
    task = (state.config.get("task_type"), frozenset(top_level_modules(state.tensors)))
    key = (context.base_model.directory, str(installed_transformers()), task)
    if key not in _MODELS:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        model = context.base_model.meta_model(state.config, state.tensors)
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = model.state_dict()
        prefix = model.base_model_prefix

        def rename(name: str) -> tuple[str, str | None]:
            return rename_source_key(name, renamings, converters, prefix, meta)

        modules = frozenset(name for name, _ in model.named_modules())
        _MODELS[key] = TargetModel(type(model).__name__, modules, frozenset(meta), rename)
    return _MODELS[key]


@dataclass
class Renames:
    """What the target makes of the adapter: module and parameter renames, and what it cannot map."""

    modules: dict[str, str]  # tuned module -> its path there (every tuned module, renamed or not)
    parameters: dict[str, str]  # plain (modules_to_save) parameter -> its name there
    missing: list[str]
    fused: list[str]

    @property
    def changed(self) -> bool:
        return any(a != b for a, b in (*self.modules.items(), *self.parameters.items()))


def _tuned_module(name: str, state: CheckpointState) -> str | None:
    """The module a tuner tensor belongs to; None for a plain parameter (a modules_to_save copy)."""
    if is_lora(state):
        parsed = parse_lora_key(name)
        return parsed.module if parsed else None
    tuner = tuner_of(state.config)
    parsed_module = parse_module_key(name, tuner.kinds) if tuner else None
    return parsed_module.module if parsed_module else None


def renames(state: CheckpointState, model: TargetModel) -> Renames:
    result = Renames({}, {}, [], [])
    for name in sorted(state.tensors):
        inner = strip_prefix(name)
        if inner is None:
            continue  # model-level tuner tensors (VeRA's base_model.vera_A) name no module
        module = _tuned_module(name, state)
        if module is not None and module not in result.modules:
            renamed, fusing = model.rename(f"{module}.weight")
            new = renamed.removesuffix(".weight") if renamed.endswith(".weight") else renamed
            if fusing is not None:
                result.fused.append(module)
            elif new not in model.modules:
                result.missing.append(module)
            result.modules[module] = new
        elif module is None:
            renamed, fusing = model.rename(inner)
            if fusing is not None:
                result.fused.append(inner)
            elif renamed not in model.parameters:
                result.missing.append(inner)
            result.parameters[inner] = renamed
    return result


def detect(state: CheckpointState, context: Context) -> bool:
    model_type = _in_scope(state, context)
    if model_type is None:
        return False
    if installed_transformers() != target_transformers(context):
        return model_type in RENAMED  # plan refuses: the target's renames cannot be read here
    found = renames(state, target_model(context, state))
    return found.changed or bool(found.missing or found.fused)


def _new_name(name: str, found: Renames, state: CheckpointState) -> str:
    inner = strip_prefix(name) or ""
    module = _tuned_module(name, state)
    if module is None:
        return PREFIX + found.parameters[inner]
    return PREFIX + found.modules[module] + inner[len(module) :]


def _target_modules(config: dict[str, Any], tuned: set[str], model: TargetModel) -> Any:
    """target_modules that hit exactly the renamed tuned modules there: the old entries that still match and the
    new leaf names when that is exact, else the full paths."""
    old = config.get("target_modules")
    if isinstance(old, str):
        if {m for m in model.modules if re.fullmatch(old, m)} == tuned:
            return old
        entries: list[str] = []
    else:
        entries = [e for e in old or [] if any(target_matches([e], m) for m in tuned)]
    candidate = sorted(set(entries) | {m.rsplit(".", 1)[-1] for m in tuned if not target_matches(entries, m)})
    if {m for m in model.modules if target_matches(candidate, m)} == tuned:
        return candidate
    return sorted(tuned)


def _modules_to_save(entries: list[str], found: Renames) -> tuple[list[str], list[str]]:
    """(the entries for the renamed saved modules, entries that cannot be mapped)."""
    result, unmapped = [], []
    for entry in entries:
        new_paths, mapped = set(), True
        for old, new in found.parameters.items():
            parts = old.split(".")
            holder = next((i for i in range(1, len(parts)) if modules_to_save_matches([entry], ".".join(parts[:i]))), 0)
            if not holder:
                continue
            suffix = "." + ".".join(parts[holder:])
            mapped = mapped and new.endswith(suffix)
            new_paths.add(new.removesuffix(suffix))
        if not mapped:
            unmapped.append(entry)
        elif any(not modules_to_save_matches([entry], path) for path in new_paths):
            result += sorted(new_paths)
        else:
            result.append(entry)
    return result, unmapped


def _patterns(config: dict[str, Any], key: str, found: Renames) -> dict[str, Any] | None:
    """rank_pattern / alpha_pattern with every pattern a rename breaks replaced by the full paths it applied to."""
    patterns = config.get(key)
    if not patterns:
        return patterns
    result: dict[str, Any] = {}
    for pattern, value in patterns.items():
        applied = [m for m in found.modules if pattern_applies(config, pattern, m)]
        if all(pattern_applies(config, pattern, found.modules[m]) for m in applied):
            result[pattern] = value
        else:
            result.update({found.modules[m]: value for m in applied})
    return result


def plan(state: CheckpointState, context: Context) -> None:
    target, installed = target_transformers(context), installed_transformers()
    model_type = _in_scope(state, context)
    if installed != target:
        state.unrecoverable.append(
            f"transformers {target} may rename modules of {model_type} models and its renames are read from the "
            f"installed release ({installed or 'none'}): install transformers {target} to plan for it, or pass "
            f"--target-transformers {installed or '4.44.2'}"
        )
        return
    model = target_model(context, state)
    found = renames(state, model)
    why = (
        f"modules of this adapter that transformers {target}'s {model.architecture} lacks and its conversion "
        f"mapping does not rename: {listed(found.missing)}"
        if found.missing
        else f"modules whose weights transformers {target} fuses (a tensor operation, not a rename): "
        f"{listed(found.fused)}"
        if found.fused
        else ""
    )
    unmapped: list[str] = []
    config = state.config
    if not why:
        config_mts, unmapped = _modules_to_save(list(config.get("modules_to_save") or []), found)
        if unmapped:
            why = f"modules_to_save entries {listed(unmapped)} cannot be mapped to transformers {target}'s names"
        elif config.get("layers_to_transform") is not None or config.get("exclude_modules"):
            why = "layers_to_transform / exclude_modules name modules by their 4.x paths, which this tool cannot map"
    if why:
        state.unrecoverable.append(f"{why}: peft cannot load the adapter there; target transformers 4.x instead")
        return
    renamed = {m: n for m, n in found.modules.items() if m != n}
    for name in sorted(state.tensors):
        new_name = _new_name(name, found, state) if strip_prefix(name) is not None else name
        if new_name != name:
            tensor = state.tensors[name]
            state.remove_tensor(name)
            state.add_tensor(PlannedTensor(new_name, tensor.shape, tensor.dtype, tensor.source))
    tuned = set(found.modules.values())
    if tuned and renamed:
        config["target_modules"] = _target_modules(config, tuned, model)
    if config.get("modules_to_save"):
        config["modules_to_save"] = config_mts
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            config[key] = _patterns(config, key, found)
    examples = [f"{old} -> {new}" for old, new in sorted(renamed.items())]
    state.warn(
        f"modules renamed to transformers {target}'s {model.architecture} names ({len(renamed)}): {listed(examples, 3)}"
    )
