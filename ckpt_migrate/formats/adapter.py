"""A peft adapter on disk: ``adapter_config.json``, its weights (safetensors or ``.bin``), the tool's manifest."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.peft_layout import parse_lora_key
from ckpt_migrate.core.plan import PlannedTensor, Source, SourceKind
from ckpt_migrate.formats.dtypes import DTYPES, from_torch
from ckpt_migrate.formats.files import read_json_object
from ckpt_migrate.formats.safetensors import read_header

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
BIN_WEIGHTS = "adapter_model.bin"
MANIFEST = "ckpt_migrate_manifest.json"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_regex(value: object) -> bool:
    try:
        re.compile(value)  # type: ignore[arg-type]
    except (re.error, TypeError, ValueError, RecursionError, OverflowError):
        return False
    return True


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _optional(check):
    return lambda v: v is None or check(v)


_CONFIG_CHECKS = {
    "r": _is_positive_int,
    "lora_alpha": _is_number,
    "target_modules": _optional(lambda v: (isinstance(v, str) and _is_regex(v)) or _is_str_list(v)),
    "modules_to_save": _optional(_is_str_list),
    "rank_pattern": _optional(
        lambda v: isinstance(v, dict) and all(map(_is_regex, v)) and all(map(_is_positive_int, v.values()))
    ),
    "alpha_pattern": _optional(
        lambda v: isinstance(v, dict) and all(map(_is_regex, v)) and all(map(_is_number, v.values()))
    ),
    "use_rslora": _optional(lambda v: isinstance(v, bool)),
    "use_dora": _optional(lambda v: isinstance(v, bool)),
    "fan_in_fan_out": _optional(lambda v: isinstance(v, bool)),
}


def read_adapter_config(path: Path) -> dict[str, Any]:
    """Read ``adapter_config.json`` and check the fields a repair depends on."""
    config = read_json_object(path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnreadableInputError(f"peft_type is {peft_type!r}; only LoRA adapters are supported", path)
    for key, valid in _CONFIG_CHECKS.items():
        if key in ("r", "lora_alpha") and key not in config:
            raise UnreadableInputError(f"missing required field {key!r}", path)
        if key in config and not valid(config[key]):
            raise UnreadableInputError(f"field {key!r} has an invalid value {config[key]!r}", path)
    return config


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.exists():
        return None
    manifest = read_json_object(path)
    if not _is_str_list(manifest.get("migrations_applied", [])):
        raise UnreadableInputError("migrations_applied must be a list of migration ids", path)
    return manifest


def load_bin_tensors(path: Path) -> dict[str, Any]:
    """Load a pickled adapter with ``weights_only=True``: no code from the file runs."""
    import torch

    from ckpt_migrate.formats.pickles import load_weights_only

    state = load_weights_only(path)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UnreadableInputError("expected a mapping of tensor names to tensors", path)
    return state


def adapter_tensors(directory: Path, weights_file: str) -> dict[str, PlannedTensor]:
    """The adapter's tensors as planned (unchanged) output tensors: from the header, or a weights-only ``.bin``."""
    path = directory / weights_file
    if weights_file == SAFETENSORS_WEIGHTS:
        infos = {name: (info.shape, info.dtype) for name, info in read_header(path).tensors.items()}
    else:
        infos = {}
        for name, tensor in load_bin_tensors(path).items():
            dtype = from_torch(tensor.dtype)
            if dtype is None:
                raise UnreadableInputError(f"tensor {name!r} has unsupported dtype {tensor.dtype}", path)
            infos[name] = (tuple(tensor.shape), dtype)
    for name, (shape, dtype) in infos.items():
        _check_lora_factor(name, shape, dtype, path)
    return {
        name: PlannedTensor(name, shape, dtype, Source(SourceKind.ADAPTER, name))
        for name, (shape, dtype) in infos.items()
    }


def _check_lora_factor(name: str, shape: tuple[int, ...], dtype: str, path: Path) -> None:
    """LoRA factors are floating-point matrices (or conv kernels); a DoRA magnitude is a float vector."""
    parsed = parse_lora_key(name)
    if parsed is None:
        return
    if not DTYPES[dtype].floating:
        raise UnreadableInputError(f"LoRA tensor {name!r} has non-floating-point dtype {dtype}", path)
    if parsed.kind != "lora_magnitude_vector" and len(shape) < 2:
        raise UnreadableInputError(f"LoRA tensor {name!r} has shape {shape}; expected a matrix", path)


def load_adapter_tensors(directory: Path, weights_file: str) -> dict[str, Any]:
    """Every tensor of the adapter, loaded (safetensors' own reader, or a weights-only ``.bin``)."""
    path = directory / weights_file
    if weights_file != SAFETENSORS_WEIGHTS:
        return load_bin_tensors(path)
    from safetensors.torch import load_file

    read_header(path)  # validated first: the same refusals as everywhere else
    return load_file(str(path))
