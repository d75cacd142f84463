"""Routed experts with LoRA deltas on the vendor grouped GEMM (`grouped_mm`), without host syncs.

The experts-lora path on CUDA: tokens are sorted by expert on the device (sort, histogram,
cumulative sum: no `.tolist()`), and every product, the frozen base experts and the rank-r
LoRA segments alike, is one `torch.nn.functional.grouped_mm` call over all experts (cuBLAS /
CUTLASS grouped GEMMs, the kernels transformers' own `grouped_mm` experts use). Autograd
differentiates it; frozen expert weights get no weight-gradient products. The shapes depend on
the number of tokens only, so CUDA graphs and torch.compile can capture it.

grouped_mm needs 16-byte aligned rows: bf16 (or fp16) with a LoRA rank that is a multiple of
8. `supports` says whether a call qualifies; `upcycle.kernels.dispatch` sends other calls
elsewhere.

Shapes: x (T, H); gate_up_w (E, 2I, H) ([gate; up] rows); down_w (E, H, I); weights, ids
(T, K); lora "gate_up" (A (E, r, H), B (E, 2I, r)) and "down" (A (E, r, I), B (E, H, r)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def supports(x: Tensor, lora: dict[str, tuple[Tensor, Tensor]]) -> bool:
    """Whether grouped_mm takes this call: CUDA, 16-bit floats, ranks in multiples of 8."""
    if _GROUPED_MM is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return all(a.shape[1] % 8 == 0 for a, _ in lora.values())


def device_routing(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order, tokens, offsets) of the (token, slot) pairs sorted by expert, all on the device:
    order (T*K,) flat pair indices, tokens (T*K,) their token, offsets (E,) int32 cumulative
    ends as grouped_mm takes them. A histogram, unlike bincount, needs no host sync."""
    flat = ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    hist_in = sorted_ids.int() if flat.is_cuda else sorted_ids.float()
    counts = torch.histc(hist_in, bins=num_experts, min=0, max=num_experts - 1)
    return order, order // ids.shape[1], torch.cumsum(counts, 0, dtype=torch.int32)


def grouped_linear(xs: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """Rows of xs (sorted by expert) times w[e]^T for their expert e; w (E, out, in)."""
    return _GROUPED_MM(xs, w.transpose(-2, -1), offs=offsets)


def _lora(xs: Tensor, pair: tuple[Tensor, Tensor], offsets: Tensor, scaling: float) -> Tensor:
    a, b = pair
    return grouped_linear(grouped_linear(xs, a, offsets), b, offsets) * scaling


def experts_lora(
    x: Tensor,
    gate_up_w: Tensor,
    down_w: Tensor,
    act: Callable[[Tensor], Tensor],
    weights: Tensor,
    ids: Tensor,
    lora: dict[str, tuple[Tensor, Tensor]],
    scaling: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """sum_k w[t, k] * FFN_{ids[t, k]}(x[t]) with per-expert LoRA deltas: (T, H) -> (T, H).

    Same function as `reference.routed_experts_lora`. Ids >= E (expert-parallel sentinels)
    contribute nothing. Dropout with `dropout_p` applies to the LoRA inputs only.
    """
    E = gate_up_w.shape[0]
    T, H = x.shape
    lora = {role: (a.to(x.dtype), b.to(x.dtype)) for role, (a, b) in lora.items()}
    w = weights.masked_fill(ids >= E, 0.0)
    order, tokens, offsets = device_routing(ids.clamp(max=E - 1), E)
    ws = w.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
    xs = x.index_select(0, tokens)
    gu = grouped_linear(xs, gate_up_w.to(x.dtype), offsets)  # (TK, 2I)
    if "gate_up" in lora:
        xd = F.dropout(xs, dropout_p) if dropout_p > 0 else xs
        gu = gu + _lora(xd, lora["gate_up"], offsets, scaling)
    gate, up = gu.chunk(2, dim=-1)
    h = act(gate) * up
    ys = grouped_linear(h, down_w.to(x.dtype), offsets)  # (TK, H)
    if "down" in lora:
        hd = F.dropout(h, dropout_p) if dropout_p > 0 else h
        ys = ys + _lora(hd, lora["down"], offsets, scaling)
    return x.new_zeros(T, H).index_add(0, tokens, ys * ws)
