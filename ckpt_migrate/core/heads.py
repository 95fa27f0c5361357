"""Planning shared by the head migrations (0001, 0002, 0007): find LoRA modules, plan a fold, edit the config.

A fold is planned here as data (:class:`~ckpt_migrate.core.plan.Source` of kind ``FOLD``); the
executor computes it (:func:`ckpt_migrate.execute.tensors.fold`).
"""

from __future__ import annotations

from collections.abc import Callable

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.peft_layout import (
    PREFIX,
    WRAPPER_SEGMENTS,
    head_root,
    lora_scale,
    modules_to_save_matches,
    parse_lora_key,
    parse_module_key,
    pattern_applies,
    rank_and_alpha,
    rewrite_target_modules,
    strip_prefix,
    wrapper_root,
)
from ckpt_migrate.core.plan import CheckpointState, PlannedTensor, Source, SourceKind


def is_lora(state: CheckpointState) -> bool:
    """LoRA tensor names mean LoRA only in a LoRA adapter (AdaLoRA's ``lora_A`` is another tuner's)."""
    return state.config.get("peft_type", "LORA") == "LORA"


def wrapped_heads(state: CheckpointState) -> set[str]:
    """Modules a peft ModulesToSaveWrapper wrapped while they carried LoRA (their LoRA has copies inside it)."""
    heads: set[str] = set()
    if not is_lora(state):
        return heads
    for name in state.tensors:
        parsed = parse_lora_key(name)
        root = wrapper_root(parsed.module) if parsed else None
        if root is not None:
            heads.add(root)
    return heads


def lora_modules(state: CheckpointState, under: str | None = None) -> dict[str, dict[str, str]]:
    """The adapter's own LoRA modules outside any modules_to_save wrapper: module path -> {kind: tensor name}.

    LoRA whose key names another adapter (``score.lora_A.default.weight`` in ``task_b/``: the LoRA a head copy
    inherited) is not the adapter's own: it computes nothing while this adapter is the active one.
    """
    modules: dict[str, dict[str, str]] = {}
    if not is_lora(state):
        return modules
    for name in state.tensors:
        parsed = parse_lora_key(name)
        if parsed is None or parsed.adapter is not None or wrapper_root(parsed.module) is not None:
            continue
        if under is not None and not (parsed.module == under or parsed.module.startswith(under + ".")):
            continue
        modules.setdefault(parsed.module, {})[parsed.kind] = name
    return modules


def heads_carrying_tuner_tensors(state: CheckpointState) -> dict[str, list[str]]:
    """Heads that still carry tuner tensors (LoRA of any adapter, another tuner's, a ``base_layer``, a wrapper's
    copies): head -> names.

    A head saved the way peft loads it holds plain parameters only (``score.weight``), so any of these means a
    layout peft cannot load as trained, whichever adapter the tensors belong to.
    """
    from ckpt_migrate.core.tuners import TUNERS

    kinds = tuple(kind for tuner in TUNERS.values() for kind in tuner.kinds)
    found: dict[str, list[str]] = {}
    for name in sorted(state.tensors):
        inner = strip_prefix(name)
        head = head_root(inner) if inner is not None else None
        if head is None:
            continue
        parts = set(inner.split("."))
        tuner_tensor = parse_lora_key(name) or (not is_lora(state) and parse_module_key(name, kinds))
        if tuner_tensor or parts & {"base_layer", *WRAPPER_SEGMENTS}:
            found.setdefault(head, []).append(name)
    return found


