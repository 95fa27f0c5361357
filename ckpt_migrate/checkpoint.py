"""Find checkpoints under a path and read one into a :class:`CheckpointState` (headers only)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from ckpt_migrate.errors import UnreadableInputError
from ckpt_migrate.peft_layout import parse_lora_key
from ckpt_migrate.plan import CheckpointState, PlannedTensor, Source
from ckpt_migrate.safetensors_io import read_header

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
BIN_WEIGHTS = "adapter_model.bin"
MANIFEST = "ckpt_migrate_manifest.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")

TORCH_TO_SAFETENSORS = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


def find_checkpoints(src: Path) -> list[str]:
    """Relative paths of the adapter checkpoints at ``src``: ``"."`` or its ``checkpoint-*`` directories."""
    if not src.exists():
        raise UnreadableInputError("no such file or directory", src)
    if not src.is_dir():
        raise UnreadableInputError("not a directory (expected an adapter or checkpoint directory)", src)
    top_level = any((src / name).exists() for name in (ADAPTER_CONFIG, SAFETENSORS_WEIGHTS, BIN_WEIGHTS))
    nested = nested_checkpoints(src)
    if not top_level and not nested:
        raise UnreadableInputError(f"no {ADAPTER_CONFIG} here nor in any checkpoint-*/ directory", src)
    # A training output directory often holds the final adapter beside its checkpoint-* directories.
    return (["."] if top_level else []) + nested


def nested_checkpoints(directory: Path) -> list[str]:
    """``checkpoint-N`` subdirectories holding an adapter, in step order: separate checkpoints."""
    found = []
    for child in directory.iterdir():
        match = _CHECKPOINT_DIR.match(child.name)
        if match and child.is_dir() and not child.is_symlink() and (child / ADAPTER_CONFIG).exists():
            found.append((int(match.group(1)), child.name))
    return [name for _, name in sorted(found)]


def list_files(directory: Path) -> dict[str, int]:
    """Every regular file below ``directory`` with its size, refusing links that leave it.

    Nested ``checkpoint-N`` adapter directories are separate checkpoints and are not listed.
    """
    root = directory.resolve()
    files: dict[str, int] = {}

    def walk_error(exc: OSError) -> None:  # os.walk would otherwise skip an unreadable directory silently
        raise UnreadableInputError(f"cannot list directory: {exc.strerror or exc}", exc.filename or directory)

    separate = set(nested_checkpoints(directory))
    for dirpath, dirnames, filenames in os.walk(directory, onerror=walk_error, followlinks=False):
        if Path(dirpath) == directory:
            dirnames[:] = [d for d in dirnames if d not in separate]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                continue
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError) as exc:  # dangling link or a loop
                raise UnreadableInputError("symbolic link cannot be resolved (dangling or a loop)", path) from exc
            if not target.is_relative_to(root):
                raise UnreadableInputError("symbolic link points outside the checkpoint", path)
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_file():
                raise UnreadableInputError("not a regular file", path)
            if not os.access(path, os.R_OK):
                raise UnreadableInputError("permission denied", path)
            files[path.relative_to(directory).as_posix()] = path.stat().st_size
    return files


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UnreadableInputError("missing", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableInputError(f"cannot read: {exc}", path) from exc
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also integers beyond sys.get_int_max_str_digits
        raise UnreadableInputError(f"invalid JSON ({exc})", path) from exc
    if not isinstance(value, dict):
        raise UnreadableInputError("expected a JSON object", path)
    return value


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


def read_adapter_config(path: Path) -> dict[str, Any]:
    """Read ``adapter_config.json`` and check the fields a repair depends on."""
    config = read_json_object(path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnreadableInputError(f"peft_type is {peft_type!r}; only LoRA adapters are supported", path)
    checks = {
        "r": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "lora_alpha": _is_number,
        "target_modules": lambda v: v is None or (isinstance(v, str) and _is_regex(v)) or _is_str_list(v),
        "modules_to_save": lambda v: v is None or _is_str_list(v),
        "rank_pattern": lambda v: (
            v is None
            or (
                isinstance(v, dict)
                and all(_is_regex(k) for k in v)
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v.values())
            )
        ),
        "alpha_pattern": lambda v: (
            v is None
            or (isinstance(v, dict) and all(_is_regex(k) for k in v) and all(_is_number(x) for x in v.values()))
        ),
        "use_rslora": lambda v: v is None or isinstance(v, bool),
        "use_dora": lambda v: v is None or isinstance(v, bool),
        "fan_in_fan_out": lambda v: v is None or isinstance(v, bool),
    }
    for key, valid in checks.items():
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


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def torch_load_problem(exc: BaseException) -> str:
    """One plain line saying why ``torch.load(weights_only=True)`` refused a file.

    torch's message spans many lines, carries ANSI escapes, and suggests loading with
    ``weights_only=False`` or allow-listing the global; keep only what the file did wrong.
    """
    lines = [_ANSI_ESCAPE.sub("", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    prefix = "WeightsUnpickler error:"
    detail = next((line[len(prefix) :].strip() for line in lines if line.startswith(prefix)), None)
    if detail is None:
        detail = lines[0] if lines else type(exc).__name__
    detail = detail.split(". Please use", 1)[0].split(" This file can still be loaded", 1)[0].rstrip(". ")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in detail)


def load_bin_tensors(path: Path) -> dict[str, Any]:
    """Load a pickled adapter with ``weights_only=True``: no code from the file runs."""
    import zipfile

    import torch

    try:
        # mmap needs torch's zip format; an older plain-pickle .bin goes through the same weights-only unpickler.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - a hostile file can make the unpickler raise anything
        raise UnreadableInputError(f"refused to load pickle safely ({torch_load_problem(exc)})", path) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UnreadableInputError("expected a mapping of tensor names to tensors", path)
    return state


def _adapter_tensors(directory: Path, weights_file: str) -> dict[str, PlannedTensor]:
    path = directory / weights_file
    if weights_file == SAFETENSORS_WEIGHTS:
        header = read_header(path)
        infos = {name: (info.shape, info.dtype) for name, info in header.tensors.items()}
    else:
        infos = {}
        for name, tensor in load_bin_tensors(path).items():
            dtype = TORCH_TO_SAFETENSORS.get(str(tensor.dtype))
            if dtype is None:
                raise UnreadableInputError(f"tensor {name!r} has unsupported dtype {tensor.dtype}", path)
            infos[name] = (tuple(tensor.shape), dtype)
    for name, (shape, dtype) in infos.items():
        _check_lora_factor(name, shape, dtype, path)
    return {name: PlannedTensor(name, shape, dtype, Source("adapter", name)) for name, (shape, dtype) in infos.items()}


_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3"})


def _check_lora_factor(name: str, shape: tuple[int, ...], dtype: str, path: Path) -> None:
    """LoRA factors are floating-point matrices (or conv kernels); a DoRA magnitude is a float vector."""
    parsed = parse_lora_key(name)
    if parsed is None:
        return
    if dtype not in _FLOAT_DTYPES:
        raise UnreadableInputError(f"LoRA tensor {name!r} has non-floating-point dtype {dtype}", path)
    if parsed.kind != "lora_magnitude_vector" and len(shape) < 2:
        raise UnreadableInputError(f"LoRA tensor {name!r} has shape {shape}; expected a matrix", path)


def load_state(directory: Path) -> CheckpointState:
    """Model one adapter checkpoint from its config, weight headers and file list."""
    files = list_files(directory)
    if ADAPTER_CONFIG not in files:
        raise UnreadableInputError("missing", directory / ADAPTER_CONFIG)
    config = read_adapter_config(directory / ADAPTER_CONFIG)
    if SAFETENSORS_WEIGHTS in files:
        weights_file = SAFETENSORS_WEIGHTS
    elif BIN_WEIGHTS in files:
        weights_file = BIN_WEIGHTS
    else:
        raise UnreadableInputError(f"no {SAFETENSORS_WEIGHTS} or {BIN_WEIGHTS}", directory)
    manifest = read_manifest(directory)
    applied = list(manifest.get("migrations_applied", [])) if manifest else []
    return CheckpointState(
        source_dir=directory,
        config=config,
        tensors=_adapter_tensors(directory, weights_file),
        files=files,
        weights_file=weights_file,
        applied=applied,
    )
