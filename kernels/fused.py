"""A memory-lean autograd Function for routed LoRA experts over one shared SwiGLU FFN.

Same function as `reference.routed_lora_ffn` (copy view, SiLU gate), with a hand-written
backward. Autograd on the reference keeps about six (tokens*k, I) tensors per layer for the
backward pass; this Function keeps x, the base projections g and u (tokens, I), the boolean
dropout masks and the rank-r LoRA activations, and recomputes the (tokens*k, I) element-wise
work in backward. That is what lets MixLoRA train without activation checkpointing at about
the memory the frozen model needs, and it saves the allocator traffic of the big temporaries.

Gradients flow to x, the routing weights and the LoRA factors; the frozen base weights get
none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from upcycle.kernels.reference import dropout_mask, sort_by_expert

ROLES = ("gate", "up", "down")


def _seg_mm(xs: torch.Tensor, counts: list[int], w: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Concatenate xs_e @ w[e]^T (transpose) or xs_e @ w[e] over the expert segments of xs."""
    parts = [seg @ (w[e].t() if transpose else w[e]) for e, seg in enumerate(xs.split(counts))]
    return torch.cat(parts)


def _seg_outer(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Stack of a_e^T @ b_e over expert segments: (E, a.shape[1], b.shape[1])."""
    return torch.stack(
        [sa.t() @ sb for sa, sb in zip(a.split(counts), b.split(counts), strict=True)]
    )


class RoutedLoraSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_w, up_w, down_w, weights, experts, num_experts, p, *lora):
        # lora: A_gate, B_gate, A_up, B_up, A_down, B_down (B pre-scaled); None where absent
        A = dict(zip(ROLES, lora[0::2], strict=True))
        B = dict(zip(ROLES, lora[1::2], strict=True))
        order, tokens, counts = sort_by_expert(experts, num_experts)
        T, TK = x.shape[0], tokens.shape[0]
        ws = weights.reshape(-1)[order].to(x.dtype)
        g = F.linear(x, gate_w)
        u = F.linear(x, up_w)
        scale = 1.0 / (1.0 - round(p * 65536) / 65536) if p > 0 else 1.0
        mask_x = mask_h = None
        xd = None
        if A["gate"] is not None or A["up"] is not None:
            if p > 0:
                mask_x = dropout_mask(x.shape, p, x.device)
                xd = (x * mask_x).mul_(scale)[tokens]
            else:
                xd = x[tokens]
        low = {}
        gs = g[tokens]
        us = u[tokens]
        if A["gate"] is not None:
            low["gate"] = _seg_mm(xd, counts, A["gate"], True)
            gs += _seg_mm(low["gate"], counts, B["gate"], True)
        if A["up"] is not None:
            low["up"] = _seg_mm(xd, counts, A["up"], True)
            us += _seg_mm(low["up"], counts, B["up"], True)
        hs = F.silu(gs).mul_(us)
        del gs, us
        mixed = x.new_zeros(T, g.shape[1]).index_add_(0, tokens, hs * ws[:, None])
        y = F.linear(mixed, down_w)
        del mixed
        if A["down"] is not None:
            if p > 0:
                mask_h = dropout_mask(hs.shape, p, x.device)
                hd = (hs * mask_h).mul_(scale)
            else:
                hd = hs
            low["down"] = _seg_mm(hd, counts, A["down"], True)
            dd = _seg_mm(low["down"], counts, B["down"], True)
            y.index_add_(0, tokens, dd.mul_(ws[:, None]))
        ctx.save_for_backward(
            x, g, u, gate_w, up_w, down_w, ws, tokens, order, *(t for t in lora),
            mask_x if mask_x is not None else torch.empty(0, dtype=torch.bool),
            mask_h if mask_h is not None else torch.empty(0, dtype=torch.bool),
            *(low.get(r, torch.empty(0, dtype=x.dtype)) for r in ROLES),
        )  # fmt: skip
        ctx.present = tuple(t is not None for t in lora)
        ctx.counts, ctx.scale, ctx.TK = counts, scale, TK
        ctx.weights_shape, ctx.weights_dtype = weights.shape, weights.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        x, g, u, gate_w, up_w, down_w, ws, tokens, order = saved[:9]
        lora = list(saved[9:15])
        mask_x, mask_h = saved[15], saved[16]
        low = dict(zip(ROLES, saved[17:20], strict=True))
        A = dict(zip(ROLES, lora[0::2], strict=True))
        B = dict(zip(ROLES, lora[1::2], strict=True))
        counts, scale = ctx.counts, ctx.scale
        dy = dy.contiguous()
        # recompute the element-wise forward on sorted (token, slot) rows
        gs = g[tokens]
        us = u[tokens]
        if A["gate"] is not None:
            gs += _seg_mm(low["gate"], counts, B["gate"], True)
        if A["up"] is not None:
            us += _seg_mm(low["up"], counts, B["up"], True)
        sig = torch.sigmoid(gs)
        silu = gs * sig
        hs = silu * us
        grads = {}
        dys = dy[tokens]
        # down LoRA: y += ws * (hd A^T) B^T
        d_hs = (dy @ down_w)[tokens]  # base down projection, through the weighted mix
        d_ws = (d_hs * hs).sum(-1)
        d_hs.mul_(ws[:, None])
        if A["down"] is not None:
            hd = (hs * mask_h).mul_(scale) if mask_h.numel() else hs
            dd = _seg_mm(low["down"], counts, B["down"], True)
            d_ws += (dys * dd).sum(-1)
            del dd
            d_dd = dys.mul_(ws[:, None])
            grads["B_down"] = _seg_outer(d_dd, low["down"], counts)
            d_low = _seg_mm(d_dd, counts, B["down"], False)
            grads["A_down"] = _seg_outer(d_low, hd, counts)
            del hd
            d_hd = _seg_mm(d_low, counts, A["down"], False)
            if mask_h.numel():
                d_hd.mul_(mask_h).mul_(scale)
            d_hs += d_hd
            del d_hd
        del dys
        # hs = silu(gs) * us
        d_us = d_hs * silu
        d_gs = d_hs.mul_(us).mul_(sig * (1 + gs * (1 - sig)))
        del hs, silu, sig, gs, us
        T = x.shape[0]
        d_g = x.new_zeros(T, g.shape[1]).index_add_(0, tokens, d_gs)
        d_u = x.new_zeros(T, g.shape[1]).index_add_(0, tokens, d_us)
        dx = d_g @ gate_w
        dx.addmm_(d_u, up_w)
        del d_g, d_u
        d_xd = None
        for role, d_s in (("gate", d_gs), ("up", d_us)):
            if A[role] is None:
                continue
            grads[f"B_{role}"] = _seg_outer(d_s, low[role], counts)
            d_low = _seg_mm(d_s, counts, B[role], False)
            if "xd" not in grads:
                xd = (x * mask_x).mul_(scale)[tokens] if mask_x.numel() else x[tokens]
                grads["xd"] = xd
            grads[f"A_{role}"] = _seg_outer(d_low, grads["xd"], counts)
            part = _seg_mm(d_low, counts, A[role], False)
            d_xd = part if d_xd is None else d_xd.add_(part)
        if d_xd is not None:
            d_x_lora = x.new_zeros(x.shape).index_add_(0, tokens, d_xd)
            if mask_x.numel():
                d_x_lora.mul_(mask_x).mul_(scale)
            dx += d_x_lora
        d_weights = torch.empty_like(d_ws)
        d_weights[order] = d_ws
        d_weights = d_weights.reshape(ctx.weights_shape).to(ctx.weights_dtype)
        out = [dx, None, None, None, d_weights, None, None, None]
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
) -> torch.Tensor:
    """`reference.routed_lora_ffn` for SiLU-gated FFNs (copy view), with the lean backward.

    `dropout_p` is applied to LoRA inputs when > 0 (callers pass 0 in eval mode).
    """
    args = []
    for role in ROLES:
        a, b = lora.get(role, (None, None))
        args += [a, b * scaling if b is not None else None]
    w = weights * expert_scale if expert_scale != 1.0 else weights
    return RoutedLoraSwiGLU.apply(
        x, gate_w, up_w, down_w, w, experts, num_experts, dropout_p, *args
    )
