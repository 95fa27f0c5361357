"""Make ``adapter_config.json`` loadable by the peft release that will read it, or refuse when it cannot be.

peft < 0.14 builds ``LoraConfig(**json)`` and refuses every key added after it (``TypeError:
LoraConfig.__init__() got an unexpected keyword argument 'eva_config'``, huggingface/peft#2275,
#1979). peft >= 0.14 drops unknown keys with a warning, silently changing the model when such a key
held a non-default value. A key the target does not know is removed when it holds its default (its
absence then means the same) or is metadata only; a non-default value that changes the model's
meaning there (``use_dora: true`` for peft < 0.9, ``lora_bias``, ``target_parameters``, …) makes the
checkpoint unrecoverable for that target: exit 4 with the reason, nothing written.

Which release introduced which key, with its default, is data (:data:`KEY_INTRODUCED`), read from
each release's wheel by ``scripts/stack_fields.py``. The target defaults to the installed peft, found
from package metadata (nothing is imported).
"""

from __future__ import annotations

import json
from typing import Any

from packaging.version import Version

from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.plan import CheckpointState
from ckpt_migrate.core.releases import KeyTable, target_release

ID = "0006_adapter_config_for_target"
SUMMARY = "Drop adapter_config.json keys the target peft does not know; refuse where that changes the model"
CAUSED_BY = (
    "peft < 0.14 is LoraConfig(**json) and refuses keys added later (huggingface/peft#2275, #1979); "
    "peft >= 0.14 drops them with a warning (peft/config.py _check_and_remove_unused_kwargs)"
)
CHANGES_TRAINABLE_PARAMETERS = False

#: LoraConfig/PeftConfig keys of peft 0.7.0: every target this tool knows reads them.
KNOWN_SINCE_0_7 = frozenset(
    {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
        "init_lora_weights", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout",
        "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
        "target_modules", "task_type",
    }
)  # fmt: skip
#: (first release whose LoraConfig/PeftConfig has the key, the key's default there). Keys older than 0.8.0,
#: the oldest release this tool reads, are known to every target and left out. From scripts/stack_fields.py.
KEY_INTRODUCED: dict[str, tuple[str, Any]] = {
    "use_rslora": ("0.8.0", False),
    "use_dora": ("0.9.0", False),
    "layer_replication": ("0.10.0", None),
    "runtime_config": ("0.12.0", {"ephemeral_gpu_offload": False}),
    "exclude_modules": ("0.14.0", None),
    "eva_config": ("0.14.0", None),
    "lora_bias": ("0.14.0", False),
    "trainable_token_indices": ("0.15.0", None),
    "corda_config": ("0.15.0", None),
    "use_qalora": ("0.16.0", False),
    "qalora_group_size": ("0.16.0", 16),
    "target_parameters": ("0.17.0", None),
    "alora_invocation_tokens": ("0.18.0", None),
    "arrow_config": ("0.18.0", None),
    "ensure_weight_tying": ("0.18.0", False),
    "peft_version": ("0.18.0", None),
    "lora_ga_config": ("0.19.0", None),
    "use_bdlora": ("0.19.0", None),
    "velora_config": ("0.20.0", None),
    "monteclora_config": ("0.20.0", None),
    "kasa_config": ("0.21.0", None),
}
#: Keys that describe how the adapter was saved or run, not what it computes: dropping them is always safe.
METADATA_ONLY = frozenset({"peft_version", "runtime_config"})
TABLE_CHECKED_UP_TO = Version("0.21.0")
#: From this release on peft drops unknown keys with a warning instead of raising (peft/config.py).
TOLERANT_SINCE = Version("0.14.0")
_EMPTY = (None, False, {}, [], "")


TABLE = KeyTable(KNOWN_SINCE_0_7, {key: since for key, (since, _) in KEY_INTRODUCED.items()}, TABLE_CHECKED_UP_TO)


def target_peft(context: Context) -> Version:
    """The peft release that will read the adapter: ``--target-peft`` or the installed one."""
    return target_release("peft", context.options.target_peft, TABLE_CHECKED_UP_TO)


def _neutral(key: str, value: Any) -> bool:
    """Whether removing the key keeps the adapter's meaning: metadata, its default, or an empty value."""
    default = KEY_INTRODUCED[key][1] if key in KEY_INTRODUCED else None
    return key in METADATA_ONLY or value == default or (value in _EMPTY and default in _EMPTY)


def _is_lora_config(config: dict[str, Any]) -> bool:
    """The table is LoraConfig's: other peft methods' configs have other keys (their own migrations judge them)."""
    return config.get("peft_type") == "LORA"


def detect(state: CheckpointState, context: Context) -> bool:
    return _is_lora_config(state.config) and bool(TABLE.unknown_to(target_peft(context), state.config)[0])


def plan(state: CheckpointState, context: Context) -> None:
    target = target_peft(context)
    unknown, undecidable = TABLE.unknown_to(target, state.config)
    meaningful = [key for key in unknown if not _neutral(key, state.config[key])]
    if meaningful:
        values = ", ".join(f"{key}={json.dumps(state.config[key])}" for key in meaningful)
        since = [KEY_INTRODUCED[key][0] for key in meaningful if key in KEY_INTRODUCED]
        needed = f"peft >= {max(since, key=Version)}" if len(since) == len(meaningful) else "a newer peft"
        state.unrecoverable.append(
            f"adapter_config.json sets {values}, which peft {target} does not know; without it the adapter "
            f"computes something else there: load it with {needed}, or retrain on the target stack"
        )
        return
    for key in unknown:
        del state.config[key]
    state.warn(f"adapter_config.json: removed {', '.join(unknown)}, unknown to peft {target} (default values only)")
    if undecidable:
        state.warn(
            f"adapter_config.json: {', '.join(undecidable)} are newer than the peft releases this tool knows; "
            f"kept, but peft {target} may refuse them"
        )


def failures(state: CheckpointState) -> list[str]:
    if not _is_lora_config(state.config):
        return []
    newer = sorted((Version(KEY_INTRODUCED[k][0]), k) for k in state.config if k in KEY_INTRODUCED)
    if not newer:
        return []
    since, key = newer[-1]
    lines = [
        f"peft < {min(since, TOLERANT_SINCE)}: TypeError: LoraConfig.__init__() got an unexpected keyword "
        f"argument '{key}'"
    ]
    ignored = [k for v, k in newer if v > TOLERANT_SINCE]
    if ignored:
        changes = [k for k in ignored if not _neutral(k, state.config[k])]
        effect = f"which changes the model ({', '.join(changes)} not default)" if changes else "harmless here"
        lines.append(
            f"peft {TOLERANT_SINCE} to < {since}: each release ignores, with a warning, the keys newer than it "
            f"({', '.join(ignored)}): {effect}"
        )
    return lines
