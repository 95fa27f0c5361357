"""Fold one tuner-wrapped head module with the installed peft's own layer code: the ``compute`` of 0002/0007/0010.

The module is rebuilt alone: a plain ``nn.Linear`` holding the trained base weight (float64), placed
at its path in an otherwise empty model, which peft's tuner model for the adapter's ``peft_type``
injects exactly as it injects a real model. The trained copy's tensors are loaded into that layer
(every tensor the layer holds must come from the checkpoint, every checkpoint tensor must find its
place), the unmerged layer is probed, ``merge()`` is called in float64, and the merged weights must
give the unmerged layer's outputs. No formula of any tuner is re-derived here.

The same code merges a LoRA module whose init rewrote its base weight (PiSSA, OLoRA; see
:mod:`ckpt_migrate.core.lora_init`): the layer is built in the base weight's dtype, so that peft's own init
replaces it by the residual training ran on, then turned float64 before the saved A/B are loaded and merged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from typing import Any

from ckpt_migrate.core.errors import UnrecoverableError
from ckpt_migrate.core.migration import TensorSource
from ckpt_migrate.core.plan import PlannedTensor
from ckpt_migrate.core.tuners import TUNERS
from ckpt_migrate.execute.derived_buffers import derived_buffer
from ckpt_migrate.migrations._tuner_fold import TunerFold

ADAPTER = "default"
#: Relative tolerance of the merged layer's (float64) outputs against the unmerged layer's (float32).
MERGE_TOLERANCE = 1e-5


def _holder(module: str, weight: Any, bias: Any, dtype: Any) -> Any:
    """A model holding only ``module``: empty containers along its path, an nn.Linear of ``dtype`` at its end."""
    import torch

    root = parent = torch.nn.Module()
    *path, leaf = module.split(".")
    for name in path:
        child = torch.nn.Module()
        parent.add_module(name, child)
        parent = child
    out_features, in_features = weight.shape
    linear = torch.nn.Linear(in_features, out_features, bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    parent.add_module(leaf, linear)
    return root


def _config(peft_type: str, values: dict[str, Any]) -> Any:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = {k: v for k, v in values.items() if k not in fields and k != "peft_type"}
    meaningful = {k: v for k, v in unknown.items() if v not in (None, False, {}, [], "")}
    if meaningful:
        raise UnrecoverableError(
            f"the installed peft's {cls.__name__} does not know {', '.join(sorted(meaningful))}, which the adapter sets"
        )
    return cls(**{k: v for k, v in values.items() if k in fields})


def _load(layer: Any, fold: TunerFold, read: TensorSource) -> None:
    """Every tensor of the trained copy into the layer; every adapter tensor of the layer from the checkpoint."""
    import torch

    tuner = TUNERS.get(fold.peft_type)  # None: LoRA, whose layer has no shared or derived tensors
    shared, derived = (tuner.shared, tuner.derived) if tuner else ((), ())
    expected = {k for k in layer.state_dict() if not k.startswith("base_layer.")}
    state: dict[str, Any] = {}
    for kind, name in fold.tensors:
        value = read(name).to(torch.float64)
        first, _, rest = kind.partition(".")
        key = f"{first}.{ADAPTER}" + (f".{rest}" if rest else "")
        if key in expected:
            container = getattr(layer, first)
            if first in shared and not rest and container[ADAPTER].shape != value.shape:
                # Shared projections are sized by the whole model's largest layer; the layer slices them.
                container[ADAPTER] = value.clone()
            state[key] = value
        elif kind in expected:  # a buffer of the layer itself, saved by this release (BOFT's boft_P before 0.13)
            state[kind] = value
        elif isinstance(getattr(layer, kind, None), torch.Tensor):
            # A buffer the installed peft derives itself (BOFT's permutation): it must be what was saved.
            if not derived_buffer(layer, kind, value):
                raise UnrecoverableError(f"{fold.module}.{kind}: the installed peft derives another value")
        else:
            raise UnrecoverableError(f"{fold.module}.{kind}: the installed peft's layer has no such tensor")
    missing = sorted(expected - set(state) - {f"{kind}.{ADAPTER}" for kind in derived})
    if missing:
        raise UnrecoverableError(f"{fold.module}: the installed peft's layer also needs {', '.join(missing)}")
    own_shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    wrong = [
        f"{k} {tuple(v.shape)} (layer: {own_shapes[k]})" for k, v in state.items() if tuple(v.shape) != own_shapes[k]
    ]
    if wrong:
        raise UnrecoverableError(
            f"{fold.module}: the installed peft builds this layer with other shapes than were saved: {', '.join(wrong)}"
        )
    layer.load_state_dict(state, strict=False)


def merged_module(fold: TunerFold, read: TensorSource) -> tuple[Any, Any]:
    """(weight, bias) of the head module with the tuner merged in, float64; bias None without one."""
    import torch
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTunerLayer

    weight = read(fold.weight, fold.weight_file)
    bias = read(fold.bias, fold.bias_file) if fold.bias else None
    in_features = weight.shape[1]
    # A LoRA layer is built to replay its init (PiSSA, OLoRA: they rewrite the base weight, in the dtype training
    # loaded it in, and refuse float64); every other tuner's layer is built in float64 at once.
    replay = fold.peft_type == "LORA"
    holder = _holder(fold.module, weight, bias, weight.dtype if replay else torch.float64)
    del weight, bias  # the holder's layer has its own copies: memory holds about four copies of one weight at most
    with warnings.catch_warnings():
        # peft's setup chatter (BOFT's CUDA extension, AdaLoRA's unused r): what matters is checked below.
        warnings.simplefilter("ignore")
        config = _config(fold.peft_type, json.loads(fold.config))
        PEFT_TYPE_TO_TUNER_MAPPING[fold.peft_type](holder, config, ADAPTER)
    layer = holder.get_submodule(fold.module)
    if not isinstance(layer, BaseTunerLayer):
        raise UnrecoverableError(f"{fold.module}: the installed peft did not wrap it with its {fold.peft_type} layer")
    if replay:
        layer.double()  # the residual as the init computed it, then float64 like every other fold
    layer.eval()
    with torch.no_grad():
        _load(layer, fold, read)
        # The unmerged layer runs in float32, as in training (some releases' forward assumes it: HRA in 0.12).
        probe = torch.randn((8, in_features), generator=torch.Generator().manual_seed(0))
        unmerged = copy.deepcopy(layer).float()(probe).double()  # a float32 copy, freed right after
        layer.merge()
        base = layer.get_base_layer()
        merged = torch.nn.functional.linear(probe.double(), base.weight, base.bias)
    scale = unmerged.abs().max().item() or 1.0
    error = (merged - unmerged).abs().max().item() / scale
    if not torch.isfinite(base.weight).all() or not error <= MERGE_TOLERANCE:
        raise UnrecoverableError(
            f"{fold.module}: the installed peft's merged {fold.peft_type} layer does not compute what its unmerged "
            f"layer computes (relative error {error:.3g})"
        )
    return base.weight.detach(), None if base.bias is None else base.bias.detach()


def merged_parameter(tensor: PlannedTensor, read: TensorSource) -> Any:
    """The planned weight or bias of one module merged with its tuner (a ``TunerFold`` payload), in its dtype."""
    from ckpt_migrate.formats.dtypes import to_torch

    fold: TunerFold = tensor.source.payload
    weight, bias = merged_module(fold, read)
    return (weight if fold.param == "weight" else bias).to(to_torch(tensor.dtype))
