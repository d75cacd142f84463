"""A memory-lean autograd Function for routed LoRA experts over one shared gated FFN.

Same function as `reference.routed_lora_ffn` (copy view), with a hand-written backward. The
gate's activation is SiLU unless the caller passes another element-wise one (`act`: Gemma's
tanh GELU, for example); SiLU runs in place from one sigmoid, any other activation and its
slope come from `reference.act_and_slope`. Autograd on the reference keeps about six (tokens*k, I) tensors per layer for the
backward pass; this Function keeps x, the base projections g and u (tokens, I), the positions
of the dropped elements and the rank-r LoRA activations, and recomputes the (tokens*k, I)
element-wise work in backward. With `recompute_base` it keeps x but not g and u, and reruns the
two base projections in backward: the choice when the layer is not inside an activation
checkpoint (`upcycle.adapters.checkpointing`), where recomputing them is cheaper than rerunning
the whole FFN forward.

On CPU, every fresh large tensor costs page faults (glibc hands big blocks back to the kernel
when they are freed), which made the element-wise work as slow as the matrix products. So the
temporaries live in a per-thread workspace (`upcycle.kernels.workspace`) that is reused by
every layer and step, and the element-wise chains run in place. Dropout's 1/(1-p) scale is
folded into the rank-r activations instead of being applied to (tokens*k, I) tensors.

The per-expert LoRA products run segment by segment in torch, or, where
`upcycle.kernels.dispatch` says so (`triton=True`), as one Triton grouped kernel each
(`upcycle.kernels.triton_moe`).

Gradients flow to x, the routing weights and the LoRA factors; the frozen base weights get
none.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from upcycle.kernels.reference import (
    act_and_slope,
    dropped_positions,
    function_args,
    sort_by_expert,
    zero_at,
)
from upcycle.kernels.workspace import buffer, none_if_empty

ROLES = ("gate", "up", "down")


class Segments(NamedTuple):
    """Sorted rows split into experts' segments: how many rows each expert has, and whether
    the segment products run on the Triton kernels (one grouped kernel for all segments) or
    as torch products segment by segment. `upcycle.kernels.dispatch` says which."""

    counts: list[int]
    triton: bool = False


def _offsets(segs: Segments, device: torch.device) -> torch.Tensor:
    """Segment offsets (E+1,) int32 on `device`, as the Triton kernels take them."""
    bounds = [0]
    for c in segs.counts:
        bounds.append(bounds[-1] + c)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _seg_mm(
    xs: torch.Tensor,
    segs: Segments,
    w: torch.Tensor,
    transpose: bool,
    out: torch.Tensor | None = None,
    add: bool = False,
) -> torch.Tensor:
    """Rows of xs times w[e]^T (transpose) or w[e], expert segment by segment.

    Segments are written into `out` (or a new tensor), or added to it with `add`, so the
    per-expert products never allocate tensors whose size changes with the routing. On the
    Triton path one grouped kernel covers every segment.
    """
    if segs.triton:
        from upcycle.kernels import triton_moe as moe

        offsets = _offsets(segs, xs.device)
        w = w.to(xs.dtype)
        return moe.grouped_mm(
            xs, w, offsets, transpose=transpose, out=out, accumulate=add and out is not None
        )
    n = w.shape[1] if transpose else w.shape[2]
    if out is None:
        out = xs.new_empty(xs.shape[0], n)
    start = 0
    for e, c in enumerate(segs.counts):
        if c:
            we = w[e].t() if transpose else w[e]
            seg, dst = xs[start : start + c], out[start : start + c]
            if add:
                dst.addmm_(seg, we)
            else:
                torch.mm(seg, we, out=dst)
        start += c
    return out


def _seg_outer(a: torch.Tensor, b: torch.Tensor, segs: Segments) -> torch.Tensor:
    """Stack of a_e^T @ b_e over expert segments: (E, a.shape[1], b.shape[1])."""
    if segs.triton:
        from upcycle.kernels import triton_moe as moe

        return moe.segment_outer(a, b, _offsets(segs, a.device), len(segs.counts))
    out = a.new_zeros(len(segs.counts), a.shape[1], b.shape[1])
    start = 0
    for e, c in enumerate(segs.counts):
        if c:
            torch.mm(a[start : start + c].t(), b[start : start + c], out=out[e])
        start += c
    return out


def _gathered(t, tokens, low, b, segs: Segments, out) -> torch.Tensor:
    """t[tokens] plus, when a LoRA is present, the per-expert low-rank product low_e @ b_e^T."""
    torch.index_select(t, 0, tokens, out=out)
    if b is not None:
        _seg_mm(low, segs, b, True, out=out, add=True)
    return out


def _rowdot(a: torch.Tensor, b: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """Row-wise dot products, `rows` rows at a time through a small (cache-sized) temporary."""
    out = a.new_empty(a.shape[0])
    tmp = buffer("rowdot", min(rows, a.shape[0]), a.shape[1], a)
    for i in range(0, a.shape[0], rows):
        n = min(rows, a.shape[0] - i)
        torch.sum(torch.mul(a[i : i + n], b[i : i + n], out=tmp[:n]), 1, out=out[i : i + n])
    return out


def _base(x, gate_w, up_w, scratch: bool):
    """The base projections g = x W_gate^T, u = x W_up^T; in workspace slots with `scratch`
    (when they are not kept for backward)."""
    if not scratch:
        return F.linear(x, gate_w), F.linear(x, up_w)
    T, inter = x.shape[0], gate_w.shape[0]
    g = torch.mm(x, gate_w.t(), out=buffer("g", T, inter, x))
    return g, torch.mm(x, up_w.t(), out=buffer("u", T, inter, x))


def _activate(gs: torch.Tensor, act, aux: torch.Tensor) -> torch.Tensor:
    """gs <- act(gs) in place; aux <- sigmoid(gs) for SiLU (act None), else act'(gs)."""
    if act is None:
        torch.sigmoid(gs, out=aux)
        return gs.mul_(aux)
    a, slope = act_and_slope(act, gs)
    aux.copy_(slope)
    return gs.copy_(a)


