"""Triton kernels for routed SwiGLU experts and LoRA experts, on rows sorted by expert.

Layout shared by every kernel: the T*K (token, slot) pairs of a top-k routing are sorted by
expert once (`upcycle.kernels.reference.sort_by_expert`). Sorted row r is slot `order[r]` of the
flat (T*K) routing, i.e. token `tokens[r] = order[r] // K`, and expert e owns the rows
`offsets[e]:offsets[e+1]` (`offsets` (E+1,) int32 on the device; rows past offsets[E], such as
expert-parallel sentinels, belong to no expert and are never computed). Each program of a
grouped kernel maps its id to (expert, block of that expert's rows) from `offsets` itself
(`_expert_block`), so no per-block table is built on the host, any BLOCK_M can be autotuned, and
empty experts cost nothing. Inputs are read through the gather index (`x[tokens[r]]`) and outputs
written through the scatter index (slot order), so no gathered or padded copy of x exists.

Kernels (all accumulate in fp32; inputs fp32, fp16 or bf16):
- `_gate_up_kernel`: h = silu(x Wg_e^T + dg) * (x Wu_e^T + du) for sorted rows, with the fused
  gate_up weight (E, 2I, H) and an optional sorted pre-activation delta (the gate_up LoRA).
- `_grouped_mm_kernel`: out[scatter[r]] (+)= alpha * s[r] * a[gather[r]] @ W_e^T (or W_e); the
  down projection, the LoRA factors and every backward product that has the shape of a forward.
- `_swiglu_bwd_kernel`: dh = w * dy[token] @ Wd_e (+ extra), turned into d(gate_up) in the
  epilogue, with per-column-block partial sums of <dy[token] @ Wd_e, h> for the routing
  weights' gradient (summed afterwards: deterministic, no atomics).
- `_segment_outer_kernel`: dW_e = alpha * sum over expert e's rows of (s a)^T b, for weight and
  LoRA factor gradients (empty experts get zeros).

Under `TRITON_INTERPRET=1` (CPU tests) every kernel has exactly one autotune config (several fail
with "0 active drivers") and `tl.dot` operands are cast to fp32 (the interpreter multiplies bf16
wrongly). Launchers return new tensors unless given `out`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(cuda: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps); one small one when
    interpreting (tests use sizes that cross its block and segment edges)."""
    if INTERPRET:
        cuda = [(64, 32, 32, 1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=3)
        for m, n, k, w in cuda
    ]


_MM_CONFIGS = _configs([(64, 64, 32, 4), (128, 64, 32, 4), (64, 128, 32, 4), (128, 128, 64, 8)])
# two accumulators (gate and up), so smaller tiles
_GATE_UP_CONFIGS = _configs([(64, 64, 32, 4), (128, 64, 32, 8), (64, 32, 64, 4)])
# BLOCK_M, BLOCK_N tile the weight gradient; BLOCK_K steps over an expert's rows
_OUTER_CONFIGS = _configs([(64, 64, 32, 4), (128, 64, 32, 4), (128, 128, 32, 8)])
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _MM_CONFIGS)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_args(t: torch.Tensor) -> dict:
    """The constexprs of tl.dot for operands of t's dtype: DOT, the operand dtype (fp32 when
    interpreting: the interpreter multiplies bf16 wrongly), and PRECISION (fp32 inputs use
    tf32 only where torch's matmuls would)."""
    tf32 = t.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return dict(
        DOT=tl.float32 if INTERPRET else _TL_DTYPES[t.dtype],
        PRECISION="tf32" if tf32 else "ieee",
    )