def plan_fold(
    state: CheckpointState,
    module: str,
    parts: dict[str, str],
    weight: PlannedTensor,
    conv1d: bool | None = None,
) -> PlannedTensor:
    """The planned tensor ``<module>.weight`` = ``weight`` (of the adapter or the base model) with LoRA folded in.

    Checks, from shapes alone, that the LoRA factors compose with the weight and match the rank
    the config gives this module.
    """
    where = state.source_dir / state.weights_file
    what = "head module" if head_root(module) else "module"  # export folds the body's modules too
    if "lora_A" not in parts or "lora_B" not in parts:
        missing = "lora_B" if "lora_A" in parts else "lora_A"
        raise UnreadableInputError(f"LoRA of {what} {module!r} has no {missing} tensor", where)
    if set(parts) - {"lora_A", "lora_B", "lora_magnitude_vector"}:
        raise UnreadableInputError(f"{what} {module!r} carries unsupported LoRA tensors {sorted(parts)}", where)
    lora_a, lora_b = state.tensors[parts["lora_A"]], state.tensors[parts["lora_B"]]
    rank, _ = rank_and_alpha(state.config, module)
    out_in = (lora_b.shape[0], lora_a.shape[-1])  # nn.Linear stores (out, in); Conv1D (fan_in_fan_out) (in, out)
    in_out = out_in[::-1]
    # Conv1D stores its weight (in, out) and peft forces fan_in_fan_out there whatever the config says: the
    # shape tells unless the weight is square; then ``conv1d`` (the module's class, when known) or the config does.
    if in_out != out_in:
        fan_in_fan_out = weight.shape == in_out
    else:
        fan_in_fan_out = conv1d if conv1d is not None else bool(state.config.get("fan_in_fan_out"))
    expected = in_out if fan_in_fan_out else out_in
    if (
        len(lora_a.shape) != 2
        or len(lora_b.shape) != 2
        or lora_a.shape[0] != lora_b.shape[1]
        or weight.shape != expected
    ):
        raise UnreadableInputError(
            f"{what} {module!r}: lora_B {lora_b.shape} @ lora_A {lora_a.shape} does not compose "
            f"with the weight {weight.shape}",
            where,
        )
    if lora_a.shape[0] != rank:
        raise UnreadableInputError(
            f"{what} {module!r}: lora_A has rank {lora_a.shape[0]} but the config (r/rank_pattern) gives {rank}",
            where,
        )
    magnitude = parts.get("lora_magnitude_vector", "")
    if magnitude and state.tensors[magnitude].shape not in ((weight.shape[0],), (1, weight.shape[0])):
        raise UnreadableInputError(f"{what} {module!r}: DoRA magnitude shape does not match the weight", where)
    from_base = weight.source.kind is SourceKind.BASE
    source = Source(
        SourceKind.FOLD,
        tensor=weight.source.tensor if from_base else weight.name,
        base_file=weight.source.base_file if from_base else None,
        lora_A=parts["lora_A"],
        lora_B=parts["lora_B"],
        magnitude=magnitude,
        scale=lora_scale(state.config, module),
        fan_in_fan_out=fan_in_fan_out,
    )
    return PlannedTensor(f"{PREFIX}{module}.weight", weight.shape, weight.dtype, source)


def replant_head(
    state: CheckpointState, head: str, computed: set[str], is_tuner_tensor: Callable[[str], bool]
) -> list[PlannedTensor]:
    """Remove every tensor of ``head``; return those its plain module keeps, to be added back.

    Tuner tensors and wrapper copies go; ``<m>.base_layer.<p>`` becomes ``<m>.<p>`` (unless ``<m>.<p>``
    is in ``computed``, planned by a fold); parameters of modules without a tuner are kept as they are.
    """
    kept = []
    for name in sorted(state.tensors):
        inner = strip_prefix(name) or ""
        if not inner.startswith(head + "."):
            continue
        tensor = state.tensors[name]
        state.remove_tensor(name)
        parts = inner.split(".")
        if is_tuner_tensor(name) or any(p in WRAPPER_SEGMENTS for p in parts):
            continue
        if "base_layer" not in parts:
            kept.append(tensor)
            continue
        del parts[parts.index("base_layer")]
        if ".".join(parts) in computed:
            continue
        kept.append(
            PlannedTensor(PREFIX + ".".join(parts), tensor.shape, tensor.dtype, Source(SourceKind.ADAPTER, name))
        )
    return kept


def move_heads_to_modules_to_save(
    state: CheckpointState,
    heads: set[str],
    head_modules: set[str],
    body: set[str] | None = None,
    patterns: tuple[str, ...] = ("rank_pattern", "alpha_pattern"),
) -> None:
    """Config edits: heads in modules_to_save, out of target_modules and of the per-module ``patterns``.

    ``body``: the modules that keep their tuner layers (default: the LoRA modules outside heads).
    """
    config = state.config
    modules_to_save = list(config.get("modules_to_save") or [])
    for head in sorted(heads):
        if not modules_to_save_matches(modules_to_save, head):
            modules_to_save.append(head)
    config["modules_to_save"] = modules_to_save
    body = set(lora_modules(state)) if body is None else body
    config["target_modules"] = rewrite_target_modules(config.get("target_modules"), body, head_modules | heads)
    for key in patterns:
        patterns = config.get(key)
        if patterns:
            config[key] = {
                pattern: value
                for pattern, value in patterns.items()
                if any(pattern_applies(config, pattern, m) for m in body)
                or not any(pattern_applies(config, pattern, m) for m in head_modules)
            }
