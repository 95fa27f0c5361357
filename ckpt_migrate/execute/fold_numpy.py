"""The LoRA fold ``W + s * B @ A`` in float64 with numpy, so that a repair whose only computed tensor is a fold
never imports torch (``import torch`` alone costs about 3 CPU-seconds; numpy, 0.1).

It computes what :func:`ckpt_migrate.execute.tensors.fold` computes with torch, operation for operation: the
weight and the factors widened to float64 (exactly), the same block-by-block ``W + s * (B @ A)``, the DoRA row
rescale, and the way back to the stored dtype as torch casts: float64 -> float32 (round to nearest even) and,
for float16/bfloat16, float32 -> 16 bits (round to nearest even again; torch has no direct double -> half cast,
and a direct one differs on values between a 16-bit midpoint and the float32 next to it). numpy has no
bfloat16: its bits are kept as uint16 and converted with integer arithmetic, the formula of torch's
``c10::detail::round_to_nearest_even`` (NaN -> 0x7FC0, as torch's scalar path writes it; its vectorized
path writes 0xFFFF: NaN bits are the one thing not compared). The float64 arithmetic itself can differ from torch's
in the last float64 bit (BLAS and reduction order), which moves a stored float32/16 value only when the exact
result lies within a few float64 ulps of a rounding midpoint of the stored dtype; tests/test_fold_numpy.py
compares the two implementations byte for byte on every fold of the real fixtures and on large random folds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: The safetensors dtypes this module converts, as the numpy dtype of their stored bits.
STORED = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
#: Elements of a weight folded at a time (8 MB of float64), as the torch fold does.
FOLD_BLOCK_ELEMENTS = 1024 * 1024

#: Reads a tensor's stored bits: (tensor name, base file or None for the adapter) -> read-only array.
ReadBits = Callable[[str, Any], np.ndarray]


def to_float64(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bits of ``dtype`` as float64 values (every conversion here is exact)."""
    if dtype == "BF16":
        widened = bits.astype(np.uint32) << np.uint32(16)
        return widened.view(np.float32).astype(np.float64)
    return bits.astype(np.float64)


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values -> bfloat16 bits, rounded to nearest even, as torch rounds them (any NaN -> 0x7FC0)."""
    bits = values.view(np.uint32)
    bias = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = ((bits + bias) >> np.uint32(16)).astype(np.uint16)  # max finite + bias stays below 2**32
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def from_float64(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values -> stored bits of ``dtype``, rounded as torch's ``.to(dtype)`` of a float64 tensor does."""
    if dtype == "F64":
        return values
    with np.errstate(over="ignore"):  # beyond float32's range is inf, as in torch
        single = values.astype(np.float32)
    if dtype == "F32":
        return single
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return single.astype(np.float16)
    return _bf16_bits(single)


def convert(bits: np.ndarray, source: str, target: str) -> np.ndarray:
    """Stored bits of ``source`` as stored bits of ``target``, as torch's ``.to()`` converts (see the module doc)."""
    if source == target:
        return bits
    return from_float64(to_float64(bits, source), target)


def fold(
    weight: np.ndarray,
    weight_dtype: str,
    lora_a: np.ndarray,
    lora_b: np.ndarray,
    scale: float,
    fan_in_fan_out: bool = False,
    magnitude: np.ndarray | None = None,
) -> np.ndarray:
    """The folded weight, as stored bits of ``weight_dtype`` (a new array; ``weight`` may be a read-only map).

    ``lora_a``, ``lora_b`` and ``magnitude`` are float64. Rows are folded a block at a time, so the float64 work
    stays in a few MB whatever the weight's size.
    """
    out = np.empty(weight.shape, dtype=STORED[weight_dtype])
    source, target = (weight.T, out.T) if fan_in_fan_out else (weight, out)
    rows, cols = source.shape
    block = rows if fan_in_fan_out else max(1, FOLD_BLOCK_ELEMENTS // max(1, cols))
    magnitude = magnitude.reshape(-1) if magnitude is not None else None
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        merged = to_float64(source[start:stop], weight_dtype)
        merged += scale * (lora_b[start:stop] @ lora_a)
        if magnitude is not None:
            merged *= (magnitude[start:stop] / np.linalg.norm(merged, axis=1))[:, None]
        target[start:stop] = from_float64(merged, weight_dtype)
    return out


def supported(*dtypes: str) -> bool:
    return all(d in STORED for d in dtypes)
