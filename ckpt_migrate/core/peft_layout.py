"""How peft names adapter tensors and matches config entries to modules, per producing version."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError

PREFIX = "base_model.model."
LORA_KINDS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
WRAPPER_SEGMENTS = ("original_module", "modules_to_save")
#: Top-level module names of Hugging Face task heads whose weights are freshly initialised for fine-tuning: every
#: top-level module with parameters of a transformers sequence/token/image/audio classification or question
#: answering class outside its backbone (tests/test_head_names.py builds them all and fails on a missing name).
#: A list, not transformers' classes at run time: planning and dry runs import neither torch nor transformers.
HEAD_NAMES = frozenset(
    {
        "score",
        "classifier",
        "classification_head",
        "qa_outputs",
        "pre_classifier",
        "sequence_summary",
        "qa_classifier",
        "projector",  # audio classifiers (Wav2Vec2, HuBERT, WavLM, ...): projector + classifier
        "answer_head",  # LXMERT question answering
        "head",  # SwiftFormer image classification (head + dist_head)
        "dist_head",
        "logits_proj",  # XLNet sequence classification
        "splinter_qass",  # Splinter question answering
        "dense",  # EuroBERT sequence classification (dense + classifier)
        "fc",  # HGNetV2, TextNet image classification
        "last_convolution",  # PP-LCNet image classification
    }
)
#: Head modules of a few task classes whose names bare backbones use for their own top-level modules (BertModel's
#: ``pooler``, LlamaModel's ``norm``, ViTModel's ``layernorm``): as heads they would misjudge adapters of bare
#: models, so they are not listed. DeBERTa's top-level ``pooler``, PoolFormer's ``norm`` and CvT's ``layernorm``
#: are therefore body modules here.
BACKBONE_NAMES_OF_SOME_HEADS = frozenset({"pooler", "norm", "layernorm"})
#: A LoRA tensor; peft strips the saved adapter's own name from keys, another adapter's name stays (``.default``).
_LORA_KEY = re.compile(
    rf"^(?P<module>.+)\.(?P<kind>{'|'.join(LORA_KINDS)})(?:\.(?!weight$)(?P<adapter>[^.]+))?(?:\.weight)?$"
)


@dataclass(frozen=True)
class LoraTensor:
    """``adapter``: None for the LoRA of the saved adapter itself, else the other adapter named in the key."""

    module: str
    kind: str
    adapter: str | None = None


def strip_prefix(name: str) -> str | None:
    """``base_model.model.score.weight`` -> ``score.weight``; None for a name outside the peft model."""
    return name[len(PREFIX) :] if name.startswith(PREFIX) else None


def short_name(name: str) -> str:
    """A tensor name for people: without the ``base_model.model.`` prefix when it has one."""
    return name.removeprefix(PREFIX)


def parse_lora_key(name: str) -> LoraTensor | None:
    """``base_model.model.score.lora_A.weight`` -> ``LoraTensor("score", "lora_A")``.

    ``score.lora_A.default.weight`` (in the file of another adapter) -> ``LoraTensor("score", "lora_A", "default")``.
    """
    inner = strip_prefix(name)
    match = _LORA_KEY.match(inner) if inner is not None else None
    return LoraTensor(match["module"], match["kind"], match["adapter"]) if match else None


@lru_cache(maxsize=64)
def _module_key(kinds: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(rf"^(?P<module>.+)\.(?P<kind>{'|'.join(map(re.escape, kinds))})$")


def parse_module_key(name: str, kinds: tuple[str, ...]) -> LoraTensor | None:
    """``base_model.model.score.hada_w1_a`` -> ``LoraTensor("score", "hada_w1_a")`` for one of a tuner's ``kinds``.

    A kind is everything after the module path, dots included (``ln_tuning_layers.weight``).
    """
    inner = strip_prefix(name)
    match = _module_key(kinds).match(inner) if inner is not None else None
    return LoraTensor(match["module"], match["kind"]) if match else None


def wrapper_root(module: str) -> str | None:
    """The module a peft ModulesToSaveWrapper wrapped, if ``module`` lies inside one."""
    parts = module.split(".")
    for index, part in enumerate(parts):
        if part in WRAPPER_SEGMENTS and index > 0:
            return ".".join(parts[:index])
    return None


def head_root(module: str) -> str | None:
    """The task head ``module`` belongs to, judged by the head's top-level attribute name."""
    first = module.split(".", 1)[0]
    return first if first in HEAD_NAMES else None


def is_legacy_config(config: dict[str, Any]) -> bool:
    """peft wrote ``peft_version`` into configs only after 0.12; its pattern matching changed too."""
    return "peft_version" not in config


