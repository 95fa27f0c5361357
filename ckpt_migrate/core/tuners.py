"""The peft tuners besides LoRA whose layers the #2027 bug put inside a classification head, as data.

For each ``peft_type``: the tensors its layer saves per module (``kinds``), the model-level tensors
(``shared``), why a head carrying it cannot be folded (``refuse``), and the releases where its layer
computes something else than before (``changes``). A change is located by a config key every release
from then on writes (``marker``): peft saves every field of its config class, so the absence of that
key proves an older producer. Tables read from the peft 0.8.0-0.21.2 wheels (tuners/*/layer.py and
config.py); ``CHECKED_UP_TO`` is the newest release compared.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from packaging.version import Version

from ckpt_migrate.core.peft_layout import (
    WRAPPER_SEGMENTS,
    parse_lora_key,
    parse_module_key,
    strip_prefix,
    wrapper_root,
)
from ckpt_migrate.core.plan import CheckpointState

CHECKED_UP_TO = Version("0.21.2")
#: The oldest installed peft whose layer code computes the folds (the tables compare 0.12.0 to CHECKED_UP_TO).
CHECKED_FROM = Version("0.12.0")


@dataclass(frozen=True)
class MathChange:
    """From ``release`` on, the tuner's layer computes ``what`` differently; ``marker`` proves a newer producer."""

    release: str
    marker: str
    what: str
    moot: Callable[[dict[str, Any]], bool] | None = None  # the change makes no difference for this config


@dataclass(frozen=True)
class Tuner:
    peft_type: str
    name: str
    kinds: tuple[str, ...]
    shared: tuple[str, ...] = ()  # saved once as base_model.<kind>; a wrapped head's copy holds its own
    refuse: str = ""
    changes: tuple[MathChange, ...] = ()
    alpha: str = ""  # LyCORIS: the config field rank_pattern/alpha_pattern override with r
    derived: tuple[str, ...] = ()  # kinds peft saves only inside a wrapper copy; elsewhere the layer sets them


def _lokr_unscaled(config: dict[str, Any]) -> bool:
    """Every module's alpha is its rank (alpha/r = 1) under every release's pattern rules: alpha == r, and
    alpha_pattern holds the entries of rank_pattern in the same order (both rules then pick the same key)."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    return config.get("alpha") == config.get("r") and list(alpha_pattern.items()) == list(rank_pattern.items())


TUNERS: dict[str, Tuner] = {
    t.peft_type: t
    for t in (
        Tuner(
            "LOHA", "LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"), alpha="alpha"
        ),
        Tuner(
            "LOKR",
            "LoKr",
            ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
            alpha="alpha",
            changes=(
                MathChange(
                    "0.14.0",
                    "rank_dropout_scale",
                    "peft >= 0.14 multiplies the LoKr delta kron(w1, w2) by alpha/r, which earlier releases ignore",
                    moot=_lokr_unscaled,
                ),
            ),
        ),
        # ranknum: not saved for body modules; peft's layer sets it to the rank it is built (or resized) with
        Tuner("ADALORA", "AdaLoRA", ("lora_A", "lora_B", "lora_E", "ranknum"), derived=("ranknum",)),
        Tuner("IA3", "IA3", ("ia3_l",)),
        Tuner("VERA", "VeRA", ("vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B"), shared=("vera_A", "vera_B")),
        Tuner("BOFT", "BOFT", ("boft_R", "boft_s", "boft_P")),
        Tuner("HRA", "HRA", ("hra_u",)),
        Tuner("FOURIERFT", "FourierFT", ("fourierft_spectrum",)),
        Tuner("LN_TUNING", "LN Tuning", ("ln_tuning_layers.weight", "ln_tuning_layers.bias")),
        Tuner(
            "OFT",
            "OFT",
            ("oft_r",),
            changes=(
                MathChange(
                    "0.14.0",
                    "oft_block_size",
                    "OFT was reparametrised in peft 0.14 (oft_r, rotating the output, became oft_R, rotating the "
                    "input; peft >= 0.14 refuses adapters of earlier releases)",
                ),
            ),
        ),
        Tuner(
            "POLY",
            "Poly",
            ("poly_lora_A", "poly_lora_B", "poly_router.module_logits"),
            refuse="Poly mixes its LoRA skills per example by task_ids, so the trained head has no single weight "
            "(and peft has no merge for it)",
        ),
    )
}


def tuner_of(config: dict[str, Any]) -> Tuner | None:
    """The tuner an adapter config names; None for LoRA (migrations 0001/0002) or a type this table lacks."""
    return TUNERS.get(config.get("peft_type", ""))


def tuner_heads(state: CheckpointState) -> set[str]:
    """Heads a ModulesToSaveWrapper wrapped while a (non-LoRA) tuner's layer sat inside them.

    Known tuners are recognised by their tensor kinds; for a peft_type this table lacks, any tensor
    saved from inside a wrapper's ``original_module`` copy betrays a tuner layer there.
    """
    if state.config.get("peft_type", "LORA") == "LORA":
        return set()
    tuner = tuner_of(state.config)
    heads = set()
    for name in state.tensors:
        if tuner is not None:
            parsed = parse_module_key(name, tuner.kinds)
            root = wrapper_root(parsed.module) if parsed else None
        else:
            module = strip_prefix(name) or ""
            root = wrapper_root(module) if f".{WRAPPER_SEGMENTS[0]}." in f".{module}" else None
        if root is not None:
            heads.add(root)
    return heads


def tuner_modules(state: CheckpointState, tuner: Tuner, under: str | None = None) -> dict[str, dict[str, str]]:
    """Modules carrying the tuner's tensors outside any wrapper copy: module path -> {kind: tensor name}."""
    modules: dict[str, dict[str, str]] = {}
    for name in state.tensors:
        parsed = parse_module_key(name, tuner.kinds)
        if parsed is None or wrapper_root(parsed.module) is not None:
            continue
        if under is not None and not (parsed.module == under or parsed.module.startswith(under + ".")):
            continue
        modules.setdefault(parsed.module, {})[parsed.kind] = name
    return modules


