"""What a conversion method produces, and the registry of methods.

A method is small and pure: given one dense FFN (arrays by role: gate, up, down) it returns an
MoE layer (router, experts, optional shared expert). It never sees file names or shards; the
engine in `upcycle.convert` plans, streams and writes.

Tensors are numpy arrays (see `upcycle.io.arrays`): FFN and expert weights are stored in the
output dtype (BF16 as uint16), routers and shared-expert gates are float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
    router: np.ndarray  # (E, H) float32
    experts: list[dict[str, np.ndarray]]  # E x {"gate": (I_e, H), "up": (I_e, H), "down": (H, I_e)}
    shared: dict[str, np.ndarray] | None = None  # {"gate","up","down"}: always on, weight 1


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


def layer_rng(seed: int, layer: int, salt: int) -> np.random.Generator:
    """A generator whose stream depends only on (seed, layer, salt): order-independent output."""
    return np.random.default_rng([seed, layer, salt])
