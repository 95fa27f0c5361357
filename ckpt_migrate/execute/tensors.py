"""The bytes of each planned output tensor: copied from where the plan says, or computed by a fold."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import OutputError
from ckpt_migrate.core.plan import CheckpointPlan, PlannedTensor, SourceKind
from ckpt_migrate.execute import fold_numpy
from ckpt_migrate.formats.adapter import SAFETENSORS_WEIGHTS, load_bin_tensors
from ckpt_migrate.formats.dtypes import DTYPES, from_torch, to_torch
from ckpt_migrate.formats.safetensors import Computed, CopyFrom, OutputTensor, SafetensorsHeader, read_header


def tensor_bytes(tensor: Any) -> memoryview:
    """The little-endian bytes safetensors stores for ``tensor`` (works for bfloat16 too), without a copy."""
    return memoryview(tensor.contiguous().reshape(-1).view(to_torch("U8")).numpy())


def _from_bytes(raw: bytearray, dtype: str, shape: tuple[int, ...]) -> Any:
    """A tensor over ``raw`` itself (writable: a fold updates it in place)."""
    import torch

    if not raw:
        return torch.empty(shape, dtype=to_torch(dtype))
    return torch.frombuffer(raw, dtype=to_torch(dtype)).reshape(shape)


class TensorReader:
    """Reads the few tensors a fold needs, from the adapter or a base model file, never whole files."""

    def __init__(self, adapter_weights: Path):
        self._bin = load_bin_tensors(adapter_weights) if adapter_weights.name != SAFETENSORS_WEIGHTS else None
        self._adapter = read_header(adapter_weights) if self._bin is None else None
        self._base_headers: dict[Path, SafetensorsHeader] = {}

    @classmethod
    def of(cls, plan: CheckpointPlan) -> TensorReader:
        """The reader of the adapter the plan was made from."""
        return cls(plan.before.source_dir / plan.before.weights_file)

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
            return self._bin[name].clone()  # a fold updates what it reads in place
        info = header.tensors[name]
        return _from_bytes(header.read_bytes(name), info.dtype, info.shape)

    def bits(self, name: str, base_file: Path | None = None) -> Any:
        """The stored bits of one tensor of a safetensors file as a read-only numpy array over the file's pages
        (:data:`fold_numpy.STORED` dtypes only), or None for a ``.bin`` adapter or another dtype."""
        import numpy as np

        header = self._header(base_file)
        info = header.tensors.get(name) if header is not None else None
        if info is None or info.dtype not in fold_numpy.STORED:
            return None
        dtype = fold_numpy.STORED[info.dtype]
        if info.nbytes == 0:
            return np.empty(info.shape, dtype=dtype)
        return np.memmap(header.path, dtype=dtype, mode="r", offset=header.data_start + info.begin, shape=info.shape)

    def dtype(self, name: str, base_file: Path | None = None) -> str:
        header = self._header(base_file)
        return header.tensors[name].dtype if header is not None else from_torch(self._bin[name].dtype)

    def copy_source(self, tensor: PlannedTensor) -> memoryview | CopyFrom:
        """Where an output tensor that is not computed gets its bytes."""
        source = tensor.source
        header = self._header(source.base_file)
        if header is None:
            return tensor_bytes(self._bin[source.tensor])
        info = header.tensors[source.tensor]
        return CopyFrom(header.path, header.data_start + info.begin, info.nbytes)


#: Rows of a weight folded at a time: the float64 work stays in a few MB (fresh multi-GB float64 copies cost more
#: in page faults than the arithmetic), and the result is written over the weight as read.
FOLD_BLOCK_BYTES = 8 * 1024 * 1024


def fold(reader: TensorReader, tensor: PlannedTensor) -> Any:
    """``W + s * B @ A`` (with DoRA, rows rescaled to the learned magnitude), in float64, cast back, with torch:
    for a ``.bin`` adapter (torch loaded it already) and dtypes numpy lacks; else :func:`folded_bits` computes
    the same bytes with numpy, without importing torch.

    Block by block of output rows, each block computed in float64 and written back into the weight as read, so
    a fold holds the weight once plus a few MB. (Each output element is the same float64 expression as for the
    whole matrix at once; the naive-script comparison checks the bytes.)
    """
    import torch

    source = tensor.source
    weight = reader.tensor(source.tensor, source.base_file)
    out_in = weight.T if source.fan_in_fan_out else weight  # a view: the in-place updates land in ``weight``
    lora_a, lora_b = reader.tensor(source.lora_A).double(), reader.tensor(source.lora_B).double()
    magnitude = reader.tensor(source.magnitude).double().reshape(-1) if source.magnitude else None
    rows = out_in.shape[0]
    block = rows if source.fan_in_fan_out else max(1, FOLD_BLOCK_BYTES // (8 * max(1, out_in.shape[1])))
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        merged = out_in[start:stop].double()
        merged.addmm_(lora_b[start:stop], lora_a, alpha=source.scale)
        if magnitude is not None:
            merged.mul_((magnitude[start:stop] / torch.linalg.norm(merged, dim=1))[:, None])
        out_in[start:stop] = merged
    return weight


def folded_bits(reader: TensorReader, tensor: PlannedTensor, dtype: str | None = None) -> Any:
    """A ``FOLD`` (or a plain cast of a copied tensor) computed with numpy, as stored bits of ``dtype`` (default:
    the planned dtype), or None when numpy cannot (a ``.bin`` adapter, or a dtype numpy lacks)."""
    source = tensor.source
    dtype = dtype or tensor.dtype
    weight = reader.bits(source.tensor, source.base_file)
    if weight is None or not fold_numpy.supported(dtype):
        return None
    weight_dtype = reader.dtype(source.tensor, source.base_file)
    if source.kind is not SourceKind.FOLD:
        return fold_numpy.convert(weight, weight_dtype, dtype)
    names = [source.lora_A, source.lora_B] + [source.magnitude] * bool(source.magnitude)
    parts = [reader.bits(name) for name in names]
    if any(part is None for part in parts):
        return None
    wide = [fold_numpy.to_float64(part, reader.dtype(name)) for part, name in zip(parts, names, strict=True)]
    magnitude = wide[2] if source.magnitude else None
    folded = fold_numpy.fold(weight, weight_dtype, wide[0], wide[1], source.scale, source.fan_in_fan_out, magnitude)
    return fold_numpy.convert(folded, weight_dtype, dtype)


def numpy_folds(reader: TensorReader, tensor: PlannedTensor) -> bool:
    """Whether :func:`folded_bits` computes this ``FOLD`` (so the write needs no torch for it); reads headers only."""
    source = tensor.source
    names = [(source.tensor, source.base_file), (source.lora_A, None), (source.lora_B, None)]
    names += [(source.magnitude, None)] * bool(source.magnitude)
    try:
        dtypes = [reader.dtype(name, base_file) for name, base_file in names]
    except KeyError:
        return False
    return reader.source_data_start is not None and fold_numpy.supported(tensor.dtype, *dtypes)


def computed(reader: TensorReader, tensor: PlannedTensor) -> Any:
    """A ``COMPUTED`` tensor, from the ``compute`` of the migration that planned it; checked against the plan."""
    from ckpt_migrate.core.migration import ComputingMigration
    from ckpt_migrate.migrations import by_id

    migration = by_id(tensor.source.migration)
    if not isinstance(migration, ComputingMigration):
        raise TypeError(f"migration {tensor.source.migration} planned {tensor.name} but has no compute()")
    value = migration.compute(tensor, reader.tensor)
    if tuple(value.shape) != tensor.shape or from_torch(value.dtype) != tensor.dtype:
        got = f"{tuple(value.shape)} {value.dtype}"
        raise OutputError(f"{tensor.name}: computed {got}, planned {tensor.shape} {tensor.dtype}")
    return value


def value(reader: TensorReader, tensor: PlannedTensor) -> Any:
    """The planned tensor as a torch tensor, whatever its source."""
    kind = tensor.source.kind
    if kind is SourceKind.FOLD:
        bits = folded_bits(reader, tensor)
        if bits is None:
            return fold(reader, tensor)
        return _from_bytes(bytearray(bits.tobytes()), tensor.dtype, tensor.shape)
    if kind is SourceKind.COMPUTED:
        return computed(reader, tensor)
    return reader.tensor(tensor.source.tensor, tensor.source.base_file)


def output_tensors(
    tensors: Iterable[PlannedTensor], reader: TensorReader, cast_to: str | None = None, fold_with_torch: bool = False
) -> list[OutputTensor]:
    """Every tensor to write: byte ranges to copy, or a function computing the bytes when the writer needs them.

    Nothing is computed here, so memory holds one computed tensor at a time however many there are.
    ``cast_to``: a safetensors float dtype every floating tensor is converted to. ``fold_with_torch``: fold with
    torch rather than numpy (the same bytes): worth it only where torch is imported anyway and there are many
    folds (export: its float64 matmul was measured 1.3-1.6 CPU-s per 0.6 GiB of folded weights cheaper than numpy's).
    """
    outputs = []
    for tensor in tensors:
        dtype = cast_to if cast_to and DTYPES[tensor.dtype].floating else tensor.dtype
        if tensor.source.kind in (SourceKind.FOLD, SourceKind.COMPUTED) or dtype != tensor.dtype:
            data: Computed | CopyFrom = partial(_computed_bytes, reader, tensor, dtype, fold_with_torch)
        else:
            data = reader.copy_source(tensor)
        outputs.append(OutputTensor(tensor.name, dtype, tensor.shape, data))
    return outputs


def _computed_bytes(reader: TensorReader, tensor: PlannedTensor, dtype: str, fold_with_torch: bool) -> memoryview:
    by_torch = tensor.source.kind is SourceKind.COMPUTED or (fold_with_torch and tensor.source.kind is SourceKind.FOLD)
    bits = None if by_torch else folded_bits(reader, tensor, dtype)
    if bits is not None:
        import numpy as np

        return memoryview(np.ascontiguousarray(bits)).cast("B")
    if tensor.source.kind is SourceKind.FOLD:
        return tensor_bytes(fold(reader, tensor).to(to_torch(dtype)))
    return tensor_bytes(value(reader, tensor).to(to_torch(dtype)))
