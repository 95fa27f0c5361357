"""Rebuild Trainer's ``optimizer.pt`` for the repaired parameter set (``--optimizer remap``).

Trainer builds two parameter groups (weight decay, no decay), each in ``named_parameters()`` order
of the model, and saves AdamW state by position. The order of the broken and the repaired model is
derived from the base model's config (instantiated on the meta device: no weights) and the adapter's
tensor names; the mapping is accepted only if every saved moment has the shape predicted for its
position. State of parameters that still exist is kept, the new full head weights start fresh, and
the group hyperparameters (and so ``scheduler.pt``) stay valid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_migrate.checkpoint import torch_load_problem
from ckpt_migrate.errors import UnreadableInputError
from ckpt_migrate.heads import lora_modules
from ckpt_migrate.peft_layout import PREFIX, modules_to_save_matches, parse_lora_key, wrapper_root
from ckpt_migrate.plan import CheckpointState, FileRewrite

OPTIMIZER_FILE = "optimizer.pt"
LORA_ORDER = ("lora_A", "lora_B", "lora_magnitude_vector")


class RemapProofFailed(Exception):
    """The saved optimizer state does not match the predicted parameter layout."""


@dataclass(frozen=True)
class TrainableParam:
    name: str
    shape: tuple[int, ...]
    decay: bool


def _meta_model(base_dir: Path):
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(base_dir)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise RemapProofFailed(f"unknown architecture {architecture!r} in {base_dir}/config.json")
    with torch.device("meta"):
        return model_class(config)


def _is_norm(module) -> bool:
    import torch

    return isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _lora_params(state: CheckpointState, module: str, parts: dict[str, str]) -> list[TrainableParam]:
    return [
        TrainableParam(f"{module}.{kind}", state.tensors[parts[kind]].shape, True)
        for kind in LORA_ORDER
        if kind in parts
    ]


def trainable_layout(model, state: CheckpointState) -> list[TrainableParam]:
    """Trainable parameters of the PEFT model ``state`` describes, in ``named_parameters()`` order."""
    lora = lora_modules(state)
    parsed = [parse_lora_key(name) for name in state.tensors]
    wrapped = {wrapper_root(p.module) for p in parsed if p and wrapper_root(p.module)}
    saved_whole = set(state.config.get("modules_to_save") or [])
    params: list[TrainableParam] = []
    skip_under: str | None = None
    for path, module in model.named_modules():
        if skip_under is not None and (path == skip_under or path.startswith(skip_under + ".")):
            continue
        skip_under = None
        norm = _is_norm(module)
        if path in wrapped:
            skip_under = path
            for sub_path, sub in module.named_modules(prefix=path):
                direct = list(sub.named_parameters(recurse=False))
                base = ".base_layer" if sub_path in lora else ""
                params += [
                    TrainableParam(f"{sub_path}{base}.{name}", tuple(p.shape), "bias" not in name and not _is_norm(sub))
                    for name, p in direct
                ]
                if sub_path in lora:
                    params += _lora_params(state, sub_path, lora[sub_path])
            continue
        if path in lora:
            params += _lora_params(state, path, lora[path])
        elif (
            path
            and modules_to_save_matches(list(saved_whole), path)
            and any(name.startswith(f"{PREFIX}{path}.") for name in state.tensors)
        ):
            skip_under = path
            params += [
                TrainableParam(f"{path}.{name}", tuple(p.shape), "bias" not in name and not norm)
                for name, p in module.named_parameters()
            ]
    return params


def _groups(params: list[TrainableParam]) -> list[list[TrainableParam]]:
    return [[p for p in params if p.decay], [p for p in params if not p.decay]]


def _check_against_saved(saved: dict[str, Any], predicted: list[list[TrainableParam]]) -> dict[int, TrainableParam]:
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != 2:
        raise RemapProofFailed("expected Trainer's two parameter groups (decay / no decay)")
    by_index: dict[int, TrainableParam] = {}
    for group, expected in zip(groups, predicted, strict=True):
        indices = group.get("params")
        if not isinstance(indices, list) or len(indices) != len(expected):
            raise RemapProofFailed(
                f"a parameter group holds {len(indices or [])} parameters, the broken model has {len(expected)}"
            )
        by_index.update(zip(indices, expected, strict=True))
    for index, entry in saved.get("state", {}).items():
        param = by_index.get(index)
        if param is None:
            raise RemapProofFailed(f"optimizer state for unknown parameter index {index}")
        for key, value in entry.items():
            shape = tuple(getattr(value, "shape", ()))
            if shape and shape != param.shape:
                raise RemapProofFailed(f"{key} of parameter {index} has shape {shape}, {param.name} has {param.shape}")
    return by_index


def load_optimizer(path: Path) -> dict[str, Any]:
    """Load Trainer's optimizer state with ``weights_only=True``: no code from the file runs."""
    import zipfile

    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - any failure to read it safely is the file's fault
        raise UnreadableInputError(f"refused to load pickle safely ({torch_load_problem(exc)})", path) from exc
    if not isinstance(saved, dict):
        raise UnreadableInputError("expected an optimizer state_dict", path)
    return saved


def plan_remap(before: CheckpointState, after: CheckpointState, base_dir: Path) -> FileRewrite:
    """Prove the old and new parameter layouts and describe the rebuilt optimizer state."""
    model = _meta_model(base_dir)
    old_groups = _groups(trainable_layout(model, before))
    new_groups = _groups(trainable_layout(model, after))
    saved = load_optimizer(before.source_dir / OPTIMIZER_FILE)
    by_index = _check_against_saved(saved, old_groups)
    old_index = {param.name: index for index, param in by_index.items()}
    old_shapes = {param.name: param.shape for param in by_index.values()}
    stateful = set(saved.get("state", {}))
    mapping = [
        [old_index[p.name] if p.name in old_index and old_shapes[p.name] == p.shape else None for p in group]
        for group in new_groups
    ]
    pairs = [(p, o) for g, m in zip(new_groups, mapping, strict=True) for p, o in zip(g, m, strict=True)]
    kept = [p.name for p, old in pairs if old in stateful]
    reset = [p.name for p, old in pairs if old is None]
    new_names = {p.name for p, _ in pairs}
    dropped = sorted(p.name for p in by_index.values() if p.name not in new_names)
    counts = f"{len(kept)} states kept, {len(reset)} reset, {len(dropped)} dropped"
    return FileRewrite(
        kind="optimizer_remap",
        reason=f"rebuilt for the repaired parameters: {counts}",
        details={"mapping": mapping, "kept": kept, "reset": reset, "dropped": dropped},
    )


def write_remapped(source: Path, target: Path, rewrite: FileRewrite) -> None:
    """Write the rebuilt optimizer state: same group hyperparameters, state moved by the mapping."""
    import torch

    saved = load_optimizer(source)
    state: dict[int, Any] = {}
    groups = []
    next_index = 0
    for old_group, mapping in zip(saved["param_groups"], rewrite.details["mapping"], strict=True):
        indices = []
        for old in mapping:
            if old is not None and old in saved["state"]:
                state[next_index] = {k: v.clone() if hasattr(v, "clone") else v for k, v in saved["state"][old].items()}
            indices.append(next_index)
            next_index += 1
        groups.append({**{k: v for k, v in old_group.items() if k != "params"}, "params": indices})
    with open(target, "xb") as handle:
        torch.save({"state": state, "param_groups": groups}, handle)
        handle.flush()
        os.fsync(handle.fileno())