def _slope(act, aux: torch.Tensor, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """act' at the pre-activation from `_activate`'s aux and a = act(gs): for SiLU
    sig + silu * (1 - sig), written into out; for another activation aux itself."""
    if act is None:
        return torch.addcmul(aux, a, aux, value=-1.0, out=out).add_(a)
    return aux


def _dropped(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """x with the dropped positions zeroed (a copy), or x itself without dropout."""
    return x if positions is None else zero_at(x.clone(), positions)


class RoutedLoraSwiGLU(torch.autograd.Function):
    """y = sum_k w_k * (down + LoRA_e)(act((gate + LoRA_e) x) * (up + LoRA_e) x), act SiLU
    when `act` is None."""

    @staticmethod
    def forward(
        ctx, x, gate_w, up_w, down_w, weights, experts, num_experts, p, lean, triton, act, *lora
    ):
        # lora: A_gate, B_gate, A_up, B_up, A_down, B_down (B pre-scaled); None where absent
        A = dict(zip(ROLES, lora[0::2], strict=True))
        B = dict(zip(ROLES, lora[1::2], strict=True))
        order, tokens, counts = sort_by_expert(experts, num_experts)
        segs = Segments(counts, triton)
        T, TK, inter = x.shape[0], tokens.shape[0], gate_w.shape[0]
        ws = weights.reshape(-1)[order].to(x.dtype)
        g, u = _base(x, gate_w, up_w, scratch=lean)  # lean: recomputed in backward
        scale = 1.0 / (1.0 - p) if p > 0 else 1.0
        drop_x = drop_h = None
        low = {}
        if A["gate"] is not None or A["up"] is not None:
            if p > 0:
                drop_x = dropped_positions(x.numel(), p, x.device)
            xd = torch.index_select(
                _dropped(x, drop_x), 0, tokens, out=buffer("th", TK, x.shape[1], x)
            )
            for role in ("gate", "up"):
                if A[role] is not None:
                    low[role] = _seg_mm(xd, segs, A[role], True).mul_(scale)
        hs = _gathered(g, tokens, low.get("gate"), B["gate"], segs, buffer("a", TK, inter, x))
        if act is None:
            F.silu(hs, inplace=True)
        else:
            hs.copy_(act(hs))
        buf = _gathered(u, tokens, low.get("up"), B["up"], segs, buffer("b", TK, inter, x))
        hs.mul_(buf)
        mixed = buffer("t", T, inter, x).zero_()
        mixed.index_add_(0, tokens, torch.mul(hs, ws[:, None], out=buf))
        y = F.linear(mixed, down_w)
        if A["down"] is not None:
            hd = hs
            if p > 0:
                drop_h = dropped_positions(hs.numel(), p, x.device)
                hd = zero_at(hs, drop_h)
            low["down"] = _seg_mm(hd, segs, A["down"], True).mul_(scale)
            dd = _seg_mm(low["down"], segs, B["down"], True, out=buffer("th", TK, x.shape[1], x))
            y.index_add_(0, tokens, dd.mul_(ws[:, None]))
        none = torch.empty(0, dtype=torch.int64)
        if lean:
            g = u = torch.empty(0, dtype=x.dtype)
        ctx.save_for_backward(
            x, g, u, gate_w, up_w, down_w, ws, tokens, order, *(t for t in lora),
            drop_x if drop_x is not None else none,
            drop_h if drop_h is not None else none,
            *(low.get(r, torch.empty(0, dtype=x.dtype)) for r in ROLES),
        )  # fmt: skip
        ctx.segs, ctx.scale, ctx.act = segs, scale, act
        ctx.weights_shape, ctx.weights_dtype = weights.shape, weights.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        x, g, u, gate_w, up_w, down_w, ws, tokens, order = saved[:9]
        lora = list(saved[9:15])
        drop_x, drop_h = none_if_empty(saved[15]), none_if_empty(saved[16])
        low = dict(zip(ROLES, saved[17:20], strict=True))
        A = dict(zip(ROLES, lora[0::2], strict=True))
        B = dict(zip(ROLES, lora[1::2], strict=True))
        segs, scale = ctx.segs, ctx.scale
        T, H, TK, inter = x.shape[0], x.shape[1], tokens.shape[0], gate_w.shape[0]
        dy = dy.contiguous()
        wcol = ws[:, None]
        if not g.numel():  # recompute_base: rerun the base projections
            g, u = _base(x, gate_w, up_w, scratch=True)
        # recompute the element-wise forward on sorted (token, slot) rows
        silu = _gathered(g, tokens, low["gate"], B["gate"], segs, buffer("a", TK, inter, x))
        us = _gathered(u, tokens, low["up"], B["up"], segs, buffer("b", TK, inter, x))
        sig = buffer("c", TK, inter, x)  # sigmoid(gs) for SiLU, else act'(gs)
        _activate(silu, ctx.act, sig)  # silu: act(gs), whichever act
        work = torch.mul(silu, us, out=buffer("d", TK, inter, x))  # hs
        # base down projection, through the weighted mix
        d_mixed = torch.mm(dy, down_w, out=buffer("t", T, inter, x))
        d_hs = torch.index_select(d_mixed, 0, tokens, out=buffer("e", TK, inter, x))
        d_ws = _rowdot(d_hs, work)
        d_hs.mul_(wcol)
        grads = {}
        if A["down"] is not None:
            hd = zero_at(work, drop_h) if drop_h is not None else work
            dys = torch.index_select(dy, 0, tokens, out=buffer("th", TK, H, x))
            dd = _seg_mm(low["down"], segs, B["down"], True, out=buffer("th2", TK, H, x))
            d_ws += _rowdot(dys, dd)
            d_dd = dys.mul_(wcol)
            grads["B_down"] = _seg_outer(d_dd, low["down"], segs)
            d_low = _seg_mm(d_dd, segs, B["down"], False).mul_(scale)
            grads["A_down"] = _seg_outer(d_low, hd, segs)
            d_hd = _seg_mm(d_low, segs, A["down"], False, out=hd)
            if drop_h is not None:
                zero_at(d_hd, drop_h)
            d_hs += d_hd
        # hs = act(gs) * us; for SiLU act'(gs) = sig + silu * (1 - sig)
        dsilu = _slope(ctx.act, sig, silu, out=work)
        d_us = silu.mul_(d_hs)
        d_gs = d_hs.mul_(us).mul_(dsilu)
        scatter = d_mixed.zero_().index_add_(0, tokens, d_gs)
        dx = scatter @ gate_w
        dx.addmm_(scatter.zero_().index_add_(0, tokens, d_us), up_w)
        d_xd = xd = None
        for role, d_s in (("gate", d_gs), ("up", d_us)):
            if A[role] is None:
                continue
            grads[f"B_{role}"] = _seg_outer(d_s, low[role], segs)
            d_low = _seg_mm(d_s, segs, B[role], False).mul_(scale)
            if xd is None:
                xd = torch.index_select(_dropped(x, drop_x), 0, tokens, out=buffer("th", TK, H, x))
            grads[f"A_{role}"] = _seg_outer(d_low, xd, segs)
            if d_xd is None:
                d_xd = _seg_mm(d_low, segs, A[role], False, out=buffer("th2", TK, H, x))
            else:
                _seg_mm(d_low, segs, A[role], False, out=d_xd, add=True)
        if d_xd is not None:
            d_x_lora = x.new_zeros(x.shape).index_add_(0, tokens, d_xd)
            if drop_x is not None:
                zero_at(d_x_lora, drop_x)
            dx += d_x_lora
        d_weights = torch.empty_like(d_ws)
        d_weights[order] = d_ws
        d_weights = d_weights.reshape(ctx.weights_shape).to(ctx.weights_dtype)
        out = [dx, None, None, None, d_weights, None, None, None, None, None, None]
        for role in ROLES:
            out += [grads.get(f"A_{role}"), grads.get(f"B_{role}")]
        return tuple(out)


def routed_lora_swiglu(
    x: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    num_experts: int,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
    dropout_p: float = 0.0,
    expert_scale: float = 1.0,
    recompute_base: bool = False,
    triton: bool = False,
    act=None,
) -> torch.Tensor:
    """`reference.routed_lora_ffn` for gated FFNs (copy view), with the lean backward; `act`
    is the gate's element-wise activation, None for SiLU (its in-place code).

    `dropout_p` is applied to LoRA inputs when > 0 (callers pass 0 in eval mode). With
    `recompute_base`, the base gate/up projections are rerun in backward instead of kept.
    With `triton`, the per-expert LoRA products run on the Triton kernels (`Segments`).
    """
    args = function_args(lora, ROLES, scaling)
    w = weights * expert_scale if expert_scale != 1.0 else weights
    return RoutedLoraSwiGLU.apply(
        x, gate_w, up_w, down_w, w, experts, num_experts, dropout_p, recompute_base, triton,
        act, *args,
    )  # fmt: skip
