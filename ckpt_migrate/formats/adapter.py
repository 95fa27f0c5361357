"""A peft adapter on disk: ``adapter_config.json``, its weights (safetensors or ``.bin``), the tool's manifest."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
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
EXPORT_MANIFEST = "ckpt_migrate_export_manifest.json"


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


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _pattern(check: Callable[[object], bool]) -> Callable[[object], bool]:
    """A dict from module-name regexes to values passing ``check`` (rank_pattern, alpha_pattern, ...)."""
    return _optional(lambda v: isinstance(v, dict) and all(map(_is_regex, v)) and all(map(check, v.values())))


_TARGETS = _optional(lambda v: (isinstance(v, str) and _is_regex(v)) or _is_str_list(v))
#: Fields every adapter's repair may read.
_COMMON_CHECKS = {
    "target_modules": _TARGETS,
    "modules_to_save": _optional(_is_str_list),
    "fan_in_fan_out": _optional(_is_bool),
}
_LYCORIS_CHECKS = {
    "r": _is_positive_int,
    "alpha": _is_number,
    "rank_pattern": _pattern(_is_positive_int),
    "alpha_pattern": _pattern(_is_number),
}
#: peft_type -> (required fields, checks of the fields the repair of that tuner relies on).
_TYPE_CHECKS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "LORA": (
        ("r", "lora_alpha"),
        {
            "r": _is_positive_int,
            "lora_alpha": _is_number,
            "rank_pattern": _pattern(_is_positive_int),
            "alpha_pattern": _pattern(_is_number),
            "use_rslora": _optional(_is_bool),
            "use_dora": _optional(_is_bool),
        },
    ),
    "LOHA": (("r", "alpha"), _LYCORIS_CHECKS),
    "LOKR": (("r", "alpha"), _LYCORIS_CHECKS),
    "ADALORA": (
        ("init_r", "lora_alpha"),
        {
            "init_r": _is_positive_int,
            "lora_alpha": _is_number,
            "rank_pattern": _optional(
                lambda v: isinstance(v, dict) and all(isinstance(m, list) and all(map(_is_bool, m)) for m in v.values())
            ),
            "total_step": _optional(_is_count),
            "tinit": _is_count,
            "tfinal": _is_count,
        },
    ),
    "IA3": ((), {"feedforward_modules": _TARGETS}),
    "VERA": (("r",), {"r": _is_positive_int, "save_projection": _is_bool}),
    "BOFT": ((), {k: _is_count for k in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor")}),
    "HRA": (("r",), {"r": _is_positive_int, "apply_GS": _is_bool}),
    "FOURIERFT": (
        ("n_frequency",),
        {"n_frequency": _is_positive_int, "scaling": _is_number, "n_frequency_pattern": _pattern(_is_positive_int)},
    ),
    "OFT": (("r",), {"r": _is_count}),
}


def read_adapter_config(path: Path) -> dict[str, Any]:
    """Read ``adapter_config.json`` and check the fields a repair depends on.

    Any peft method is read (a migration refuses, with the reason, what it cannot repair); the fields
    the repair of a known tuner relies on must be present and valid.
    """
    config = read_json_object(path)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type.strip():
        raise UnreadableInputError(f"peft_type is {peft_type!r}; expected the name of a peft method", path)
    required, checks = _TYPE_CHECKS.get(peft_type, ((), {}))
    for key in required:
        if key not in config:
            raise UnreadableInputError(f"missing required field {key!r}", path)
    for key, valid in {**_COMMON_CHECKS, **checks}.items():
        if key in config and not valid(config[key]):
            raise UnreadableInputError(f"field {key!r} has an invalid value {config[key]!r}", path)
    return config


def read_manifest(directory: Path, name: str = MANIFEST) -> dict[str, Any] | None:
    """The manifest ``fix`` (or, with ``name=EXPORT_MANIFEST``, ``export``) wrote into ``directory``, if any."""
    path = directory / name
    if not path.exists():
        return None
    manifest = read_json_object(path)
    if not _is_str_list(manifest.get("migrations_applied", [])):
        raise UnreadableInputError("migrations_applied must be a list of migration ids", path)
    if not _is_str_list(manifest.get("losses", [])):
        raise UnreadableInputError("losses must be a list of strings", path)
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
