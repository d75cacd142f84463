"""Torch reference for routed LoRA experts (CPU and CUDA): plain torch ops, nothing else.

The functions every implementation is checked against: `routed_lora_ffn` (MixLoRA: LoRA
experts over one shared frozen FFN) and `routed_experts_lora` (separate frozen experts with
per-expert LoRA deltas), with what the faster implementations share: `sort_by_expert`,
`function_args`, `act_and_slope` (any element-wise activation and its slope) and the
LoRA-input dropout (`fast_dropout`, `dropped_positions`, `zero_at`).
Those implementations (`experts`, `fused`, `grouped`, `mixlora_dense`, the Triton ops) live in
the sibling modules, and `upcycle.kernels.dispatch` picks which one runs; routing tokens to
experts and the router losses are in `upcycle.nn.routing`.

A MixLoRA-style layer has E experts that all share the frozen FFN weights (or disjoint slices
of them) and differ only by LoRA deltas. Computing each expert separately would run the base
projections K times per token. Here the base gate/up projections run once for all tokens, and
because the down projection is linear, the base down projection runs once on the
gate-weighted sum of the experts' activations. Only the LoRA deltas run per expert, on tokens
sorted by expert once and reused by every projection, always as `(x @ A_e^T) @ B_e^T`
(never `W + B A`).

Shapes: x (T, H); gate_w, up_w (I, H); down_w (H, I); routing weights and expert ids (T, K);
LoRA A stacks (E, r, in) and B stacks (E, out, r), in peft's orientation (delta W = B A).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LoraPair = tuple[torch.Tensor, torch.Tensor]


def sort_by_expert(experts: torch.Tensor, num_experts: int):
    """Flattened (token, slot) pairs sorted by expert: (order, token index, per-expert counts)."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = order // experts.shape[1]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, tokens, counts


def _segment_lora(xs: torch.Tensor, counts: list[int], pair: LoraPair) -> torch.Tensor:
    """Per-expert (x_e @ A_e^T) @ B_e^T over token segments of xs, concatenated in order."""
    a, b = pair
    parts = [(seg @ a[e].t()) @ b[e].t() for e, seg in enumerate(xs.split(counts))]
    return torch.cat(parts)


def function_args(lora: dict[str, LoraPair], roles: tuple[str, ...], scaling: float) -> list:
    """A_role, B_role * scaling for each role in order, None for a role without LoRA: the
    trailing arguments of the routed-LoRA autograd Functions."""
    args = []
    for role in roles:
        a, b = lora.get(role, (None, None))
        args += [a, b * scaling if b is not None else None]
    return args


