"""The broken source's own function, computed independently of the fold.

Base model + body LoRA through peft; every LoRA-wrapped head computed unmerged as
``W x + b + s * B (A x)`` (DoRA: ``m / ||W + s B A||_row * (W x + s B A x) + b``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_migrate.core.lora_init import rewrites_base
from ckpt_migrate.core.peft_layout import (
    PREFIX,
    WRAPPER_SEGMENTS,
    head_root,
    lora_scale,
    parse_lora_key,
    rank_and_alpha,
    strip_prefix,
    wrapper_root,
)
from ckpt_migrate.core.plan import CheckpointState
from ckpt_migrate.core.text import describe_exception, listed
from ckpt_migrate.formats.adapter import load_adapter_tensors
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.verification.probes import logits
from ckpt_migrate.verification.result import SEEDS


def _unmerged_module_class() -> type:
    import torch
    import torch.nn.functional as F

    class UnmergedLoraLinear(torch.nn.Module):
        """``W x + b + s * B (A x)``, or DoRA's ``m / ||W + s B A||_row * (W x + s B (A x)) + b``."""

        def __init__(self, weight, bias, lora_a, lora_b, scale, magnitude=None):
            super().__init__()
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
            self.register_buffer("lora_A", lora_a)
            self.register_buffer("lora_B", lora_b)
            self.register_buffer("magnitude", magnitude)
            self.scale = float(scale)

        def forward(self, x):
            dtype = x.dtype
            h = x.float()
            base = F.linear(h, self.weight.float())
            lora = F.linear(F.linear(h, self.lora_A.float()), self.lora_B.float()) * self.scale
            if self.magnitude is None:
                out = base + lora
            else:
                merged = self.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())
                norm = torch.linalg.norm(merged, dim=1)
                out = (self.magnitude.float().reshape(-1) / norm) * (base + lora)
            if self.bias is not None:
                out = out + self.bias.float()
            return out.to(dtype)

    return UnmergedLoraLinear


@dataclass
class _SourceParts:
    body: dict[str, Any] = field(default_factory=dict)  # file key -> tensor, loaded through peft
    unmerged: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> {lora kind: tensor}
    base_layer: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> {param: tensor}
    plain: dict[str, Any] = field(default_factory=dict)  # model param name -> tensor
    ignored: list[str] = field(default_factory=list)


def _split_source(tensors: dict[str, Any]) -> _SourceParts:
    """Body LoRA (through peft), LoRA of heads and wrapped modules (unmerged), full tensors (assigned)."""
    parts = _SourceParts()
    wrapped = {wrapper_root(parsed.module) for k in tensors if (parsed := parse_lora_key(k))} - {None}

    def unmerged(module: str) -> bool:
        return head_root(module) is not None or any(module == r or module.startswith(r + ".") for r in wrapped)

    for name, tensor in tensors.items():
        inner = strip_prefix(name)
        if inner is None:
            parts.ignored.append(name)
            continue
        parsed = parse_lora_key(name)
        if parsed is not None:
            if wrapper_root(parsed.module) is not None:
                continue  # peft 0.12 duplicates inside original_module / modules_to_save
            if unmerged(parsed.module):
                parts.unmerged.setdefault(parsed.module, {})[parsed.kind] = tensor
            else:
                parts.body[name] = tensor
            continue
        segments = inner.split(".")
        if any(seg in WRAPPER_SEGMENTS for seg in segments[1:]):
            continue
        if "base_layer" in segments:
            index = segments.index("base_layer")
            module, param = ".".join(segments[:index]), ".".join(segments[index + 1 :])
            parts.base_layer.setdefault(module, {})[param] = tensor
        else:
            parts.plain[inner] = tensor
    for module in list(parts.base_layer):
        if module not in parts.unmerged:  # e.g. bias="all": a full tensor of a body module
            for param, tensor in parts.base_layer.pop(module).items():
                parts.plain[f"{module}.{param}"] = tensor
    return parts


def _model_tensor(model: Any, name: str) -> Any:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None
    return module._parameters.get(attr, module._buffers.get(attr))


