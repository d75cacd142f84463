"""Routed SwiGLU experts and LoRA experts as autograd ops that torch.compile can trace.

Public surface:

- `experts_swiglu(x, gate_up_w, down_w, top_k_index, top_k_weights, lora=None, scaling=1.0)`:
  transformers' fused SwiGLU experts, (T, H) -> (T, H), optionally with per-expert LoRA deltas
  (the function of `reference.routed_experts_lora`, without dropout).
- `segment_lora(x, a, b, offsets, scaling, order=None, top_k=1)`: the LoRA delta
  scaling * (x_r A_e^T) B_e^T of every row r sorted by expert, never W + B A.
- `sort_routing(top_k_index, num_experts)`: the (order, offsets) that `segment_lora` takes.

Both functions run the Triton kernels (`upcycle.kernels.triton_moe`, imported on first use:
CUDA, or any device under TRITON_INTERPRET=1); `force_triton=False` runs the torch reference
of the same function instead (`upcycle.kernels.reference`), for comparisons. Nothing here
decides which of them a model runs: that is `upcycle.kernels.dispatch`'s rule
(`dispatch.triton_runs_on` says where the kernels can run at all).

The Triton path is a pair of `torch.library.custom_op`s per function: the forward op
("upcycle::experts_swiglu", "upcycle::segment_lora") returns its result plus what backward
needs, the backward op ("..._backward") computes the gradients, `register_autograd` ties them and
`register_fake` gives both shapes, so torch.compile keeps each as one opaque graph node.
Gradients flow to x, the routing weights, the LoRA factors and the expert weights; expert
weights that do not require grad (frozen experts, the usual fine-tuning case) cost no dW work.

Shapes: x (T, H); gate_up_w (E, 2I, H) ([gate; up] rows); down_w (E, H, I); top_k_index and
top_k_weights (T, K); lora "gate_up" (A (E, r, H), B (E, 2I, r)) and "down" (A (E, r, I),
B (E, H, r)) in peft's orientation (delta W = B A), either optional. On the Triton path an id
equal to E (transformers' expert-parallel sentinel) contributes nothing.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor
from upcycle.kernels.reference import LoraPair, routed_experts_lora, sort_by_expert


def sort_routing(top_k_index: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(order (T*K,) int64, offsets (E+1,) int32): the flat (token, slot) index of each row
    sorted by expert, and where each expert's rows start. Ids >= num_experts sort last, outside
    every expert. Uses `sort_by_expert`, so the host waits for the per-expert counts."""
    order, _, counts = sort_by_expert(top_k_index.clamp(max=num_experts), num_experts + 1)
    bounds = [0, *itertools.accumulate(counts[:num_experts])]
    return order, torch.tensor(bounds, dtype=torch.int32, device=top_k_index.device)


def _tm():
    """The Triton module, imported on first use so that this module imports without triton."""
    from upcycle.kernels import triton_moe as moe

    return moe


def _empty(like: Tensor) -> Tensor:
    """The placeholder returned for an output that was not asked for."""
    return like.new_empty(0)


# --- experts_swiglu ------------------------------------------------------------------------


