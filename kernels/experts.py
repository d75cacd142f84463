"""Sorted-token MoE experts: `experts_implementation="upcycle"` and the LoRA-expert kernel.

`upcycle.kernels.dispatch.experts_forward`, registered as transformers' experts
implementation "upcycle", runs these on CPU (and other implementations where they are faster).

The (token, slot) pairs are sorted by expert once; each expert's projections then run as one
matrix product on its contiguous segment of rows: no per-token weight gather (transformers'
`batched_mm`), no padding, no loop that rescans the routing for every expert (`eager`).
Outputs are put back in (token, slot) order and summed over the slots, which is
deterministic.

SwiGLU experts (the default gate with SiLU: mixtral, qwen2_moe, qwen3_moe, olmoe, ...) run
through `SortedSwiGLU`, one autograd Function with a hand-written backward that also carries
optional per-expert LoRA deltas (the function of `upcycle.kernels.reference.routed_experts_lora`,
which `--adapter experts-lora` runs through `upcycle.kernels.dispatch.routed_experts_lora`). On the 2-core development VM a 4096-token forward+backward
takes 2-17% longer than the bare per-expert GEMMs of the same routing (bench/cpu_moe.py's
"gemm floor"), transformers' grouped_mm 15-45% longer. What it removes against autograd over
per-expert ops:

- Weight gradients are written expert by expert into one (E, out, in) stack; autograd over
  `unbind` made a gradient per expert and then copied them all into a new stack (a third of
  a 128-token step). Frozen weights get no weight-gradient products at all.
- Temporaries that are not kept for backward (the gated activation, all gradients of
  activations, the sorted copies of x and of the incoming gradient) live in a reused
  per-thread workspace (`upcycle.kernels.workspace`); only the (T*K, 2I) projection is kept and
  the gated activation is recomputed from it. Each expert's rows are processed together and
  the SiLU-gate chain runs in place, in row blocks of about 2 MiB per tensor, right after the
  product that wrote its input, so it reads from cache.
- The two large fresh tensors per step, the kept projection and the weight-gradient stacks,
  are advised as transparent huge pages (`_empty`): first writes to fresh memory dominate
  otherwise.
- CPUs without bf16/fp16 matrix units (AVX2) run low-precision matrix products through a slow
  fallback (a bf16 (1024x3072)@(3072x576) took 2.4 s on the VM, fp32 78 ms). There the
  Function computes in fp32 (weights converted expert by expert into the workspace) and
  returns results in the input dtype: products of bf16 numbers are exact in fp32, so this is
  the arithmetic of a bf16 matrix unit with fp32 accumulation.

Other experts (custom gates, biases, transposed weights, a post-expert norm, other
activations) take a plain autograd path with the same sorting.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from upcycle.kernels.reference import dropped_positions, sort_by_expert, zero_at
from upcycle.kernels.workspace import buffer, none_if_empty


@functools.cache
def _slow_low_precision_gemm(dtype: torch.dtype) -> bool:
    """True when this CPU has no fast bf16/fp16 matrix products (oneDNN's own check)."""
    mkldnn = torch.ops.mkldnn
    if dtype == torch.bfloat16:
        return not mkldnn._is_mkldnn_bf16_supported()
    return not mkldnn._is_mkldnn_fp16_supported()


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the Function computes in for t: fp32 for bf16/fp16 on CPUs without matrix
    units for them, else t's own."""
    if (
        t.device.type == "cpu"
        and t.dtype in (torch.bfloat16, torch.float16)
        and _slow_low_precision_gemm(t.dtype)
    ):
        return torch.float32
    return t.dtype


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    """libc's madvise(addr, length, advice) on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for a large tensor that is returned or kept (weight-gradient stacks, the
    projection kept for backward).

    On Linux CPU its memory is advised as transparent huge pages before the first write, as
    torch's own allocator does under THP_MEM_ALLOC_ENABLE=1. Blocks this large come fresh
    from the kernel on every call, and first writes fault page by page: on the development VM
    filling a fresh 100 MB block took 75 ms with 4 KiB pages and about 22 ms with 2 MiB
    pages (a reused block: 11 ms). The advice is only a hint; it changes no result.
    """
    t = torch.empty(shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    madvise = _madvise() if t.device.type == "cpu" and nbytes >= 4 * _HUGE_PAGE else None
    if madvise is not None:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # whole huge pages inside t
        end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        madvise(start, end - start, _MADV_HUGEPAGE)
    return t


# Element-wise work runs in row blocks of at most this many elements per (rows, I) tensor
# (8 MiB in fp32: a whole expert's rows at 4096 tokens and I=1536, 146 rows at I=14336), so
# the gate chain mostly reads what the product before it just wrote. Blocks of 128 rows were
# a little faster alone (8 ms instead of 13 ms per 1024 rows) but multiply the parallel
# regions, and with 2 threads while another process held a core every region waited for
# both threads: the 4096-token step took 2x longer.
_BLOCK_ELEMS = 1 << 21


def _blocks(rows: int, width: int) -> list[slice]:
    """Row slices covering `rows` rows of `width` elements, about _BLOCK_ELEMS per block."""
    step = max(1, _BLOCK_ELEMS // width)
    return [slice(i, i + step) for i in range(0, rows, step)]


def _w(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One expert's 2-D weight in like's dtype: w itself, or a converted workspace copy (used
    by the next product only)."""
    if w.dtype == like.dtype:
        return w
    return buffer("moe_weight", w.shape[0], w.shape[1], like).copy_(w)


def _mm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dst = a @ b; through a workspace slot when dst (a gradient stack's slice in the
    parameter dtype) differs from the compute dtype."""
    if dst.dtype == a.dtype:
        torch.mm(a, b, out=dst)
    else:
        dst.copy_(torch.mm(a, b, out=buffer("moe_grad", dst.shape[0], dst.shape[1], a)))


def _gather(
    x: torch.Tensor,
    tokens: torch.Tensor,
    name: str,
    dtype: torch.dtype,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows x[tokens] in dtype, in workspace slot `name`; with `dropped`, x's elements at those
    flat positions are zeroed first (x itself is not changed)."""
    out = buffer(name, tokens.shape[0], x.shape[1], x.new_empty(0, dtype=dtype))
    if dropped is None and x.dtype == dtype:
        return torch.index_select(x, 0, tokens, out=out)
    src = buffer("moe_src", x.shape[0], x.shape[1], out).copy_(x)
    if dropped is not None:
        zero_at(src, dropped)
    return torch.index_select(src, 0, tokens, out=out)


def _slot_sum(rows: torch.Tensor, order: torch.Tensor, tokens: torch.Tensor, top_k: int):
    """A new (T, H) tensor of sums over the k slots of the sorted rows (T*k, H); rows past
    len(rows) (sentinel slots) count as zero. Deterministic: on the CPU `index_add_` adds rows
    in order (one pass, half the time of the alternative); on other devices, where it adds
    with atomics, rows go back to (token, slot) order and are summed."""
    T, H, n = tokens.shape[0] // top_k, rows.shape[1], rows.shape[0]
    if rows.device.type == "cpu":
        return rows.new_zeros(T, H).index_add_(0, tokens[:n], rows)
    flat = rows.new_zeros(T * top_k, H).index_copy_(0, order[:n], rows)
    return flat.view(T, top_k, H).sum(dim=1)


def _local(positions: torch.Tensor | None, start: int, size: int) -> torch.Tensor | None:
    """The sorted flat positions in [start, start + size), shifted to start at 0."""
    if positions is None:
        return None
    bounds = torch.tensor([start, start + size], device=positions.device)
    lo, hi = torch.searchsorted(positions, bounds).tolist()
    return positions[lo:hi] - start


def _swiglu(gu: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up for gu = [gate | up] (n, 2I), h (n, I); returns h."""
    inter = h.shape[1]
    for rows in _blocks(h.shape[0], inter):
        torch.ops.aten.silu.out(gu[rows, :inter], out=h[rows]).mul_(gu[rows, inter:])
    return h


def _swiglu_parts(gu: torch.Tensor, sig: torch.Tensor, silu: torch.Tensor, h: torch.Tensor):
    """sigmoid(gate), silu(gate) and h = silu(gate) * up, into the given (n, I) tensors."""
    inter = h.shape[1]
    for rows in _blocks(h.shape[0], inter):
        g = gu[rows, :inter]
        torch.mul(g, torch.sigmoid(g, out=sig[rows]), out=silu[rows])
        torch.mul(silu[rows], gu[rows, inter:], out=h[rows])


def _swiglu_backward(gu, sig, silu, dh, dgu) -> torch.Tensor:
    """d[gate | up] (n, 2I) of h = silu(g) * u from dh (n, I): d_up = silu * dh and
    d_gate = dh * u * (sig + silu * (1 - sig)), reusing the sigmoid (torch's fused SiLU
    backward computes it again); sig is overwritten. Returns dgu."""
    inter = dh.shape[1]
    for rows in _blocks(dh.shape[0], inter):
        s, sl, d = sig[rows], silu[rows], dh[rows]
        torch.mul(sl, d, out=dgu[rows, inter:])
        s.addcmul_(sl, s, value=-1.0).add_(sl)
        torch.mul(d, gu[rows, inter:], out=dgu[rows, :inter]).mul_(s)
    return dgu


def _groups(counts: list[int], width: int) -> list[tuple[slice, list[tuple[int, slice]]]]:
    """Consecutive experts grouped until their rows hold about _BLOCK_ELEMS (rows, width)
    elements (at least one expert each): (the group's sorted rows, [(expert, its rows)]).

    Element-wise work runs once per group, so small batches (decode, 128 tokens) take a few
    large element-wise operations instead of a few per expert; large batches get a group per
    expert, whose element-wise work reads what its products just wrote.
    """
    limit = max(1, _BLOCK_ELEMS // width)
    groups: list[tuple[slice, list[tuple[int, slice]]]] = []
    start = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        span, members = groups[-1] if groups else (slice(0, 0), [])
        if groups and span.stop - span.start + n <= limit:
            groups[-1] = (slice(span.start, start + n), members)
        else:
            groups.append((slice(start, start + n), members := []))
        members.append((e, slice(start, start + n)))
        start += n
    return groups


def _shift(rows: slice, span: slice) -> slice:
    """rows (sorted-row indices) relative to the start of their group's span."""
    return slice(rows.start - span.start, rows.stop - span.start)


def _grad_stacks(
    stacks: dict[str, torch.Tensor | None], needed: tuple[bool, ...], counts: list[int]
) -> dict[str, torch.Tensor | None]:
    """A fresh gradient stack (`_empty`) per tensor of `stacks` whose flag in `needed` (same
    order) is set, else None. Experts without rows get zeros; backward writes the others whole."""
    grads = {
        name: _empty(t.shape, t.dtype, t.device) if t is not None and need else None
        for (name, t), need in zip(stacks.items(), needed, strict=True)
    }
    for g in grads.values():
        for e, n in enumerate(counts):
            if g is not None and not n:
                g[e].zero_()
    return grads


def _dx(dys, d_xd, valid, order, tokens, top_k, drop_x, dtype) -> torch.Tensor:
    """x's gradient from the first `valid` sorted rows of dys (dx rows) and, under x dropout,
    the LoRA part d_xd, whose per-token mask applies after the slot sums."""
    dx = _slot_sum(dys[:valid], order, tokens, top_k)
    if d_xd is not None:
        dx += zero_at(_slot_sum(d_xd, order, tokens, top_k), drop_x)
    return dx.to(dtype)


def _unsorted(d_ws: torch.Tensor, order: torch.Tensor, shape, dtype) -> torch.Tensor:
    """The routing weights' gradient: sorted rows back in (token, slot) order, shaped and typed
    as the weights."""
    d_weights = torch.empty_like(d_ws).index_copy_(0, order, d_ws)
    return d_weights.view(shape).to(dtype)


class SortedSwiGLU(torch.autograd.Function):
    """y[t] = sum_k w[t,k] * FFN_{ids[t,k]}(x[t]), SwiGLU experts with optional LoRA deltas.

    FFN_e(x) = (W2_e + s B2_e A2_e)(silu(g) * u) with [g | u] = (W1_e + s B1_e A1_e) x, the
    LoRA terms computed split as (x A^T) B^T. Shapes: x (T, H); weights, ids (T, K); W1
    (E, 2I, H), W2 (E, H, I); A1 (E, r, H), B1 (E, 2I, r), A2 (E, r, I), B2 (E, H, r), or
    empty tensors for a role without LoRA. Dropout p applies to the LoRA inputs (x per token,
    the gated activation per row). Gradients: x, weights, W1/W2 when they require grad, the
    LoRA factors. Kept for backward: x, the (T*K, 2I) projection, the rank-r activations
    (with `keep`; without it nothing is kept and the projection lives in the workspace).

    Products run expert by expert on each expert's sorted rows; element-wise work runs per
    group of experts (`_groups`) in workspace buffers sized to the largest group.
    """

    @staticmethod
    def forward(ctx, x, weights, ids, w1, w2, a1, b1, a2, b2, scaling, p, keep):
        cd = compute_dtype(x)
        K, E, inter = ids.shape[1], w1.shape[0], w2.shape[2]
        # expert-parallel sentinels (ids >= E) sort last and are never computed
        order, tokens, counts = sort_by_expert(ids.clamp(max=E), E + 1)
        counts, valid = counts[:E], sum(counts[:E])
        ws = weights.reshape(-1)[order].to(cd)
        a1, b1, a2, b2 = (none_if_empty(t) for t in (a1, b1, a2, b2))
        scale = scaling / (1.0 - p)  # LoRA and dropout scales, applied to rank-r rows
        xs = _gather(x, tokens, "moe_xs", cd)
        like = xs[:0]
        groups = _groups(counts, inter)
        most = max((span.stop - span.start for span, _ in groups), default=0)
        gu = _empty((valid, 2 * inter), cd, x.device) if keep else None
        drop_x = drop_h = low1 = low2 = None
        if a1 is not None:
            drop_x = dropped_positions(x.numel(), p, x.device) if p > 0 else None
            xd = xs if drop_x is None else _gather(x, tokens, "moe_xd", cd, drop_x)
            low1 = xs.new_empty(valid, a1.shape[1])
        if a2 is not None:
            drop_h = dropped_positions(valid * inter, p, x.device) if p > 0 else None
            low2 = xs.new_empty(valid, a2.shape[1])
        y = buffer("moe_y", valid, xs.shape[1], like)
        for span, members in groups:
            m = span.stop - span.start
            gu_g = gu[span] if keep else buffer("moe_gu", m, 2 * inter, like)
            for e, rows in members:
                gu_e = torch.mm(xs[rows], _w(w1[e], like).t(), out=gu_g[_shift(rows, span)])
                if a1 is not None:
                    low = torch.mm(xd[rows], _w(a1[e], like).t(), out=low1[rows]).mul_(scale)
                    gu_e.addmm_(low, _w(b1[e], like).t())
            h = _swiglu(gu_g, buffer("moe_h", m, inter, like))
            for e, rows in members:
                h_e = h[_shift(rows, span)]
                y_e = torch.mm(h_e, _w(w2[e], like).t(), out=y[rows])
                if a2 is not None:
                    if drop_h is not None:  # h_e is not needed unmasked any more
                        zero_at(h_e, _local(drop_h, rows.start * inter, h_e.numel()))
                    low = torch.mm(h_e, _w(a2[e], like).t(), out=low2[rows]).mul_(scale)
                    y_e.addmm_(low, _w(b2[e], like).t())
        out = _slot_sum(y.mul_(ws[:valid, None]), order, tokens, K).to(x.dtype)
        empty = x.new_empty(0)
        none = torch.empty(0, dtype=torch.int64, device=x.device)
        ctx.save_for_backward(
            x, w1, w2, gu if keep else empty, ws, order, tokens,
            *(t if t is not None else empty for t in (a1, b1, a2, b2, low1, low2)),
            *(t if t is not None else none for t in (drop_x, drop_h)),
        )  # fmt: skip
        ctx.counts, ctx.most, ctx.scale, ctx.top_k = counts, most, scale, K
        ctx.weights_shape, ctx.weights_dtype = weights.shape, weights.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, gu, ws, order, tokens, *rest = ctx.saved_tensors
        a1, b1, a2, b2, low1, low2, drop_x, drop_h = (none_if_empty(t) for t in rest)
        need_x, need_w, need_w1, need_w2 = (ctx.needs_input_grad[i] for i in (0, 1, 3, 4))
        counts, scale = ctx.counts, ctx.scale
        cd, inter, valid, most = gu.dtype, w2.shape[2], gu.shape[0], ctx.most
        like = gu[:0]
        # incoming gradient per sorted row (unweighted); its rows are replaced by dx rows
        dys = _gather(dout.contiguous(), tokens, "moe_dys", cd)
        xs = xd = None
        if need_w1 or (a1 is not None and drop_x is None):
            xs = _gather(x, tokens, "moe_xs", cd)
        if a1 is not None:
            xd = xs if drop_x is None else _gather(x, tokens, "moe_xd", cd, drop_x)
        stacks = {"w1": w1, "w2": w2, "a1": a1, "b1": b1, "a2": a2, "b2": b2}
        grads = _grad_stacks(stacks, ctx.needs_input_grad[3:9], counts)
        d_ws = torch.zeros(tokens.shape[0], dtype=cd, device=x.device) if need_w else None
        d_xd = None
        if need_x and a1 is not None and drop_x is not None:  # per-token mask: after the sums
            d_xd = buffer("moe_dxd", valid, x.shape[1], like)
        names = ("moe_sig", "moe_silu", "moe_h", "moe_dh", "moe_prod")
        sig_buf, silu_buf, h_buf, dh_buf, prod_buf = (
            buffer(name, most, inter, like) for name in names
        )
        dgu_buf = buffer("moe_dgu", most, 2 * inter, like)
        for span, members in _groups(counts, inter):
            m = span.stop - span.start
            gu_g, dy_g, w_g = gu[span], dys[span], ws[span, None]
            sig, silu, h, dh = sig_buf[:m], silu_buf[:m], h_buf[:m], dh_buf[:m]
            _swiglu_parts(gu_g, sig, silu, h)
            for e, rows in members:
                torch.mm(dys[rows], _w(w2[e], like), out=dh[_shift(rows, span)])
            if need_w:  # <dout, h W2^T> = <dout W2, h>, row by row
                torch.sum(torch.mul(dh, h, out=prod_buf[:m]), 1, out=d_ws[span])
            if a2 is not None:  # through the down LoRA: d(rank-r rows), unweighted
                d_low2 = dys.new_empty(m, b2.shape[2])
                for e, rows in members:
                    torch.mm(dys[rows], _w(b2[e], like), out=d_low2[_shift(rows, span)])
                if need_w:
                    d_ws[span] += torch.linalg.vecdot(d_low2, low2[span])
            dy_g.mul_(w_g)
            dh.mul_(w_g)
            for e, rows in members:
                if grads["w2"] is not None:
                    _mm_into(grads["w2"][e], dys[rows].t(), h[_shift(rows, span)])
                if a2 is not None:
                    _mm_into(grads["b2"][e], dys[rows].t(), low2[rows])
            if a2 is not None:
                d_low2.mul_(w_g).mul_(scale)
                for e, rows in members:
                    local, h_e = _shift(rows, span), h[_shift(rows, span)]
                    dropped = _local(drop_h, rows.start * inter, h_e.numel())
                    hd = h_e if dropped is None else zero_at(h_e, dropped)
                    _mm_into(grads["a2"][e], d_low2[local].t(), hd)
                    d_hd = torch.mm(d_low2[local], _w(a2[e], like), out=hd)  # h_e is done
                    dh[local].add_(d_hd if dropped is None else zero_at(d_hd, dropped))
            dgu = _swiglu_backward(gu_g, sig, silu, dh, dgu_buf[:m])
            for e, rows in members:
                dgu_e = dgu[_shift(rows, span)]
                if grads["w1"] is not None:
                    _mm_into(grads["w1"][e], dgu_e.t(), xs[rows])
                if a1 is not None:
                    _mm_into(grads["b1"][e], dgu_e.t(), low1[rows])
                    d_low = torch.mm(dgu_e, _w(b1[e], like)).mul_(scale)
                    _mm_into(grads["a1"][e], d_low.t(), xd[rows])
                if need_x:  # the rows of dy are done: dx rows replace them
                    dx_e = torch.mm(dgu_e, _w(w1[e], like), out=dys[rows])
                    if a1 is not None and d_xd is None:
                        dx_e.addmm_(d_low, _w(a1[e], like))
                    elif a1 is not None:
                        torch.mm(d_low, _w(a1[e], like), out=d_xd[rows])
        dx = _dx(dys, d_xd, valid, order, tokens, ctx.top_k, drop_x, x.dtype) if need_x else None
        d_weights = _unsorted(d_ws, order, ctx.weights_shape, ctx.weights_dtype) if need_w else None
        return (
            dx, d_weights, None, grads["w1"], grads["w2"],
            grads["a1"], grads["b1"], grads["a2"], grads["b2"], None, None, None,
        )  # fmt: skip


def sorted_swiglu_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up_w: torch.Tensor,
    down_w: torch.Tensor,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SwiGLU MoE experts on sorted tokens (see `SortedSwiGLU`): (T, H) -> (T, H).

    gate_up_w (E, 2I, H) = [gate; up] and down_w (E, H, I), transformers' fused layout;
    weights and ids (T, K) from the router (ids >= E are expert-parallel sentinels and get
    zero). lora: optional "gate_up" (A (E, r, H), B (E, 2I, r)) and "down" (A (E, r, I),
    B (E, H, r)) in peft's orientation, scaled by `scaling`; `dropout_p` drops LoRA inputs.
    """
    lora = lora or {}
    empty = x.new_empty(0)
    a1, b1 = lora.get("gate_up", (empty, empty))
    a2, b2 = lora.get("down", (empty, empty))
    tensors = (x, weights, gate_up_w, down_w, a1, b1, a2, b2)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return SortedSwiGLU.apply(
        x, weights, ids, gate_up_w, down_w, a1, b1, a2, b2, scaling, dropout_p, keep
    )


def is_silu(act) -> bool:
    """Whether act is SiLU (torch's or transformers' module, or the function)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is F.silu


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool):
    """x @ w^T (+ b) for weights stored (out, in), or x @ w for (in, out) when transposed."""
    y = x @ w if transposed else F.linear(x, w)
    return y if b is None else y + b


def autograd_experts(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """Any `@use_experts_implementation` experts (custom gate, biases, transposed weights,
    post-expert norm, no gate) with autograd over one matrix product per expert segment."""
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts = self.num_experts
    order, tokens, counts = sort_by_expert(top_k_index.clamp(max=num_experts), num_experts + 1)
    xs = hidden_states.index_select(0, tokens)
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    transposed = getattr(self, "is_transposed", False)
    first = self.gate_up_proj if has_gate else self.up_proj
    first_bias = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    # one unbind per stack: indexing a stack per expert would make backward build a zero
    # tensor of the whole stack for every expert
    first_w, down_w = first.unbind(0), self.down_proj.unbind(0)
    first_b = first_bias.unbind(0) if has_bias else [None] * num_experts
    down_b = self.down_proj_bias.unbind(0) if has_bias else [None] * num_experts
    outs = xs.new_zeros(xs.shape[0], hidden)
    start = 0
    for e, n in enumerate(counts[:num_experts]):
        if n:
            h = _linear(xs[start : start + n], first_w[e], first_b[e], transposed)
            h = self._apply_gate(h) if has_gate else self.act_fn(h)
            outs[start : start + n] = _linear(h, down_w[e], down_b[e], transposed)
        start += n
    if getattr(self, "has_post_expert_norm", False):
        outs = self.post_expert_norm(outs)
    weights = top_k_weights.reshape(-1)[order].to(outs.dtype)
    weighted = torch.zeros_like(outs).index_copy(0, order, outs * weights[:, None])
    return weighted.view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def is_plain_swiglu(experts: nn.Module) -> bool:
    """Fused [gate; up] (out, in) weights, no bias or post norm, the default SiLU gate."""
    from transformers.integrations.moe import _default_apply_gate

    return (
        getattr(experts, "has_gate", True)
        and not getattr(experts, "has_bias", False)
        and not getattr(experts, "is_transposed", False)
        and not getattr(experts, "has_post_expert_norm", False)
        and getattr(experts, "is_concatenated", True)
        and getattr(type(experts), "_apply_gate", _default_apply_gate) is _default_apply_gate
        and is_silu(getattr(experts, "act_fn", None))
    )