def source_logits(
    source: Path,
    state: CheckpointState,
    base_model: BaseModel,
    auto_name: str,
    inputs: Any,
    merged: bool = False,
) -> tuple[Any, str]:
    """The broken source's own logits, computed without the fold, or ``(None, why not)``.

    A non-LoRA tuner's head has no formula here: only for a ``merged`` (exported) model is its source run by
    peft, heads repaired in memory, and the logits come with a note saying what that does and does not check.
    """
    import torch

    peft_type = state.config.get("peft_type", "LORA")
    if peft_type != "LORA" and not merged:
        return None, f"a {peft_type} head is computed by the repair's own fold (peft's merge), nothing independent"
    if peft_type != "LORA":
        return _tuner_source_logits(source, base_model, auto_name, inputs)
    parts = _split_source(load_adapter_tensors(state.source_dir, state.weights_file))
    if rewrites_base(state.config):
        # PiSSA/OLoRA rewrote a LoRA-only head's weight too, and neither the source nor the base holds the result:
        # peft computes such a head as it does the body (its init replayed, the LoRA unmerged).
        for module in [m for m in parts.unmerged if "weight" not in parts.base_layer.get(m, {})]:
            kinds = parts.unmerged.pop(module)
            parts.body.update({f"{PREFIX}{module}.{kind}.weight": tensor for kind, tensor in kinds.items()})
    if parts.ignored:
        return None, f"source tensors outside {PREFIX}*: {listed(parts.ignored)}"
    for module, kinds in parts.unmerged.items():
        unsupported = set(kinds) - {"lora_A", "lora_B", "lora_magnitude_vector"}
        if unsupported or not {"lora_A", "lora_B"} <= set(kinds):
            return None, f"head module {module!r} carries LoRA tensors {sorted(kinds)} (only Linear LoRA/DoRA heads)"
    base, uninitialised = base_model.load(auto_name, SEEDS[0] + 1)
    with torch.no_grad():
        for name, tensor in parts.plain.items():
            target = _model_tensor(base, name)
            if target is None:
                return None, f"source tensor {PREFIX}{name} has no counterpart in the base model"
            if tuple(target.shape) != tuple(tensor.shape):
                shapes = f"{tuple(tensor.shape)}, the model's {tuple(target.shape)}"
                return None, f"source tensor {PREFIX}{name} has shape {shapes}"
            target.copy_(tensor.to(target.dtype))
            uninitialised.discard(name)
    unmerged_class = _unmerged_module_class()
    for module, kinds in sorted(parts.unmerged.items()):
        try:
            original = base.get_submodule(module)
        except AttributeError:
            return None, f"source head module {module!r} does not exist in the base model"
        own = parts.base_layer.get(module, {})
        weight = own.get("weight")
        if weight is None:
            if f"{module}.weight" in uninitialised or not isinstance(getattr(original, "weight", None), torch.Tensor):
                return None, (
                    f"the source's head weight {module}.weight is neither in the source adapter nor in the base "
                    "checkpoint: the source's own head is random, there is nothing to compare with"
                )
            weight = original.weight.detach().clone()
        bias = own.get("bias")
        if bias is None and isinstance(getattr(original, "bias", None), torch.Tensor):
            bias = original.bias.detach().clone()
            if f"{module}.bias" in uninitialised and bool(bias.abs().max() > 0):  # a zero init is no accident
                return None, f"the source's head bias {module}.bias is in neither the source adapter nor the base"
        lora_a, lora_b = kinds["lora_A"], kinds["lora_B"]
        if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
            return None, f"head module {module!r} is not a Linear layer"
        if tuple(weight.shape) == (lora_a.shape[1], lora_b.shape[0]) != (lora_b.shape[0], lora_a.shape[1]):
            weight = weight.t().contiguous()  # Conv1D-style (fan_in_fan_out) layout
        if tuple(weight.shape) != (lora_b.shape[0], lora_a.shape[1]) or lora_a.shape[0] != lora_b.shape[1]:
            return (
                None,
                f"head module {module!r}: lora_B {tuple(lora_b.shape)} @ lora_A {tuple(lora_a.shape)} "
                f"does not compose with its weight {tuple(weight.shape)}",
            )
        replacement = unmerged_class(
            weight, bias, lora_a, lora_b, lora_scale(state.config, module), kinds.get("lora_magnitude_vector")
        )
        parent_name, _, child = module.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, child, replacement)
    model = base
    if parts.body:
        model, why = _with_body_lora(base, source, state, parts.body)
        if model is None:
            return None, why
    return logits(model.eval(), inputs), ""


def _with_body_lora(base: Any, source: Path, state: CheckpointState, body: dict[str, Any]) -> tuple[Any, str]:
    """``base`` with the source's body LoRA, through peft, every module's r and alpha spelt out."""
    import dataclasses

    from peft import LoraConfig, PeftModel
    from peft.utils import set_peft_model_state_dict

    modules = sorted({parsed.module for k in body if (parsed := parse_lora_key(k))})
    try:
        config = LoraConfig.from_pretrained(str(source))
    except Exception as exc:  # noqa: BLE001
        return None, f"peft cannot read the source adapter config: {describe_exception(exc)}"
    ranks = {re.escape(m): rank_and_alpha(state.config, m) for m in modules}
    config = dataclasses.replace(
        config,
        task_type=None,
        target_modules=modules,
        modules_to_save=None,
        bias="none",
        rank_pattern={k: v[0] for k, v in ranks.items()},
        alpha_pattern={k: v[1] for k, v in ranks.items()},
        inference_mode=True,
    )
    try:
        model = PeftModel(base, config)
        loaded = set_peft_model_state_dict(model, body)
    except Exception as exc:  # noqa: BLE001
        return None, f"the source's body LoRA does not load: {describe_exception(exc)}"
    missing = [k for k in loaded.missing_keys if "lora_" in k and ".default" in k]
    if loaded.unexpected_keys or missing:
        return None, f"the source's body LoRA does not load cleanly ({listed(loaded.unexpected_keys + missing)})"
    return model, ""


def _tuner_source_logits(source: Path, base_model: BaseModel, auto_name: str, inputs: Any) -> tuple[Any, str]:
    """A non-LoRA tuner's source, repaired in memory and run by peft unmerged: its body layers compute with
    peft's own forward, so a merged export is checked against another code path than the one that merged it."""
    from ckpt_migrate.core.errors import CkptMigrateError
    from ckpt_migrate.execute.in_memory import load_repaired
    from ckpt_migrate.planner import plan_checkpoint

    try:
        plan = plan_checkpoint(source, base_model=base_model)
        model = load_repaired(plan, base_model, auto_name)
    except CkptMigrateError as exc:
        return None, f"the source cannot be loaded repaired: {exc}"
    note = (
        "the source was run by peft with its body layers unmerged (another code path than the export's merge) and "
        "its heads repaired in memory by the same fold as the export (not independent for the heads)"
    )
    return logits(model, inputs), note