@torch.library.custom_op("upcycle::experts_swiglu", mutates_args=())
def _experts_swiglu(
    x: Tensor,
    gate_up_w: Tensor,
    down_w: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_a: Tensor | None,
    gate_up_b: Tensor | None,
    down_a: Tensor | None,
    down_b: Tensor | None,
    scaling: float,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y (T, H) and, for backward (empty unless `save`): the pre-activations gu (TK, 2I), the
    rank-r LoRA activations t_gate_up, t_down (TK, r), order (TK,), offsets (E+1,)."""
    tm = _tm()
    T, H = x.shape
    E, top_k = gate_up_w.shape[0], top_k_index.shape[1]
    order, offsets = sort_routing(top_k_index, E)
    tokens = order // top_k
    ws = top_k_weights.reshape(-1)[order].float()  # (TK,) routing weight of each sorted row
    delta = t_gu = t_down = None
    if gate_up_a is not None:
        t_gu = tm.grouped_mm(x, gate_up_a, offsets, gather=tokens)  # (TK, r)
        delta = tm.grouped_mm(t_gu, gate_up_b, offsets, alpha=scaling)  # (TK, 2I)
    h, gu = tm.gate_up_swiglu(x, gate_up_w, tokens, offsets, delta=delta, save_gu=save)
    y_slots = x.new_zeros(order.shape[0], H)  # (T*K, H) in (token, slot) order
    if down_a is not None:
        t_down = tm.grouped_mm(h, down_a, offsets)  # (TK, r)
        tm.grouped_mm(t_down, down_b, offsets, scatter=order, scale=ws, alpha=scaling, out=y_slots)
    tm.grouped_mm(
        h, down_w, offsets, scatter=order, scale=ws, out=y_slots, accumulate=down_a is not None
    )
    y = y_slots.view(T, top_k, H).sum(dim=1)
    if not save:
        return y, _empty(x), _empty(x), _empty(x), order, offsets
    return (
        y,
        gu,
        t_gu if t_gu is not None else _empty(x),
        t_down if t_down is not None else _empty(x),
        order,
        offsets,
    )


@_experts_swiglu.register_fake
def _(
    x,
    gate_up_w,
    down_w,
    top_k_index,
    top_k_weights,
    gate_up_a,
    gate_up_b,
    down_a,
    down_b,
    scaling,
    save,
):
    rows = top_k_index.numel()

    def saved(*shape):
        return x.new_empty(shape) if save else x.new_empty(0)

    return (
        x.new_empty(x.shape),
        saved(rows, gate_up_w.shape[1]),
        saved(rows, gate_up_a.shape[1]) if gate_up_a is not None else x.new_empty(0),
        saved(rows, down_a.shape[1]) if down_a is not None else x.new_empty(0),
        top_k_index.new_empty(rows, dtype=torch.int64),
        top_k_index.new_empty(gate_up_w.shape[0] + 1, dtype=torch.int32),
    )


@torch.library.custom_op("upcycle::experts_swiglu_backward", mutates_args=())
def _experts_swiglu_backward(
    dy: Tensor,
    x: Tensor,
    gate_up_w: Tensor,
    down_w: Tensor,
    top_k_weights: Tensor,
    gate_up_a: Tensor | None,
    gate_up_b: Tensor | None,
    down_a: Tensor | None,
    down_b: Tensor | None,
    gu: Tensor,
    t_gu: Tensor,
    t_down: Tensor,
    order: Tensor,
    offsets: Tensor,
    scaling: float,
    need_x: bool,
    need_gate_up_w: bool,
    need_down_w: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, d_top_k_weights, d_gate_up_w, d_down_w, d_gate_up_a, d_gate_up_b,
    d_down_a, d_down_b); empty where not asked for or without that LoRA."""
    tm = _tm()
    T, H = x.shape
    E, TK, top_k = gate_up_w.shape[0], order.shape[0], top_k_weights.shape[-1]
    tokens = order // top_k
    ws = top_k_weights.reshape(-1)[order].float()
    dx = d_gate_up_w = d_down_w = d_gu_a = d_gu_b = d_down_a = d_down_b = None
    d_t_down = extra = None
    dw_lora = 0.0
    if down_a is not None:
        # y_slot = w * (h Wd^T + s * t_down B^T): the routing weights see the LoRA output too
        d_t_raw = tm.grouped_mm(dy, down_b, offsets, transpose=False, gather=tokens)  # (TK, r)
        dw_lora = scaling * (d_t_raw.float() * t_down.float()).sum(dim=1)
        d_t_down = d_t_raw * (ws * scaling)[:, None].to(d_t_raw.dtype)
        d_down_b = tm.segment_outer(
            dy, t_down, offsets, E, gather_a=tokens, scale_a=ws, alpha=scaling
        )  # (E, H, r)
        extra = tm.grouped_mm(d_t_down, down_a, offsets, transpose=False)  # (TK, I) into dh
    store_h = need_down_w or down_a is not None
    d_gu, dw_sorted, h = tm.swiglu_backward(
        dy, down_w, gu, ws, tokens, offsets, extra=extra, store_h=store_h
    )
    if down_a is not None:
        d_down_a = tm.segment_outer(d_t_down, h, offsets, E)  # (E, r, I)
    if need_down_w:
        d_down_w = tm.segment_outer(dy, h, offsets, E, gather_a=tokens, scale_a=ws)
    if need_gate_up_w:
        d_gate_up_w = tm.segment_outer(d_gu, x, offsets, E, gather_b=tokens)
    d_t_gu = None
    if gate_up_a is not None:
        d_gu_b = tm.segment_outer(d_gu, t_gu, offsets, E, alpha=scaling)  # (E, 2I, r)
        d_t_gu = tm.grouped_mm(d_gu, gate_up_b, offsets, transpose=False, alpha=scaling)
        d_gu_a = tm.segment_outer(d_t_gu, x, offsets, E, gather_b=tokens)  # (E, r, H)
    if need_x:
        dx_slots = x.new_zeros(TK, H)  # (T*K, H) in (token, slot) order, summed over slots
        tm.grouped_mm(d_gu, gate_up_w, offsets, transpose=False, scatter=order, out=dx_slots)
        if d_t_gu is not None:
            a_rows = dict(transpose=False, scatter=order, out=dx_slots, accumulate=True)
            tm.grouped_mm(d_t_gu, gate_up_a, offsets, **a_rows)
        dx = dx_slots.view(T, top_k, H).sum(dim=1)
    d_weights = torch.empty_like(dw_sorted)
    d_weights[order] = dw_sorted + dw_lora
    d_weights = d_weights.view(top_k_weights.shape).to(top_k_weights.dtype)
    grads = (dx, d_gate_up_w, d_down_w, d_gu_a, d_gu_b, d_down_a, d_down_b)
    dx, d_gate_up_w, d_down_w, d_gu_a, d_gu_b, d_down_a, d_down_b = (
        g if g is not None else _empty(x) for g in grads
    )
    return dx, d_weights, d_gate_up_w, d_down_w, d_gu_a, d_gu_b, d_down_a, d_down_b


@_experts_swiglu_backward.register_fake
def _(
    dy,
    x,
    gate_up_w,
    down_w,
    top_k_weights,
    gate_up_a,
    gate_up_b,
    down_a,
    down_b,
    gu,
    t_gu,
    t_down,
    order,
    offsets,
    scaling,
    need_x,
    need_gate_up_w,
    need_down_w,
):
    def like(t, needed):
        return torch.empty_like(t) if t is not None and needed else x.new_empty(0)

    return (
        like(x, need_x),
        torch.empty_like(top_k_weights),
        like(gate_up_w, need_gate_up_w),
        like(down_w, need_down_w),
        like(gate_up_a, True),
        like(gate_up_b, True),
        like(down_a, True),
        like(down_b, True),
    )


def _experts_setup(ctx, inputs, output) -> None:
    x, gate_up_w, down_w, _, top_k_weights, ga, gb, da, db, scaling, _ = inputs
    _, gu, t_gu, t_down, order, offsets = output
    ctx.save_for_backward(
        x, gate_up_w, down_w, top_k_weights, ga, gb, da, db, gu, t_gu, t_down, order, offsets
    )
    ctx.scaling = scaling


def _experts_backward(ctx, dy, *_):
    saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, d_w, dgw, ddw, dga, dgb, dda, ddb = torch.ops.upcycle.experts_swiglu_backward(
        dy, *saved, ctx.scaling, need[0], need[1], need[2]
    )
    # saved[4:8] are the LoRA factors (None without that LoRA)
    lora = [
        g if f is not None else None for f, g in zip(saved[4:8], (dga, dgb, dda, ddb), strict=True)
    ]
    return (
        dx if need[0] else None,
        dgw if need[1] else None,
        ddw if need[2] else None,
        None,
        d_w if need[4] else None,
        *lora,
        None,
        None,
    )


_experts_swiglu.register_autograd(_experts_backward, setup_context=_experts_setup)


def experts_swiglu(
    x: Tensor,
    gate_up_w: Tensor,
    down_w: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    lora: dict[str, LoraPair] | None = None,
    scaling: float = 1.0,
    *,
    force_triton: bool = True,
) -> Tensor:
    """sum_k w[t, k] * FFN_{e = index[t, k]}(x[t]) for SwiGLU experts: (T, H) -> (T, H).

    FFN_e(x) = (silu(x Wg_e^T) * (x Wu_e^T)) Wd_e^T, plus scaling * (x A_e^T) B_e^T on the
    gate_up and down projections for the LoRA pairs in `lora` (shapes in the module docstring).
    Weights and LoRA factors are cast to x's dtype. `force_triton=False`: the torch reference.
    """
    lora = lora or {}
    if not force_triton:
        return routed_experts_lora(
            x, gate_up_w, down_w, F.silu, top_k_weights, top_k_index, lora, scaling
        )
    factors = [
        t.to(x.dtype) if t is not None else None
        for role in ("gate_up", "down")
        for t in lora.get(role, (None, None))
    ]
    args = (x, gate_up_w.to(x.dtype), down_w.to(x.dtype), top_k_index, top_k_weights, *factors)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    return torch.ops.upcycle.experts_swiglu(*args, scaling, save)[0]


# --- segment_lora --------------------------------------------------------------------------


@torch.library.custom_op("upcycle::segment_lora", mutates_args=())
def _segment_lora(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    offsets: Tensor,
    order: Tensor | None,
    top_k: int,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """y (TK, out) and the rank-r activations t = x_r A_e^T (TK, r) that backward needs."""
    tm = _tm()
    tokens = order // top_k if order is not None else None
    t = tm.grouped_mm(x, a, offsets, gather=tokens)
    return tm.grouped_mm(t, b, offsets, alpha=scaling), t


@_segment_lora.register_fake
def _(x, a, b, offsets, order, top_k, scaling):
    rows = order.shape[0] if order is not None else x.shape[0]
    return x.new_empty(rows, b.shape[1]), x.new_empty(rows, a.shape[1])


@torch.library.custom_op("upcycle::segment_lora_backward", mutates_args=())
def _segment_lora_backward(
    dy: Tensor,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    t: Tensor,
    offsets: Tensor,
    order: Tensor | None,
    top_k: int,
    scaling: float,
    need_x: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, da, db); dx is empty unless `need_x`. dx sums a token's slots in slot order."""
    tm = _tm()
    E = a.shape[0]
    tokens = order // top_k if order is not None else None
    db = tm.segment_outer(dy, t, offsets, E, alpha=scaling)  # (E, out, r)
    dt = tm.grouped_mm(dy, b, offsets, transpose=False, alpha=scaling)  # (TK, r)
    da = tm.segment_outer(dt, x, offsets, E, gather_b=tokens)  # (E, r, in)
    if not need_x:
        return _empty(x), da, db
    if order is None:
        return tm.grouped_mm(dt, a, offsets, transpose=False), da, db
    slots = tm.grouped_mm(dt, a, offsets, transpose=False, scatter=order)  # (T*top_k, in)
    return slots.view(x.shape[0], top_k, x.shape[1]).sum(dim=1), da, db


@_segment_lora_backward.register_fake
def _(dy, x, a, b, t, offsets, order, top_k, scaling, need_x):
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    return dx, torch.empty_like(a), torch.empty_like(b)


def _segment_lora_setup(ctx, inputs, output) -> None:
    x, a, b, offsets, order, top_k, scaling = inputs
    ctx.save_for_backward(x, a, b, output[1], offsets, order)
    ctx.top_k, ctx.scaling = top_k, scaling


def _segment_lora_backward_autograd(ctx, dy, _):
    x, a, b, t, offsets, order = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, da, db = torch.ops.upcycle.segment_lora_backward(
        dy, x, a, b, t, offsets, order, ctx.top_k, ctx.scaling, need[0]
    )
    return (
        dx if need[0] else None,
        da if need[1] else None,
        db if need[2] else None,
        None,
        None,
        None,
        None,
    )


_segment_lora.register_autograd(_segment_lora_backward_autograd, setup_context=_segment_lora_setup)


def segment_lora(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    offsets: Tensor,
    scaling: float = 1.0,
    *,
    order: Tensor | None = None,
    top_k: int = 1,
    force_triton: bool = True,
) -> Tensor:
    """scaling * (x_r A_e^T) B_e^T for every row r sorted by expert: (TK, out).

    a (E, r, in), b (E, out, r); offsets (E+1,) int32 (rows offsets[e]:offsets[e+1] are expert
    e's, rows past offsets[E] get zeros). Without `order`, x (TK, in) holds the sorted rows;
    with `order` (from `sort_routing`), x (T, in) holds tokens and row r reads token
    order[r] // top_k (no gathered copy on the Triton path). Factors are cast to x's dtype.
    `force_triton=False`: per-segment torch products.
    """
    a, b = a.to(x.dtype), b.to(x.dtype)
    if force_triton:
        return torch.ops.upcycle.segment_lora(x, a, b, offsets, order, top_k, scaling)[0]
    xs = x if order is None else x[order // top_k]
    bounds = offsets.tolist()
    spans = enumerate(itertools.pairwise(bounds))
    parts = [(xs[start:end] @ a[e].t()) @ b[e].t() for e, (start, end) in spans]
    parts.append(xs.new_zeros(xs.shape[0] - bounds[-1], b.shape[1]))
    return torch.cat(parts) * scaling
