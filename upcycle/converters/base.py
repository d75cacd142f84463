"""What a conversion method produces, and the registry of methods.

A method is small and pure: given one dense FFN (tensors by role: gate, up, down) it returns an
MoE layer (router, experts, optional shared expert). It never sees file names or shards; the
engine in `upcycle.convert` plans, streams and writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class MoELayout:
    """The shape of every MoE layer a method will produce (known before any weight is read)."""

    num_experts: int
    top_k: int
    expert_width: int
    shared_width: int = 0
    needs_top_k_normalization: bool = True  # exactness relies on renormalized top-k weights


@dataclass
class MoELayer:
    router: torch.Tensor  # (E, H)
    experts: list[
        dict[str, torch.Tensor]
    ]  # E x {"gate": (I_e, H), "up": (I_e, H), "down": (H, I_e)}
    shared: dict[str, torch.Tensor] | None = None  # {"gate","up","down"} of the shared expert
    shared_gate: torch.Tensor | None = None  # (1, H), qwen2_moe's sigmoid gate


@dataclass
class MethodInfo:
    name: str
    paper: str
    summary: str
    exact: str
    aliases: tuple[str, ...] = field(default_factory=tuple)


METHODS: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    METHODS[info.name] = info
    return info


def layer_generator(seed: int, layer: int, salt: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, layer, salt): order-independent output."""
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + layer * 7_919 + salt * 104_729) % (2**63)
    )