def lokr_alpha_rewrite_pending(config: dict[str, Any]) -> bool:
    """A LoKr config written before peft 0.14 whose alphas are not all their ranks: peft >= 0.14 would scale its delta
    by alpha/r, which its producer never did. Migration 0011 sets alpha = r; the folds (0007, 0010) wait for it."""
    change = TUNERS["LOKR"].changes[0]
    return config.get("peft_type") == "LOKR" and change.marker not in config and not _lokr_unscaled(config)


def math_differs(tuner: Tuner, config: dict[str, Any], release: Version) -> str | None:
    """Why the layer code of peft ``release`` computes something else than the producer of ``config`` did, if so."""
    for change in tuner.changes:
        newer_producer = change.marker in config
        if newer_producer != (release >= Version(change.release)) and not (change.moot and change.moot(config)):
            side, has = (">=", "has") if newer_producer else ("<", "has no")
            return (
                f"this {tuner.name} adapter was written by peft {side} {change.release} (its config {has} "
                f"{change.marker!r}) and {change.what}, so peft {release} computes another model than the trained one; "
                f"repair it with peft {side} {change.release} installed and load it with such a release"
            )
    return None


def installed_peft() -> Version:
    from ckpt_migrate.core.releases import target_release

    return target_release("peft", None, CHECKED_UP_TO)


def ia3_feedforward(config: dict[str, Any], module: str) -> bool:
    """IA3's rule (peft 0.8-0.21): regex full match for a string, plain suffix for a list."""
    modules = config.get("feedforward_modules") or []
    if isinstance(modules, str):
        return re.fullmatch(modules, module) is not None
    return any(module.endswith(entry) for entry in modules)


def foreign_tuner(config: dict[str, Any], names: Iterable[str]) -> str | None:
    """The peft_type whose tensors the adapter holds when it holds none of the type its config names."""

    def holds(peft_type: str) -> bool:
        if peft_type == "LORA":
            return any(parse_lora_key(n) for n in names)
        return any(parse_module_key(n, TUNERS[peft_type].kinds) for n in names)

    own = config.get("peft_type")
    names = list(names)
    if own not in ("LORA", *TUNERS) or holds(own):
        return None
    return next((t for t in ("LORA", *TUNERS) if holds(t)), None)
