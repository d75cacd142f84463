"""Tensors as numpy arrays tagged with a safetensors dtype name, and casts between them.

The conversion path reads, copies, casts and writes tensors without importing torch (whose
import alone takes seconds): numpy has no bfloat16, so BF16 data lives in uint16 arrays and is
cast with the same round-to-nearest-even rule torch uses. Methods that need real math convert
to torch with `to_torch` (no copy) and back with `from_torch`.
"""

from __future__ import annotations

import numpy as np

# safetensors dtype name -> numpy storage dtype
STORAGE: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOATS = ("F64", "F32", "F16", "BF16")
# names users and configs use
NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
CONFIG_NAMES = {v: k for k, v in NAMES.items()}


def itemsize(dtype: str) -> int:
    return STORAGE[dtype].itemsize


def nbytes_of(dtype: str, shape) -> int:
    n = itemsize(dtype)
    for s in shape:
        n *= s
    return n


def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch does; NaN stays a quiet NaN."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def to_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return _bf16_to_f32(a)
    return a.astype(np.float32, copy=False)


def cast(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Cast an array stored as `src` to `dst` (no copy when they are the same)."""
    if src == dst:
        return a
    if dst == "BF16":
        return _f32_to_bf16(to_float32(a, src))
    if src == "BF16":
        return _bf16_to_f32(a).astype(STORAGE[dst], copy=False)
    return a.astype(STORAGE[dst])


def to_torch(a: np.ndarray, dtype: str):
    """A torch tensor sharing memory with `a`."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "BF16" else t


def from_torch(t, dtype: str) -> np.ndarray:
    """A torch tensor -> array stored as `dtype` (cast by torch, which rounds the same way)."""
    import torch

    torch_dtype = {
        "F32": torch.float32,
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "F64": torch.float64,
    }[dtype]
    t = t.detach().to("cpu", torch_dtype).contiguous()
    return t.view(torch.uint16).numpy() if dtype == "BF16" else t.numpy()