@triton.jit
def _expert_block(offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end of the expert's rows) of this program's block of sorted rows.

    Experts' blocks are numbered in expert order: expert e has ceil(n_e / BLOCK_M) blocks. A
    program past the last block gets first row >= end (it must return at once).
    """
    pid = tl.program_id(0)
    ids = tl.arange(0, BLOCK_E)
    starts = tl.load(offsets_ptr + ids, mask=ids < E, other=0)
    ends = tl.load(offsets_ptr + ids + 1, mask=ids < E, other=0)
    blocks = (ends - starts + BLOCK_M - 1) // BLOCK_M
    before = tl.cumsum(blocks, 0) <= pid  # experts whose blocks all come before this one
    e = tl.sum(before.to(tl.int32), 0)
    first_block = tl.sum(tl.where(before, blocks, 0), 0)
    start = tl.load(offsets_ptr + e, mask=e < E, other=0)
    end = tl.load(offsets_ptr + e + 1, mask=e < E, other=0)
    return e, start + (pid - first_block) * BLOCK_M, end


@triton.jit
def _tile(row0, end, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's sorted rows [row0, row0 + BLOCK_M) (int64: row * stride may pass 2^31)
    and output columns (block program_id(1)), with their masks against `end` and N."""
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < end, cols, cols < N


@triton.jit
def _rows_times_w(
    a_ptr, src, row_ok, stride_am, stride_ak, w_base, cols, col_ok, stride_wk, stride_wn, K,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp32 (BLOCK_M, BLOCK_N) tile of A[src] @ W: rows `src` of A read through the index (no
    gathered copy), W one expert's (K, N) view given by its strides, K in BLOCK_K steps."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    return acc


@triton.autotune(configs=_GATE_UP_CONFIGS, key=["N", "K"])
@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, delta_ptr, h_ptr, gu_ptr, tokens_ptr, offsets_ptr,
    N, K, E,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
    stride_dm, stride_dn, stride_hm, stride_hn, stride_gm, stride_gn,
    HAS_DELTA: tl.constexpr, SAVE_GU: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # N = I (gate rows n, up rows N + n of W_e), K = H
    e, row0, end = _expert_block(offsets_ptr, E, BLOCK_M, BLOCK_E)
    if row0 >= end:
        return
    rows, row_ok, cols, col_ok = _tile(row0, end, N, BLOCK_M, BLOCK_N)
    src = tl.load(tokens_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_off = ks[:, None] * stride_wk + cols[None, :] * stride_wn
        wg = tl.load(w_base + w_off, mask=w_mask, other=0.0)
        wu = tl.load(w_base + N * stride_wn + w_off, mask=w_mask, other=0.0)
        acc_g = tl.dot(a.to(DOT), wg.to(DOT), acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a.to(DOT), wu.to(DOT), acc_u, input_precision=PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_DELTA:
        d_off = rows[:, None] * stride_dm + cols[None, :] * stride_dn
        acc_g += tl.load(delta_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
        acc_u += tl.load(delta_ptr + N * stride_dn + d_off, mask=mask, other=0.0).to(tl.float32)
    if SAVE_GU:
        g_off = rows[:, None] * stride_gm + cols[None, :] * stride_gn
        tl.store(gu_ptr + g_off, acc_g.to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(gu_ptr + N * stride_gn + g_off, acc_u.to(gu_ptr.dtype.element_ty), mask=mask)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    h_off = rows[:, None] * stride_hm + cols[None, :] * stride_hn
    tl.store(h_ptr + h_off, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_MM_CONFIGS, key=["N", "K"], restore_value=["out_ptr"])
@triton.jit
def _grouped_mm_kernel(
    a_ptr, w_ptr, out_ptr, gather_ptr, scatter_ptr, scale_ptr, offsets_ptr,
    N, K, E, alpha,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    e, row0, end = _expert_block(offsets_ptr, E, BLOCK_M, BLOCK_E)
    if row0 >= end:
        return
    rows, row_ok, cols, col_ok = _tile(row0, end, N, BLOCK_M, BLOCK_N)
    if GATHER:
        src = tl.load(gather_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = _rows_times_w(
        a_ptr, src, row_ok, stride_am, stride_ak, w_base, cols, col_ok, stride_wk, stride_wn, K,
        DOT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    acc = acc * alpha
    if SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if SCATTER:
        dst = tl.load(scatter_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        dst = rows
    out = out_ptr + dst[:, None] * stride_om + cols[None, :] * stride_on
    mask = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_MM_CONFIGS, key=["N", "K"], restore_value=["part_ptr"])
@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr, w_ptr, gu_ptr, weights_ptr, extra_ptr, dgu_ptr, h_ptr, part_ptr, tokens_ptr,
    offsets_ptr,
    N, K, E, TK,
    stride_ym, stride_yk, stride_we, stride_wk, stride_wn, stride_gm, stride_gn,
    stride_xm, stride_xn, stride_dm, stride_dn, stride_hm, stride_hn,
    HAS_EXTRA: tl.constexpr, STORE_H: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # N = I, K = H; down weight W_e (H, I) is read untransposed
    e, row0, end = _expert_block(offsets_ptr, E, BLOCK_M, BLOCK_E)
    if row0 >= end:
        return
    rows, row_ok, cols, col_ok = _tile(row0, end, N, BLOCK_M, BLOCK_N)
    src = tl.load(tokens_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    # dy[token] @ W_e, unweighted
    acc = _rows_times_w(
        dy_ptr, src, row_ok, stride_ym, stride_yk, w_base, cols, col_ok, stride_wk, stride_wn, K,
        DOT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    mask = row_ok[:, None] & col_ok[None, :]
    g_off = rows[:, None] * stride_gm + cols[None, :] * stride_gn
    g = tl.load(gu_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + N * stride_gn + g_off, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    h = silu * u
    # d loss / d routing weight = <dy, expert output> = <dy @ W_e, h>, summed over I blocks later
    tl.store(part_ptr + tl.program_id(1) * TK + rows, tl.sum(acc * h, 1), mask=row_ok)
    dh = acc * tl.load(weights_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_EXTRA:
        x_off = rows[:, None] * stride_xm + cols[None, :] * stride_xn
        dh += tl.load(extra_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    d_off = rows[:, None] * stride_dm + cols[None, :] * stride_dn
    dg = dh * u * (sig + silu * (1.0 - sig))  # silu'(g) = sig + silu * (1 - sig)
    tl.store(dgu_ptr + d_off, dg.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + N * stride_dn + d_off, (dh * silu).to(dgu_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        h_off = rows[:, None] * stride_hm + cols[None, :] * stride_hn
        tl.store(h_ptr + h_off, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_OUTER_CONFIGS, key=["M", "N"])
@triton.jit
def _segment_outer_kernel(
    a_ptr, b_ptr, out_ptr, gather_a_ptr, gather_b_ptr, scale_ptr, offsets_ptr,
    M, N, alpha,
    stride_ar, stride_am, stride_br, stride_bn, stride_oe, stride_om, stride_on,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        r_ok = rs < end
        if GATHER_A:
            ra = tl.load(gather_a_ptr + rs, mask=r_ok, other=0).to(tl.int64)
        else:
            ra = rs.to(tl.int64)
        if GATHER_B:
            rb = tl.load(gather_b_ptr + rs, mask=r_ok, other=0).to(tl.int64)
        else:
            rb = rs.to(tl.int64)
        a = tl.load(
            a_ptr + ra[None, :] * stride_ar + ms[:, None] * stride_am,
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K): a^T
        if SCALE:
            s = tl.load(scale_ptr + rs, mask=r_ok, other=0.0)
            a = (a.to(tl.float32) * s[None, :]).to(a_ptr.dtype.element_ty)
        b = tl.load(
            b_ptr + rb[:, None] * stride_br + ns[None, :] * stride_bn,
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PRECISION)
    out = out_ptr + e.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on
    tl.store(out, (acc * alpha).to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _rows_grid(rows: int, cols: int, num_experts: int):
    """Grid for the grouped kernels: enough row blocks for any split of `rows` among experts
    (sum_e ceil(n_e / BLOCK_M) <= ceil(rows / BLOCK_M) + E), times the column blocks."""
    return lambda meta: (
        triton.cdiv(rows, meta["BLOCK_M"]) + num_experts,
        triton.cdiv(cols, meta["BLOCK_N"]),
    )


def _common(t: torch.Tensor, num_experts: int) -> dict:
    return dict(**_dot_args(t), BLOCK_E=triton.next_power_of_2(num_experts))


def gate_up_swiglu(
    x: torch.Tensor,
    gate_up_w: torch.Tensor,
    tokens: torch.Tensor,
    offsets: torch.Tensor,
    delta: torch.Tensor | None = None,
    save_gu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h (TK, I) = silu(g) * u with [g, u] = x[tokens] @ gate_up_w[e]^T (+ delta), sorted rows.

    x (T, H); gate_up_w (E, 2I, H); tokens (TK,) token of each sorted row; offsets (E+1,);
    delta (TK, 2I) sorted, added before the activation. With `save_gu`, also returns the
    pre-activations [g, u] (TK, 2I) for the backward pass. Rows past offsets[E] are left unset.
    """
    num_experts, two_i, hidden = gate_up_w.shape
    rows, inter = tokens.shape[0], two_i // 2
    h = x.new_empty(rows, inter)  # rows outside every expert stay unset (never read)
    gu = x.new_empty(rows, two_i) if save_gu else None
    if rows:
        d, g = delta if delta is not None else h, gu if gu is not None else h
        _gate_up_kernel[_rows_grid(rows, inter, num_experts)](
            x, gate_up_w, d, h, g, tokens, offsets,
            inter, hidden, num_experts,
            x.stride(0), x.stride(1), *gate_up_w.stride(),
            d.stride(0), d.stride(1), h.stride(0), h.stride(1), g.stride(0), g.stride(1),
            HAS_DELTA=delta is not None, SAVE_GU=save_gu, **_common(x, num_experts),
        )  # fmt: skip
    return h, gu


def grouped_mm(
    a: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    *,
    transpose: bool = True,
    gather: torch.Tensor | None = None,
    scatter: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    alpha: float = 1.0,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """out[scatter[r]] (+)= alpha * scale[r] * a[gather[r]] @ (w[e]^T if transpose else w[e])
    for every sorted row r of expert e (offsets (E+1,)); without an index, r itself.

    a (TK, K) sorted rows, or any rows read through `gather` (TK,); w (E, N, K) with
    `transpose`, else (E, K, N); scale (TK,) fp32. Writes into `out` when given (any number of
    rows with `scatter`), else into a new zero (TK, N) tensor (zero on rows of no expert).
    """
    index = gather if gather is not None else scatter
    num_rows = (index if index is not None else a).shape[0]  # sorted rows
    num_experts = w.shape[0]
    n, k = (w.shape[1], w.shape[2]) if transpose else (w.shape[2], w.shape[1])
    stride_wn, stride_wk = (w.stride(1), w.stride(2)) if transpose else (w.stride(2), w.stride(1))
    if out is None:
        out = a.new_zeros(num_rows, n)
    if num_rows:
        dummy = offsets
        _grouped_mm_kernel[_rows_grid(num_rows, n, num_experts)](
            a, w, out,
            gather if gather is not None else dummy,
            scatter if scatter is not None else dummy,
            scale if scale is not None else dummy,
            offsets, n, k, num_experts, alpha,
            a.stride(0), a.stride(1), w.stride(0), stride_wn, stride_wk,
            out.stride(0), out.stride(1),
            GATHER=gather is not None, SCATTER=scatter is not None, SCALE=scale is not None,
            ACCUMULATE=accumulate, **_common(a, num_experts),
        )  # fmt: skip
    return out


def swiglu_backward(
    dy: torch.Tensor,
    down_w: torch.Tensor,
    gu: torch.Tensor,
    weights: torch.Tensor,
    tokens: torch.Tensor,
    offsets: torch.Tensor,
    extra: torch.Tensor | None = None,
    store_h: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward of y[token] += w * (silu(g) * u) @ down_w[e]^T through the activation.

    dy (T, H); down_w (E, H, I); gu (TK, 2I) sorted pre-activations; weights (TK,) fp32 sorted
    routing weights; extra (TK, I) sorted, added to dh (another path into h, e.g. a down LoRA).
    Returns d_gu (TK, 2I), <dy[token], h @ down_w[e]^T> per sorted row (TK,) fp32 (the routing
    weights' gradient from the base path), and h (TK, I) when `store_h`; d_gu and h are unset
    on rows past offsets[E].
    """
    num_experts, hidden, inter = down_w.shape
    rows = gu.shape[0]
    d_gu = torch.empty_like(gu)  # like h and gu, unset outside the experts' rows
    h = gu.new_empty(rows, inter) if store_h else None
    part = torch.zeros(triton.cdiv(inter, _MIN_BLOCK_N), rows, device=gu.device)
    if rows:
        x, hh = extra if extra is not None else gu, h if h is not None else gu
        _swiglu_bwd_kernel[_rows_grid(rows, inter, num_experts)](
            dy, down_w, gu, weights, x, d_gu, hh, part, tokens, offsets,
            inter, hidden, num_experts, rows,
            dy.stride(0), dy.stride(1), *down_w.stride(), gu.stride(0), gu.stride(1),
            x.stride(0), x.stride(1), d_gu.stride(0), d_gu.stride(1), hh.stride(0), hh.stride(1),
            HAS_EXTRA=extra is not None, STORE_H=store_h, **_common(dy, num_experts),
        )  # fmt: skip
    return d_gu, part.sum(0), h


def segment_outer(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    num_experts: int,
    *,
    gather_a: torch.Tensor | None = None,
    gather_b: torch.Tensor | None = None,
    scale_a: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """out[e] = alpha * sum over expert e's sorted rows r of (scale_a[r] a[gather_a[r]])^T b[...].

    a (rows, M), b (rows, N), each read through its gather index when given; scale_a (TK,)
    fp32. Returns (E, M, N) in a's dtype: the weight gradient dW_e = dY_e^T X_e of a grouped
    product, zero for experts without rows.
    """
    m, n = a.shape[1], b.shape[1]
    out = a.new_empty(num_experts, m, n)
    if out.numel():
        dummy = offsets

        def grid(meta):
            return num_experts, triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])

        _segment_outer_kernel[grid](
            a, b, out,
            gather_a if gather_a is not None else dummy,
            gather_b if gather_b is not None else dummy,
            scale_a if scale_a is not None else dummy,
            offsets, m, n, alpha,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), *out.stride(),
            GATHER_A=gather_a is not None, GATHER_B=gather_b is not None,
            SCALE=scale_a is not None, **_dot_args(a),
        )  # fmt: skip
    return out
