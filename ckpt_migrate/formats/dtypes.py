"""The one dtype table: safetensors names, element sizes, torch dtypes.

Ordered as safetensors sorts dtypes (ascending size; files store the largest first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DType:
    name: str  # as in a safetensors header
    size: int  # bytes per element
    torch_name: str  # attribute of the torch module
    floating: bool = False


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 1, "bool"),
        DType("U8", 1, "uint8"),
        DType("I8", 1, "int8"),
        DType("F8_E5M2", 1, "float8_e5m2", floating=True),
        DType("F8_E4M3", 1, "float8_e4m3fn", floating=True),
        DType("I16", 2, "int16"),
        DType("U16", 2, "uint16"),
        DType("F16", 2, "float16", floating=True),
        DType("BF16", 2, "bfloat16", floating=True),
        DType("I32", 4, "int32"),
        DType("U32", 4, "uint32"),
        DType("F32", 4, "float32", floating=True),
        DType("F64", 8, "float64", floating=True),
        DType("I64", 8, "int64"),
        DType("U64", 8, "uint64"),
    )
}
STORAGE_RANK = {name: rank for rank, name in enumerate(DTYPES)}
_BY_TORCH_NAME = {d.torch_name: d.name for d in DTYPES.values()}


def to_torch(name: str) -> Any:
    """The torch dtype of a safetensors dtype name (imports torch)."""
    import torch

    return getattr(torch, DTYPES[name].torch_name)


def from_torch(dtype: Any) -> str | None:
    """The safetensors name of a torch dtype, or None if safetensors cannot store it."""
    return _BY_TORCH_NAME.get(str(dtype).removeprefix("torch."))
