"""How a tuner-wrapped head module is folded, and when it is refused: the policy of migrations 0002, 0007 and 0010.

:mod:`ckpt_migrate.core.tuners` says what each tuner saves and where its math changed (data). Here is what these
migrations (and ``export``, which merges the same way) decide from it: which heads cannot be written as plain weights
(:func:`fold_refusal`, :func:`replay_unsupported`), the config of a model holding one module that peft's own layer is
built from (:func:`holder_config`), the planned fold that a migration's ``compute`` executes (:class:`TunerFold`, by
:mod:`ckpt_migrate.migrations._tuner_merge`), and the IA3 config edit that keeps a repaired adapter loadable
(:func:`ia3_loadable`). Not a migration (no ``mNNNN_`` name): a module of the migrations that share it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import Version

from ckpt_migrate.core import tuners
from ckpt_migrate.core.peft_layout import lycoris_rank_and_alpha, rank_and_alpha
from ckpt_migrate.core.plan import CheckpointState, PlannedTensor, Source, SourceKind
from ckpt_migrate.core.tuners import CHECKED_FROM, CHECKED_UP_TO, TUNERS, Tuner, ia3_feedforward, math_differs


@dataclass(frozen=True)
class TunerFold:
    """What computes one parameter of a folded head module: peft's own layer for ``peft_type``, on that module alone.

    ``config``: JSON of the tuner config for a model holding only this module (see :func:`holder_config`);
    ``tensors``: (kind, adapter tensor name) of the trained copy; ``weight``/``bias``: its trained base parameters,
    read from the adapter, or from the base model files ``weight_file``/``bias_file`` when given (export).
    """

    peft_type: str
    module: str
    param: str  # "weight" or "bias": which parameter of the merged module this planned tensor is
    config: str
    tensors: tuple[tuple[str, str], ...]
    weight: str
    bias: str = ""
    weight_file: Path | None = None
    bias_file: Path | None = None


RETRAIN = "retrain with the head in modules_to_save and not in target_modules"


def fold_refusal(
    config: dict[str, Any], target_peft: str | None, tuner: Tuner | None, heads: set[str], how: str
) -> str | None:
    """Why heads ``how`` (e.g. "wrapped twice by") a tuner cannot be written as plain weights every target
    computes as trained: a method without a merge, an installed or target peft computing another layer."""
    from ckpt_migrate.core.releases import target_release

    names = ", ".join(sorted(heads))
    if tuner is None:
        known = ", ".join(["LORA", *(t for t in TUNERS if not TUNERS[t].refuse)])
        return (
            f"head {names} is {how} a {config.get('peft_type')!r} adapter, which this tool cannot fold "
            f"(it folds {known}): {RETRAIN}"
        )
    if tuner.refuse:
        return f"head {names} carries {tuner.name}: {tuner.refuse}; {RETRAIN}"
    installed, target = tuners.installed_peft(), target_release("peft", target_peft, CHECKED_UP_TO)
    if not CHECKED_FROM <= installed <= CHECKED_UP_TO:
        return (
            f"the {tuner.name} head {names} is folded with the installed peft's own layer code, and peft {installed} "
            f"is not among the releases compared with the producing one ({CHECKED_FROM} to {CHECKED_UP_TO})"
        )
    for release, role in ((installed, "the installed release, which would compute the fold"), (target, "the target")):
        why = math_differs(tuner, config, release)
        if why:
            return f"{why} (peft {release} is {role}), or {RETRAIN}"
    if tuner.peft_type == "ADALORA":
        pattern = config.get("rank_pattern") or {}
        in_heads = [k for k in pattern if any(k == h or k.startswith(h + ".") for h in heads)]
        if in_heads:
            return f"AdaLoRA rank_pattern names head modules ({', '.join(in_heads)}), which no known peft writes"
        if target >= Version("0.15.0") and not _adalora_schedule_ok(config):
            return (
                "peft >= 0.15 refuses this AdaLoRA config (ValueError: total_step must be > 0 and leave a budgeting "
                f"phase after tinit/tfinal; here total_step={config.get('total_step')}); repair it for --target-peft "
                "< 0.15, or set total_step (it only schedules AdaLoRA's rank budget in training) and repair again"
            )
    return None


def _adalora_schedule_ok(config: dict[str, Any]) -> bool:
    total, tinit, tfinal = config.get("total_step"), config.get("tinit") or 0, config.get("tfinal") or 0
    return isinstance(total, int) and total > 0 and tinit < total - tfinal


#: Config keys that place a tuner in a whole model; a model holding one module gets them from holder_config.
_PLACEMENT = ("target_modules", "modules_to_save", "layers_to_transform", "layers_pattern", "exclude_modules")


def holder_config(tuner: Tuner, config: dict[str, Any], module: str, feedforward: bool) -> dict[str, Any]:
    """The saved config, targeting only ``module`` with the values the producing release gave it.

    Per-module values peft would look up by pattern are resolved here with the producer's rules
    (LyCORIS r/alpha); IA3's feedforward decision is passed in (``feedforward``); AdaLoRA's training
    schedule and budget (rank_pattern) do not enter a layer's computation and get neutral values.
    """
    holder = {k: v for k, v in config.items() if k not in _PLACEMENT}
    holder.update(target_modules=[module], task_type=None, inference_mode=True)
    if tuner.alpha:
        resolved = lycoris_rank_and_alpha(config, module, tuner.alpha)
        if resolved is None:
            raise ValueError(f"{module}: r/alpha patterns resolve differently in peft 0.14 and 0.15-0.17")
        holder.update(r=resolved[0], rank_pattern={}, alpha_pattern={})
        holder[tuner.alpha] = resolved[1]
    if tuner.peft_type == "IA3":
        holder["feedforward_modules"] = [module] if feedforward else []
    if tuner.peft_type == "ADALORA":
        holder.update(rank_pattern=None, tinit=0, tfinal=0, total_step=1)
    return holder


def module_fold(
    state: CheckpointState,
    tuner: Tuner,
    module: str,
    parts: dict[str, str],
    param: str,
    bias: bool,
    files: tuple[Path | None, Path | None] = (None, None),
) -> TunerFold:
    """The fold of ``module``'s ``param`` by peft's own layer, for a module outside any modules_to_save wrapper.

    Its trained base parameters are ``<module>.weight``/``.bias`` of the base model files ``files``; the layer
    uses the model's shared projections (VeRA). A ``ValueError`` says why the layer cannot be rebuilt as trained.
    """
    tensors = dict(parts)
    for kind in tuner.shared:
        shared = state.tensors.get(f"base_model.{kind}")
        if shared is None:
            raise ValueError(
                f"the {tuner.name} adapter was saved without its shared {kind} (save_projection false): peft "
                "regenerates it from the whole model, which this tool does not rebuild"
            )
        tensors.setdefault(kind, shared.name)
    holder = holder_config(tuner, state.config, module, ia3_feedforward(state.config, module))
    if tuner.peft_type == "ADALORA":  # the rank budget may have trimmed the saved ranks: build the layer at its own
        holder["init_r"] = state.tensors[parts["lora_A"]].shape[0]
    return TunerFold(
        tuner.peft_type,
        module,
        param,
        json.dumps(holder, sort_keys=True),
        tuple(sorted(tensors.items())),
        f"{module}.weight",
        f"{module}.bias" if bias else "",
        weight_file=files[0],
        bias_file=files[1],
    )


def replay_unsupported(config: dict[str, Any]) -> str | None:
    """Why the installed peft's layer cannot replay this adapter's PiSSA/OLoRA init as its producer ran it, if so."""
    from ckpt_migrate.core.lora_init import init_of

    installed, init = tuners.installed_peft(), init_of(config)
    if not CHECKED_FROM <= installed <= CHECKED_UP_TO:
        return (
            f"init_lora_weights={init!r} is replayed with the installed peft's layer code, and peft {installed} is not "
            f"among the releases compared with the producing one ({CHECKED_FROM} to {CHECKED_UP_TO})"
        )
    # peft 0.12's PiSSA ignores fan_in_fan_out where later releases transpose: their residuals differ there.
    for key, what in (("fan_in_fan_out", "fan_in_fan_out weights (Conv1D)"), ("use_dora", "DoRA")):
        if config.get(key):
            return f"init_lora_weights={init!r} with {what} is not replayed: releases compute or store it differently"
    return None


def replayed_lora_weight(
    state: CheckpointState,
    module: str,
    parts: dict[str, str],
    weight: PlannedTensor,
    bias_file: Path | None,
    migration: str,
    name: str,
) -> PlannedTensor:
    """``name``: ``module``'s base ``weight`` (a base model tensor) merged with its LoRA by peft's own layer, which
    first replays the init that rewrote that weight before training (PiSSA, OLoRA: :mod:`ckpt_migrate.core.lora_init`).

    Computed by ``migration``'s ``compute`` (:func:`ckpt_migrate.migrations._tuner_merge.merged_parameter`). A
    ``ValueError`` says why the layer cannot be rebuilt (DoRA: peft stores its magnitude elsewhere per release).
    """
    from ckpt_migrate.core.lora_init import init_of

    if set(parts) != {"lora_A", "lora_B"}:
        raise ValueError(f"LoRA module {module} carries {sorted(parts)}, not lora_A/lora_B alone")
    holder = {k: v for k, v in state.config.items() if k not in (*_PLACEMENT, "layer_replication")}
    rank, alpha = rank_and_alpha(state.config, module)  # the producer's pattern rules, resolved for this module
    holder.update(target_modules=[module], task_type=None, inference_mode=True, r=rank, lora_alpha=alpha)
    holder.update(rank_pattern={}, alpha_pattern={})
    tensors = tuple(sorted((f"{kind}.weight", tensor) for kind, tensor in parts.items()))
    bias = f"{module}.bias" if bias_file is not None else ""
    fold = TunerFold(
        "LORA",
        module,
        "weight",
        json.dumps(holder, sort_keys=True),
        tensors,
        weight.source.tensor,
        bias,
        weight_file=weight.source.base_file,
        bias_file=bias_file,
    )
    init = init_of(state.config)
    formula = f"weight of peft {tuners.installed_peft()}'s LoRA merge after its {init} init: {module} + lora_A, lora_B"
    source = Source(SourceKind.COMPUTED, weight.source.tensor, migration=migration, formula=formula, payload=fold)
    return PlannedTensor(name, weight.shape, weight.dtype, source)


def ia3_loadable(state: CheckpointState, body: set[str], original_targets: Any) -> None:
    """IA3Config refuses feedforward_modules that are not literally a subset of target_modules (every release).

    all-linear saves the Linear names (``dense``) next to the model's feedforward default (bert:
    ``output.dense``), so such adapters load nowhere; and a repair that spells target_modules out in full (to
    leave the head out) breaks a list that held. Both lists become the full names of the same modules.
    """
    config = state.config
    feedforward, targets = config.get("feedforward_modules"), config.get("target_modules")
    if not (isinstance(feedforward, list) and isinstance(targets, list)) or set(feedforward) <= set(targets):
        return
    config["feedforward_modules"] = sorted(m for m in body if ia3_feedforward(config, m))
    config["target_modules"] = sorted(body)
    refuse = "peft refuses (ValueError: `feedforward_modules` should be a subset of `target_modules`)"
    if isinstance(original_targets, list) and set(feedforward) <= set(original_targets):
        state.warn(
            f"adapter_config.json: target_modules now names the body modules in full (the head left out), so IA3 "
            f"feedforward_modules {feedforward} is rewritten to the same full names (a list that is not a subset "
            f"of target_modules {refuse})"
        )
        return
    state.warn(
        f"adapter_config.json: IA3 feedforward_modules {feedforward} is not a subset of target_modules, which "
        f"every {refuse}; both now name the same modules by their full names"
    )