def act_and_slope(
    act: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(z), act'(z)) for an element-wise activation, the slope by autograd on a detached
    copy of z (no graph outlives the call). The fused MixLoRA Functions take any activation
    this way; SiLU they compute from one sigmoid instead."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        a = act(leaf)
        (slope,) = torch.autograd.grad(a, leaf, torch.ones_like(a))
    return a.detach(), slope


def _project(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w^T for a weight tensor, or w(x) for a module (e.g. a quantized linear layer)."""
    return F.linear(x, w) if torch.is_tensor(w) else w(x)


def routed_lora_ffn(
    x: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    weights: torch.Tensor,
    experts: torch.Tensor,
    num_experts: int,
    lora: dict[str, LoraPair],
    scaling: float,
    *,
    slices: list[tuple[int, int]] | None = None,
    expert_scale: float = 1.0,
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_scale * FFN_{experts[t, k]}(x[t]) for every token t.

    FFN_e uses the base weights restricted to slices[e] (all neurons when slices is None) plus
    the LoRA deltas in `lora` ("gate", "up", "down": (A, B) stacks; missing roles get none).
    `dropout` is applied to LoRA inputs only.
    """
    drop = dropout or (lambda t: t)
    T = x.shape[0]
    order, tokens, counts = sort_by_expert(experts, num_experts)
    w = (weights.reshape(-1)[order] * expert_scale).to(x.dtype).unsqueeze(-1)
    lora = {role: (a, b * scaling) for role, (a, b) in lora.items()}  # fold the scale into B
    g = _project(x, gate_w)
    u = _project(x, up_w)
    # one dropout mask per token for the gate/up LoRA inputs, shared by its k experts
    xd = drop(x)[tokens] if ("gate" in lora or "up" in lora) else None
    if slices is None:
        gs, us = g[tokens], u[tokens]
        if "gate" in lora:
            gs = gs + _segment_lora(xd, counts, lora["gate"])
        if "up" in lora:
            us = us + _segment_lora(xd, counts, lora["up"])
        hs = act(gs) * us
        mixed = x.new_zeros(T, g.shape[1]).index_add(0, tokens, hs * w)
        y = _project(mixed, down_w)
        if "down" in lora:
            dd = _segment_lora(drop(hs), counts, lora["down"])
            y = y.index_add(0, tokens, dd * w)
        return y
    # granular view: expert e owns neurons slices[e]; each sorted row is zero outside them
    spread = x.new_zeros(tokens.shape[0], g.shape[1])
    deltas = []
    start = 0
    for e, n in enumerate(counts):
        rows = tokens[start : start + n]
        lo, hi = slices[e]
        ge, ue = g[rows, lo:hi], u[rows, lo:hi]
        xe = xd[start : start + n]
        if "gate" in lora:
            a, b = lora["gate"]
            ge = ge + (xe @ a[e].t()) @ b[e].t()
        if "up" in lora:
            a, b = lora["up"]
            ue = ue + (xe @ a[e].t()) @ b[e].t()
        he = act(ge) * ue
        we = w[start : start + n]
        spread[start : start + n, lo:hi] = he * we
        if "down" in lora:
            a, b = lora["down"]
            deltas.append(((drop(he) @ a[e].t()) @ b[e].t()) * we)
        start += n
    y = _project(x.new_zeros(T, g.shape[1]).index_add(0, tokens, spread), down_w)
    if deltas:
        y = y.index_add(0, tokens, torch.cat(deltas))
    return y


def routed_experts_lora(
    x: torch.Tensor,
    gate_up_w: torch.Tensor,
    down_w: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    weights: torch.Tensor,
    experts: torch.Tensor,
    lora: dict[str, LoraPair],
    scaling: float,
    *,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """An MoE layer with separate frozen experts plus per-expert LoRA deltas.

    gate_up_w (E, 2I, H) and down_w (E, H, I) in transformers' fused layout; lora "gate_up"
    (A (E, r, H), B (E, 2I, r)) and "down" (A (E, r, I), B (E, H, r)), either optional.
    Dropout with probability `dropout_p` (0 in eval mode) applies to the LoRA inputs only.
    Tokens are sorted by expert once; each expert's base GEMMs and LoRA run on its segment,
    under autograd, for any activation. `upcycle.kernels.dispatch.routed_experts_lora` runs
    the faster implementations of the same function.
    """
    num_experts = gate_up_w.shape[0]
    order, tokens, counts = sort_by_expert(experts, num_experts)
    w = weights.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
    lora = {role: (a, b * scaling) for role, (a, b) in lora.items()}
    xs = x[tokens]
    xd = fast_dropout(x, dropout_p)[tokens] if "gate_up" in lora else xs
    outs = []
    start = 0
    for e, n in enumerate(counts):
        seg = xs[start : start + n]
        gu = F.linear(seg, gate_up_w[e])
        if "gate_up" in lora:
            a, b = lora["gate_up"]
            gu = gu + (xd[start : start + n] @ a[e].t()) @ b[e].t()
        gate, up = gu.chunk(2, dim=-1)
        h = act(gate) * up
        y = F.linear(h, down_w[e])
        if "down" in lora:
            a, b = lora["down"]
            y = y + (fast_dropout(h, dropout_p) @ a[e].t()) @ b[e].t()
        outs.append(y)
        start += n
    ys = torch.cat(outs) * w
    return x.new_zeros(x.shape).index_add(0, tokens, ys)


def _gap_draws(numel: int, p: float) -> int:
    """How many gaps to draw at once: the mean p * numel plus six standard deviations, so a
    second draw is needed about once in a billion calls."""
    mean = numel * p
    return int(mean + 6.0 * math.sqrt(mean) + 16)


def dropped_positions(numel: int, p: float, device=None) -> torch.Tensor:
    """Sorted flat indices (int64) of the elements that Bernoulli(p) dropout zeroes among numel.

    The gaps between dropped elements are geometric (P(gap > k) = (1 - p)^k), so drawing the
    gaps takes about p * numel random numbers instead of numel: for p = 0.05 about 5x cheaper
    on CPU than a boolean mask from 16-bit draws, 7x smaller to keep for backward (8 bytes per
    dropped element), and zeroing them with `index_fill_` costs a fraction of `masked_fill_`.
    """
    if p <= 0.0 or numel == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    log_keep = math.log1p(-p)
    draw = _gap_draws(numel, p)
    pieces, next_free = [], 0
    while next_free < numel:
        u = torch.rand(draw, dtype=torch.float64, device=device)
        # kept elements before each dropped one: floor(log(1 - u) / log(1 - p)), geometric
        gaps = torch.log1p(u.neg_()).div_(log_keep).floor_().to(torch.int64).add_(1)
        pos = gaps.cumsum_(0).add_(next_free - 1)
        next_free = int(pos[-1]) + 1
        pieces.append(pos)
    pos = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return pos[: int(torch.searchsorted(pos, numel))]


def zero_at(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Zero a contiguous tensor's elements at flat `positions`, in place; returns t."""
    if positions.numel():
        t.view(-1).index_fill_(0, positions, 0.0)
    return t


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, scale):
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return zero_at(torch.mul(x.contiguous(), scale), positions)

    @staticmethod
    def backward(ctx, grad):
        (positions,) = ctx.saved_tensors
        return zero_at(torch.mul(grad.contiguous(), ctx.scale), positions), None, None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout like `F.dropout`, with a cheaper mask on CPU (see `dropped_positions`);
    only the dropped elements' positions are kept for backward. Elsewhere `F.dropout`."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":  # the positions need host syncs; the device's own mask does not
        return F.dropout(x, p, True)
    return _Dropout.apply(x, dropped_positions(x.numel(), p, x.device), 1.0 / (1.0 - p))
