"""MixLoRA's routed LoRA experts over one frozen gated FFN as dense products only (CUDA).

The same function as `reference.routed_lora_ffn` (copy view): every token t takes its top-k
experts e_k = ids[t, k] with weights w[t, k], and

    y[t] = Wd^T (sum_k w_k h_k) + s * sum_k w_k B_d[e_k] A_d[e_k] h_k
    h_k  = act(g + s * B_g[e_k] A_g[e_k] x) * (u + s * B_u[e_k] A_u[e_k] x),  g = Wg x, u = Wu x

with act SiLU unless the caller passes another element-wise activation (`act`; its slope
then comes from `reference.act_and_slope`).

Nothing here sorts tokens by expert. The rank-r activations of all E experts come from one
product with the stacked A factors, (T, H) @ (H, E*r); keeping only expert e_k's r columns
of each row (a one-hot mask, T*E*r elements) and multiplying by the stacked B factors
(E*r, I) gives every token its own expert's delta in token order, as a plain GEMM whose
epilogue adds g (addmm). With E*r small next to I (8 experts of rank 16: 128), these
products cost about one pass over a (T, I) tensor each, like the gathers and scatters of the
sorted formulation that they replace. So a step has no host-device synchronisation, no
data-dependent shapes and no Python loop over experts (the loop is over the k slots), and runs
on cuBLAS; CUDA graphs and torch.compile can capture it.

Memory: the forward keeps x, the base projections g and u (T, I) and rank-r activations; the
per-slot h_k are recomputed in backward (two more small-inner-dimension GEMMs per slot). Plain
LoRA on the same FFN keeps three (T, I) tensors; this keeps two.

Dropout (`p`): on the LoRA inputs only, Bernoulli masks drawn on the device and kept as bool.
Shapes: x (T, H); gate_w, up_w (I, H); down_w (H, I); weights, ids (T, K); A (E, r, in),
B (E, out, r) in peft's orientation (delta W = B A).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from upcycle.kernels.reference import act_and_slope, function_args

ROLES = ("gate", "up", "down")


def fits(num_experts: int, r: int, intermediate: int) -> bool:
    """Whether the dense formulation suits this layer: the stacked rank E*r stays at most an
    eighth of the FFN width, so each masked product costs about one (T, I) pass."""
    return num_experts * r * 8 <= intermediate


def _keep(shape, p: float, device) -> Tensor | None:
    """A bool mask of the kept elements (probability 1 - p), or None without dropout."""
    if p <= 0.0:
        return None
    return torch.rand(shape, dtype=torch.float16, device=device) >= p


def _drop(t: Tensor, keep: Tensor | None, scale: float) -> Tensor:
    return t if keep is None else t * keep * scale


def _stack_a(a: Tensor | None) -> Tensor | None:
    """(E, r, in) -> (E*r, in)."""
    return None if a is None else a.reshape(-1, a.shape[-1])


def _stack_b(b: Tensor | None) -> Tensor | None:
    """(E, out, r) -> (E*r, out), row e*r + j holding B[e, :, j]."""
    return None if b is None else b.permute(0, 2, 1).reshape(-1, b.shape[1])


def _unstack_b(d: Tensor, like: Tensor) -> Tensor:
    """The inverse of `_stack_b` for a gradient: (E*r, out) -> (E, out, r)."""
    E, out, r = like.shape
    return d.view(E, r, out).permute(0, 2, 1)


def _masked(low: Tensor, onehot: Tensor) -> Tensor:
    """low (T, E*r) with every column block but the token's expert's zeroed; onehot (T, E)."""
    T, E = onehot.shape
    return (low.view(T, E, -1) * onehot[:, :, None]).view(T, -1)


def _act_parts(gk: Tensor, act) -> tuple[Tensor, Tensor]:
    """(act(gk), act'(gk)); SiLU's (act None) from one sigmoid: sig + silu * (1 - sig)."""
    if act is None:
        sig = torch.sigmoid(gk)
        silu = gk * sig
        return silu, torch.addcmul(sig, silu, sig, value=-1.0).add_(silu)
    return act_and_slope(act, gk)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products (T,), accumulated by a batched GEMM (fp32 inside)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class DenseRoutedLoraSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_w, up_w, down_w, weights, ids, num_experts, p, act, *lora):
        # lora: A_gate, Bs_gate, A_up, Bs_up, A_down, Bs_down (B already scaled); None if absent
        a = dict(zip(ROLES, map(_stack_a, lora[0::2]), strict=True))  # (E*r, in)
        b = dict(zip(ROLES, map(_stack_b, lora[1::2]), strict=True))  # (E*r, out)
        T, K = ids.shape
        scale = 1.0 / (1.0 - p) if p > 0 else 1.0
        w = weights.to(x.dtype)
        # (T, K, E); a scatter, since one_hot checks the ids' range on the host
        onehot = x.new_zeros(T, K, num_experts).scatter_(2, ids.unsqueeze(-1), 1.0)
        g, u = F.linear(x, gate_w), F.linear(x, up_w)  # (T, I)
        keep_x = (
            _keep(x.shape, p, x.device) if a["gate"] is not None or a["up"] is not None else None
        )
        xd = _drop(x, keep_x, scale)
        low = {r: xd @ a[r].t() if a[r] is not None else None for r in ("gate", "up")}  # (T, E*r)
        keep_h = _keep((K, *g.shape), p, x.device) if a["down"] is not None else None
        mixed = torch.zeros_like(g)
        zd = []  # (T, E*r) rank-r down activations of each slot, masked to its expert
        for k in range(K):
            hk = _slot_h(g, u, low, b, onehot[:, k], act)
            mixed.addcmul_(hk, w[:, k : k + 1])
            if a["down"] is not None:
                hd = _drop(hk, keep_h[k] if keep_h is not None else None, scale)
                zd.append(_masked(hd @ a["down"].t(), onehot[:, k]))
        y = F.linear(mixed, down_w)
        if zd:
            z = sum(zk * w[:, k : k + 1] for k, zk in enumerate(zd))
            y.addmm_(z, b["down"])
        none = x.new_empty(0)
        ctx.save_for_backward(
            x, g, u, gate_w, up_w, down_w, w, onehot, *lora,
            low["gate"] if low["gate"] is not None else none,
            low["up"] if low["up"] is not None else none,
            torch.stack(zd) if zd else none,
            keep_x if keep_x is not None else none.bool(),
            keep_h if keep_h is not None else none.bool(),
        )  # fmt: skip
        ctx.scale, ctx.weights_dtype, ctx.act = scale, weights.dtype, act
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        x, g, u, gate_w, up_w, down_w, w, onehot = saved[:8]
        lora = saved[8:14]
        low_g, low_u, zd, keep_x, keep_h = saved[14:19]
        A = dict(zip(ROLES, lora[0::2], strict=True))
        Bs = dict(zip(ROLES, lora[1::2], strict=True))
        a = {r: _stack_a(t) for r, t in A.items()}
        b = {r: _stack_b(t) for r, t in Bs.items()}
        low = {"gate": low_g if low_g.numel() else None, "up": low_u if low_u.numel() else None}
        keep_x = keep_x if keep_x.numel() else None
        keep_h = keep_h if keep_h.numel() else None
        scale, K = ctx.scale, w.shape[1]
        dy = dy.contiguous()
        d_mixed = dy @ down_w  # (T, I)
        dw = torch.empty_like(w)
        grads: dict[str, Tensor] = {}
        if b["down"] is not None:
            d_z = dy @ b["down"].t()  # (T, E*r)
            z = sum(zd[k] * w[:, k : k + 1] for k in range(K))
            grads["Bs_down"] = z.t() @ dy  # (E*r, H)
            grads["A_down"] = torch.zeros_like(a["down"])
        dg, du = torch.zeros_like(g), torch.zeros_like(u)
        d_low = {r: torch.zeros_like(low[r]) for r in ("gate", "up") if low[r] is not None}
        for r in d_low:
            grads[f"Bs_{r}"] = torch.zeros_like(b[r])
        for k in range(K):
            mask = onehot[:, k]
            zg = _masked(low["gate"], mask) if low["gate"] is not None else None
            zu = _masked(low["up"], mask) if low["up"] is not None else None
            gk = torch.addmm(g, zg, b["gate"]) if zg is not None else g
            uk = torch.addmm(u, zu, b["up"]) if zu is not None else u
            silu, slope = _act_parts(gk, ctx.act)  # act(gk) and act'(gk), whichever act
            hk = silu * uk
            dw[:, k] = _rowdot(d_mixed, hk)
            d_hk = d_mixed * w[:, k : k + 1]
            if b["down"] is not None:
                dw[:, k] += _rowdot(d_z, zd[k])
                d_zk = _masked(d_z, mask) * w[:, k : k + 1]  # (T, E*r)
                keep = keep_h[k] if keep_h is not None else None
                grads["A_down"].addmm_(d_zk.t(), _drop(hk, keep, scale))
                d_hk += _drop(d_zk @ a["down"], keep, scale)
            d_uk = d_hk * silu
            d_gk = d_hk.mul_(uk).mul_(slope)
            dg += d_gk
            du += d_uk
            for r, zr, d_r in (("gate", zg, d_gk), ("up", zu, d_uk)):
                if zr is not None:
                    grads[f"Bs_{r}"].addmm_(zr.t(), d_r)
                    d_low[r] += _masked(d_r @ b[r].t(), mask)
        dx = dg @ gate_w
        dx.addmm_(du, up_w)
        if d_low:
            xd = _drop(x, keep_x, scale)
            d_xd = None
            for r, d in d_low.items():
                grads[f"A_{r}"] = d.t() @ xd  # (E*r, H)
                d_xd = d @ a[r] if d_xd is None else d_xd.addmm_(d, a[r])
            dx += _drop(d_xd, keep_x, scale)
        out = [dx, None, None, None, dw.to(ctx.weights_dtype), None, None, None, None]
        for r in ROLES:
            da, db = grads.get(f"A_{r}"), grads.get(f"Bs_{r}")
            out.append(da.view_as(A[r]) if da is not None else None)
            out.append(_unstack_b(db, Bs[r]) if db is not None else None)
        return tuple(out)


def _slot_h(g: Tensor, u: Tensor, low: dict, b: dict, mask: Tensor, act) -> Tensor:
    """h_k = act(g + delta_gate) * (u + delta_up) for one slot (act None: SiLU); mask (T, E)
    one-hot."""
    gk = torch.addmm(g, _masked(low["gate"], mask), b["gate"]) if low["gate"] is not None else g
    uk = torch.addmm(u, _masked(low["up"], mask), b["up"]) if low["up"] is not None else u
    return (F.silu(gk) if act is None else act(gk)) * uk


def routed_lora_swiglu_dense(
    x: Tensor,
    gate_w: Tensor,
    up_w: Tensor,
    down_w: Tensor,
    weights: Tensor,
    experts: Tensor,
    num_experts: int,
    lora: dict[str, tuple[Tensor, Tensor]],
    scaling: float,
    dropout_p: float = 0.0,
    expert_scale: float = 1.0,
    act=None,
) -> Tensor:
    """`reference.routed_lora_ffn` for gated FFNs (copy view) as dense products; `act` is the
    gate's element-wise activation, None for SiLU.

    `dropout_p` applies to LoRA inputs when > 0 (callers pass 0 in eval mode). LoRA factors
    are cast to x's dtype by the caller (`LoraExperts.pairs`).
    """
    args = function_args(lora, ROLES, scaling)
    w = weights * expert_scale if expert_scale != 1.0 else weights
    return DenseRoutedLoraSwiGLU.apply(
        x, gate_w, up_w, down_w, w, experts, num_experts, dropout_p, act, *args
    )
