"""Drop (or, with ``--optimizer remap``, rebuild) Trainer's optimizer state once the trainable parameters changed.

After a head moves from LoRA into modules_to_save, ``optimizer.pt`` lists parameter groups of the
old parameter set; Trainer's resume then fails with "loaded state dict contains a parameter group
that doesn't match the size of optimizer's group". By default the file is dropped without being
unpickled.

``remap`` rebuilds it. Trainer builds two parameter groups (weight decay, no decay), each in
``named_parameters()`` order of the model, and saves AdamW state by position. The order of the broken
and the repaired model is derived from the base model's config (instantiated on the meta device: no
weights) and the adapter's tensor names; the mapping is accepted only if every saved moment has the
shape predicted for its position, else the step falls back to ``drop`` with a warning. State of
parameters that still exist is kept, the new full head weights start fresh, and the group
hyperparameters (and so ``scheduler.pt``) stay valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.heads import lora_modules
from ckpt_migrate.core.migration import Context
from ckpt_migrate.core.peft_layout import PREFIX, modules_to_save_matches, parse_lora_key, wrapper_root
from ckpt_migrate.core.plan import CheckpointState, FileRewrite, OptimizerPolicy
from ckpt_migrate.formats.digests import OnBytes

ID = "0003_drop_stale_optimizer"
SUMMARY = "Drop or remap optimizer.pt, whose parameter groups no longer match the repaired parameters"
CAUSED_BY = "follows 0001/0002: optimizer state saved by transformers.Trainer for the broken parameter set"
CHANGES_TRAINABLE_PARAMETERS = False

OPTIMIZER_FILE = "optimizer.pt"
DROP_WARNING = (
    "optimizer.pt was dropped: a resumed run starts with fresh Adam moments, and Trainer ignores "
    "scheduler.pt without optimizer.pt, so the learning-rate schedule restarts"
)
REMAP_WARNING = (
    "optimizer.pt was remapped: Adam moments of unchanged parameters and the learning-rate schedule "
    "continue; the folded head weights start with fresh moments, so a resumed run differs from an "
    "uninterrupted one"
)
LORA_ORDER = ("lora_A", "lora_B", "lora_magnitude_vector")


def detect(state: CheckpointState, context: Context) -> bool:
    return state.trainable_parameters_changed and OPTIMIZER_FILE in state.files


def plan(state: CheckpointState, context: Context) -> None:
    if context.options.optimizer is OptimizerPolicy.REMAP:
        try:
            state.rewrite_file(OPTIMIZER_FILE, _plan_remap(context.source, state, context))
            state.warn(REMAP_WARNING)
            return
        except RemapProofFailed as exc:
            state.warn(f"--optimizer remap fell back to drop: {exc}")
    state.drop_file(OPTIMIZER_FILE, "parameter groups do not match the repaired trainable parameters")
    state.warn(DROP_WARNING)


class RemapProofFailed(Exception):
    """The saved optimizer state does not match the predicted parameter layout."""


@dataclass(frozen=True)
class RemapPayload:
    """For each new parameter group, the old state index each new position takes its state from (None: fresh)."""

    mapping: tuple[tuple[int | None, ...], ...]


@dataclass(frozen=True)
class TrainableParam:
    name: str
    shape: tuple[int, ...]
    decay: bool


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


def _load_optimizer(path: Path) -> dict[str, Any]:
    """The optimizer state_dict, unpickled weights-only with its tensors on the meta device (nothing read)."""
    return _skeleton(path).obj


def _skeleton(path: Path) -> Any:
    from ckpt_migrate.formats.pickles import load_skeleton

    skeleton = load_skeleton(path)
    if not isinstance(skeleton.obj, dict):
        raise UnreadableInputError("expected an optimizer state_dict", path)
    return skeleton


def _plan_remap(before: CheckpointState, after: CheckpointState, context: Context) -> FileRewrite:
    """Prove the old and new parameter layouts and describe the rebuilt optimizer state."""
    if before.config.get("peft_type") != "LORA":
        raise RemapProofFailed(f"the parameter layout of {before.config.get('peft_type')} adapters is not modelled")
    if context.base_model is None:
        raise RemapProofFailed("the parameter order comes from the base model's config: pass --base-model DIR")
    base_dir = context.base_model.directory
    try:
        model = context.base_model.meta_model(before.config, before.tensors)
        _refuse_misfitting_base(model, before, base_dir)
        old_groups = _groups(trainable_layout(model, before))
        new_groups = _groups(trainable_layout(model, after))
        saved = _load_optimizer(before.source_dir / OPTIMIZER_FILE)
        by_index = _check_against_saved(saved, old_groups)
    except (UnreadableInputError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, UnreadableInputError) and exc.path in (before.source_dir / OPTIMIZER_FILE, base_dir):
            raise  # a hostile or corrupt optimizer.pt, or a base of another model: the input's fault, not unprovable
        raise RemapProofFailed(f"could not prove the old parameter layout ({exc})") from exc
    old_index = {param.name: index for index, param in by_index.items()}
    old_shapes = {param.name: param.shape for param in by_index.values()}
    stateful = set(saved.get("state", {}))
    mapping = tuple(
        tuple(old_index[p.name] if p.name in old_index and old_shapes[p.name] == p.shape else None for p in group)
        for group in new_groups
    )
    pairs = [(p, o) for g, m in zip(new_groups, mapping, strict=True) for p, o in zip(g, m, strict=True)]
    kept = tuple(p.name for p, old in pairs if old in stateful)
    reset = tuple(p.name for p, old in pairs if old is None)
    new_names = {p.name for p, _ in pairs}
    dropped = tuple(sorted(p.name for p in by_index.values() if p.name not in new_names))
    counts = f"{len(kept)} states kept, {len(reset)} reset, {len(dropped)} dropped"
    return FileRewrite(
        migration=ID,
        reason=f"remapped (--optimizer remap) onto the repaired parameters: {counts}",
        listed=(("kept", kept), ("reset", reset), ("dropped", dropped)),
        payload=RemapPayload(mapping),
    )


def _refuse_misfitting_base(model: Any, before: CheckpointState, base_dir: Path) -> None:
    """A base whose modules or shapes do not fit the adapter's tensors is the wrong base (exit 5), not a layout
    to fall back from."""
    from ckpt_migrate.core.text import listed
    from ckpt_migrate.proof import misfitting_tensors

    misfits = misfitting_tensors(model, before)
    if misfits:
        raise UnreadableInputError(
            f"--optimizer remap: the base model ({type(model).__name__}) does not fit the adapter, the wrong "
            f"architecture or size? {len(misfits)} adapter tensors name modules it lacks or other shapes: "
            f"{listed(misfits, 3)}",
            base_dir,
        )


def remapped(saved: dict[str, Any], mapping: tuple[tuple[int | None, ...], ...]) -> dict[str, Any]:
    """The rebuilt state_dict: same group hyperparameters, each kept state under its new index (the same
    tensor objects: nothing is copied), fresh positions without state."""
    state: dict[int, Any] = {}
    groups = []
    next_index = 0
    for old_group, group_mapping in zip(saved["param_groups"], mapping, strict=True):
        indices = []
        for old in group_mapping:
            if old is not None and old in saved["state"]:
                state[next_index] = dict(saved["state"][old])
            indices.append(next_index)
            next_index += 1
        groups.append({**{k: v for k, v in old_group.items() if k != "params"}, "params": indices})
    return {"state": state, "param_groups": groups}


def write(rewrite: FileRewrite, source: Path, target: Path, on_bytes: OnBytes | None = None) -> Callable[[], str]:
    """The rebuilt optimizer.pt, written structurally: a new ``data.pkl`` pickled as torch.save pickles,
    the storage records of kept states copied byte for byte by the kernel, those of dropped states left
    out. Memory does not grow with the optimizer. A weights-only ``torch.load`` of the result (memory-mapped:
    every storage record is found, none is read) must give the planned structure. Returns what gives the
    sha256 of ``target``, read back while it is written (``on_bytes`` counts those bytes)."""
    from ckpt_migrate.formats.pickles import load_weights_only
    from ckpt_migrate.formats.torch_archive import write_archive

    skeleton = _skeleton(source)
    rebuilt = remapped(skeleton.obj, rewrite.payload.mapping)

    def check() -> None:  # runs while the file is fsynced
        if not _same_structure(load_weights_only(target), rebuilt):
            raise UnreadableInputError("the rebuilt optimizer.pt does not reload as planned", target)

    return write_archive(target, rebuilt, skeleton.storage_key, source, on_bytes, check)


def _same_structure(loaded: Any, planned: Any) -> bool:
    """Equal containers and values; tensors equal in dtype, shape, stride and offset (bytes are copied)."""
    if hasattr(planned, "untyped_storage"):
        fields = ("dtype", "shape", "requires_grad")
        return all(getattr(loaded, f, None) == getattr(planned, f) for f in fields) and (
            loaded.stride() == planned.stride() and loaded.storage_offset() == planned.storage_offset()
        )
    if isinstance(planned, dict):
        return (
            isinstance(loaded, dict)
            and list(loaded) == list(planned)
            and all(_same_structure(loaded[k], v) for k, v in planned.items())
        )
    if isinstance(planned, list | tuple):
        return (
            type(loaded) is type(planned)
            and len(loaded) == len(planned)
            and all(_same_structure(a, b) for a, b in zip(loaded, planned, strict=True))
        )
    return type(loaded) is type(planned) and loaded == planned
