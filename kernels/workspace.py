"""A per-thread workspace of scratch tensors for the CPU Functions (fused.py, experts.py).

On CPU, every fresh large tensor costs page faults (glibc hands big blocks back to the kernel
when they are freed), so temporaries that are not kept for backward live in named slots that
every layer and step reuse. On other devices `buffer` is a plain `new_empty`: their
allocators cache blocks already.
"""

from __future__ import annotations

import threading

import torch

_WORKSPACE = threading.local()


def buffer(name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialized (rows, cols) scratch tensor, reused across calls on CPU.

    A slot holds one temporary at a time; callers never save or return it.
    """
    if like.device.type != "cpu":
        return like.new_empty(rows, cols)
    slots = _WORKSPACE.__dict__.setdefault("slots", {})
    key = (name, like.dtype)
    flat = slots.get(key)
    if flat is None or flat.numel() < rows * cols:
        slots[key] = flat = None  # drop the old block before taking a bigger one
        slots[key] = flat = torch.empty(rows * cols, dtype=like.dtype)
    return flat[: rows * cols].view(rows, cols)


def release_workspace() -> None:
    """Free this thread's scratch tensors (they are taken again on the next call)."""
    _WORKSPACE.__dict__.pop("slots", None)


def none_if_empty(t: torch.Tensor) -> torch.Tensor | None:
    """A saved tensor, or None where an empty placeholder stood for a missing one."""
    return t if t.numel() else None