def _pattern_matches(pattern: str, module: str, legacy: bool) -> bool:
    try:
        if legacy:
            return re.match(rf".*\.{pattern}$", module) is not None
        return re.match(rf"(.*\.)?({pattern})$", module) is not None
    except re.error as exc:
        raise UnreadableInputError(f"rank_pattern/alpha_pattern key {pattern!r} is not a valid regex ({exc})") from exc


def rank_and_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    """The ``r`` and ``lora_alpha`` peft used for ``module``, honouring rank_pattern/alpha_pattern.

    peft <= 0.12 looks up one key, the first pattern of either dict matching ``.*\\.{key}$``
    (else the module name itself), in both dicts; later versions look up each dict separately.
    """
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    legacy = is_legacy_config(config)

    def find(keys: list[str]) -> str:
        return next((k for k in keys if _pattern_matches(k, module, legacy)), module)

    if legacy:
        key = find(list(rank_pattern) + list(alpha_pattern))
        rank_key = alpha_key = key
    else:
        rank_key, alpha_key = find(list(rank_pattern)), find(list(alpha_pattern))
    return rank_pattern.get(rank_key, config["r"]), alpha_pattern.get(alpha_key, config["lora_alpha"])


def lycoris_rank_and_alpha(config: dict[str, Any], module: str, alpha_key: str) -> tuple[int, float] | None:
    r"""The ``r`` and alpha peft's LyCORIS tuners (LoHa, LoKr) used for ``module``; None when the release is unknown.

    peft <= 0.14 takes the first key of rank_pattern then alpha_pattern matching ``(.*\.)?{key}$`` (else the
    module's last name) and looks it up in both dicts; >= 0.15 looks each dict up separately with
    ``(.*\.)?({key})$`` (else the full name). Configs without ``exclude_modules`` are from <= 0.13; with
    ``peft_version`` from >= 0.18; between, both rules must agree.
    """
    try:
        if "exclude_modules" not in config:
            return lycoris_lookup(config, module, alpha_key, legacy=True)
        if "peft_version" in config:
            return lycoris_lookup(config, module, alpha_key, legacy=False)
        legacy = lycoris_lookup(config, module, alpha_key, legacy=True)
        current = lycoris_lookup(config, module, alpha_key, legacy=False)
    except re.error as exc:
        raise UnreadableInputError(f"rank_pattern/alpha_pattern key is not a valid regex ({exc})") from exc
    return legacy if legacy == current else None


def lycoris_lookup(config: dict[str, Any], module: str, alpha_key: str, legacy: bool) -> tuple[int, float]:
    """``module``'s r and alpha by the rule of peft <= 0.14 (``legacy``) or of peft >= 0.15 (see above)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if legacy:
        keys = [k for k in [*rank_pattern, *alpha_pattern] if re.match(rf"(.*\.)?{k}$", module)]
        rank_key = alpha_key_ = keys[0] if keys else module.rsplit(".", 1)[-1]
    else:
        rank_key = next((k for k in rank_pattern if re.match(rf"(.*\.)?({k})$", module)), module)
        alpha_key_ = next((k for k in alpha_pattern if re.match(rf"(.*\.)?({k})$", module)), module)
    return rank_pattern.get(rank_key, config["r"]), alpha_pattern.get(alpha_key_, config[alpha_key])


def lora_scale(config: dict[str, Any], module: str) -> float:
    rank, alpha = rank_and_alpha(config, module)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def pattern_applies(config: dict[str, Any], pattern: str, module: str) -> bool:
    """Whether a rank/alpha pattern key affects ``module`` (matched, or equal to its name)."""
    return pattern == module or _pattern_matches(pattern, module, is_legacy_config(config))


def target_matches(target_modules: Any, module: str) -> bool:
    """peft's target_modules rule: regex full match for a string, suffix match for a list."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return True
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def modules_to_save_matches(modules_to_save: list[str] | None, module: str) -> bool:
    """peft wraps every module whose name ends with an entry (plain suffix, as ``pre_classifier``)."""
    return any(module.endswith(entry) for entry in modules_to_save or [])


def rewrite_target_modules(target_modules: Any, body_modules: set[str], head_modules: set[str]) -> Any:
    """target_modules that still hit every LoRA module of the body and nothing inside a head.

    Keeps the original list minus head-only entries when that is enough; otherwise spells out
    the body modules that carry LoRA tensors.
    """
    if isinstance(target_modules, list):
        kept = [t for t in target_modules if not any(target_matches([t], h) for h in head_modules)]
        if all(target_matches(kept, m) for m in body_modules):
            return kept
    return sorted(body_modules)
