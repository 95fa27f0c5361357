"""The bytes of each planned output tensor: copied from where the plan says, or computed by a fold."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from ckpt_migrate.core.plan import CheckpointPlan, PlannedTensor, SourceKind
from ckpt_migrate.formats.adapter import SAFETENSORS_WEIGHTS, load_bin_tensors
from ckpt_migrate.formats.dtypes import to_torch
from ckpt_migrate.formats.safetensors import Computed, CopyFrom, OutputTensor, SafetensorsHeader, read_header


def tensor_bytes(tensor: Any) -> bytes:
    """The little-endian bytes safetensors stores for ``tensor`` (works for bfloat16 too)."""
    return tensor.contiguous().reshape(-1).view(to_torch("U8")).numpy().tobytes()


def _from_bytes(raw: bytes, dtype: str, shape: tuple[int, ...]) -> Any:
    import torch

    if not raw:
        return torch.empty(shape, dtype=to_torch(dtype))
    return torch.frombuffer(bytearray(raw), dtype=to_torch(dtype)).reshape(shape)


class TensorReader:
    """Reads the few tensors a fold needs, from the adapter or a base model file, never whole files."""

    def __init__(self, plan: CheckpointPlan):
        source_weights = plan.before.source_dir / plan.before.weights_file
        self._bin = load_bin_tensors(source_weights) if plan.before.weights_file != SAFETENSORS_WEIGHTS else None
        self._adapter = read_header(source_weights) if self._bin is None else None
        self._base_headers: dict[Path, SafetensorsHeader] = {}

    @property
    def source_data_start(self) -> int | None:
        """Where the source adapter's tensor data starts (the new file keeps its block phase), if safetensors."""
        return self._adapter.data_start if self._adapter is not None else None

    @property
    def source_metadata(self) -> dict[str, str]:
        return dict(self._adapter.metadata) if self._adapter is not None else {"format": "pt"}

    def _header(self, base_file: Path | None) -> SafetensorsHeader | None:
        if base_file is None:
            return self._adapter
        if base_file not in self._base_headers:
            self._base_headers[base_file] = read_header(base_file)
        return self._base_headers[base_file]

    def tensor(self, name: str, base_file: Path | None = None) -> Any:
        header = self._header(base_file)
        if header is None:
            return self._bin[name]
        info = header.tensors[name]
        return _from_bytes(header.read_bytes(name), info.dtype, info.shape)

    def copy_source(self, tensor: PlannedTensor) -> bytes | CopyFrom:
        """Where an output tensor that is not computed gets its bytes."""
        source = tensor.source
        header = self._header(source.base_file)
        if header is None:
            return tensor_bytes(self._bin[source.tensor])
        info = header.tensors[source.tensor]
        return CopyFrom(header.path, header.data_start + info.begin, info.nbytes)


def fold(reader: TensorReader, tensor: PlannedTensor) -> Any:
    """``W + s * B @ A`` (with DoRA, rows rescaled to the learned magnitude), in float64, cast back."""
    import torch

    source = tensor.source
    weight = reader.tensor(source.tensor, source.base_file)
    out_in = weight.double().T if source.fan_in_fan_out else weight.double()
    lora_a, lora_b = reader.tensor(source.lora_A).double(), reader.tensor(source.lora_B).double()
    merged = out_in + source.scale * (lora_b @ lora_a)
    if source.magnitude:
        magnitude = reader.tensor(source.magnitude).double().reshape(-1)
        merged = (magnitude / torch.linalg.norm(merged, dim=1))[:, None] * merged
    if source.fan_in_fan_out:
        merged = merged.T
    return merged.to(weight.dtype)


def output_tensors(plan: CheckpointPlan, reader: TensorReader) -> list[OutputTensor]:
    """Every tensor of the new adapter file: the byte range to copy it from, or how to compute it.

    Folds are computed when the writer reaches them, so torch is imported while the kernel copies.
    """
    outputs = []
    for tensor in plan.after.tensors.values():
        if tensor.source.kind is SourceKind.FOLD:
            data: Computed | CopyFrom = partial(_folded_bytes, reader, tensor)
        else:
            data = reader.copy_source(tensor)
        outputs.append(OutputTensor(tensor.name, tensor.dtype, tensor.shape, data))
    return outputs


def _folded_bytes(reader: TensorReader, tensor: PlannedTensor) -> bytes:
    return tensor_bytes(fold(reader, tensor))
