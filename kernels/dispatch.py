"""Which implementation runs each MoE product: one rule per layer kind, with the figures behind it.

The rules (callers ask here; nothing else decides):

experts, `experts_implementation="upcycle"` (plain SwiGLU experts, no LoRA):
  CUDA, at most TRITON_MAX_TOKENS tokens: upcycle's Triton kernels (`ops.experts_swiglu`).
  CUDA, more tokens, or experts of another shape: transformers' grouped_mm experts.
  CPU: the sorted Function (`experts.sorted_swiglu_experts`).
  H200, bf16, torch 2.11, transformers 5.25 (2026-12-04, bench/gpu_moe.py, ms per call):
    mixtral (H4096 I14336 E8 top-2) fwd at 64 tokens: Triton 1.12, grouped_mm 1.37 (1.22x);
    fwd+bwd at 4096 tokens: Triton 30.8, grouped_mm 16.9 (0.55x); at 16384: 126.5 vs 64.3;
    fine (E64 top-6) fwd+bwd at 4096 tokens: Triton 7.0, grouped_mm 4.9 (0.70x).
  The Triton kernels win where the products are too small to fill the GPU (decode) and lose
  to the vendor grouped GEMM once they are not, so above 64 tokens grouped_mm runs.
  CPU (2-core VM, fp32/bf16, docs/benchmarks.md): the sorted Function beats grouped_mm by
  15-45% at 4096 tokens.

experts with LoRA deltas (`--adapter experts-lora`, `routed_experts_lora` below):
  CUDA, SiLU experts without LoRA dropout (eval, or lora_dropout 0): the Triton kernels
  (`ops.experts_swiglu` with the LoRA pairs), at any token count; this case has not been timed
  against grouped_mm on its own (issue 16 keeps that measurement open).
  CUDA otherwise, bf16/fp16, ranks in multiples of 8: grouped_mm for base and LoRA products
  (`grouped.experts_lora`). The sorted Function, which the CPU needs, cost 5.1-6.9x the
  frozen grouped_mm floor on the H200 (host syncs, per-expert loops).
  CUDA, other dtypes or ranks: the Triton kernels where they apply (SiLU, no dropout).
  Otherwise and on CPU: the sorted Function (SiLU) or the reference (autograd per expert).

MixLoRA FFN (`routed_lora_ffn` below; the layer passes the FFN's own activation):
  granular views, or base projections that are not plain weights (quantized linears): the
  reference (`reference.routed_lora_ffn`, autograd), with the given activation.
  Otherwise (copy view, plain weights; `routed_lora_swiglu` below), for any element-wise
  activation: SiLU runs the Functions' own in-place code (`experts.is_silu`), any other
  activation (Gemma's tanh GELU) the same Functions with `act` (`reference.act_and_slope`);
  the figures below are SiLU's.
  CUDA, when `mixlora_dense.fits` (E*r <= I/8): the dense Function (`mixlora_dense`): cuBLAS
  products only, no sorting, no host syncs. `upcycle train` on a 1.1B llama (H200, bf16, seq
  1024, batch 8; bench/gpu_train.py, 2026-12-04): dense 30.5k tokens/s, 20.3 GB; the lean
  sorted Function with Triton segment products 17.2k, 18.8 GB; plain LoRA 35.8k, 26.0 GB.
  Otherwise: the lean sorted Function (`fused.routed_lora_swiglu`), its per-expert LoRA
  products on the Triton kernels where they run (`triton_runs_on`: CUDA), else in torch per
  segment, which is what the CPU figures in docs/benchmarks.md measure.

`experts_forward` (what transformers calls for "upcycle", see `register`),
`routed_experts_lora`, `routed_lora_ffn` and `routed_lora_swiglu` are the entry points that
follow these rules; `experts`, `experts_lora`, `mixlora_fused` and `mixlora` name the choice
without running it.

Overrides for benchmarks and tests: UPCYCLE_EXPERTS=triton|grouped_mm|sorted and
UPCYCLE_MIXLORA=dense|lean pick one implementation wherever it can run; UPCYCLE_TRITON=1 runs
the Triton kernels on any device wherever they apply (the CPU tests, under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import importlib.util
import os

from torch import Tensor

NAME = "upcycle"  # experts_implementation=NAME
TRITON_MAX_TOKENS = 64
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
EXPERTS_CHOICES = ("triton", "grouped_mm", "sorted")


def _override(name: str, choices: tuple[str, ...]) -> str | None:
    value = os.environ.get(name, "").strip().lower()
    if value and value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value or None


def _triton_env() -> bool:
    return os.environ.get("UPCYCLE_TRITON") == "1"


def triton_runs_on(*tensors: Tensor) -> bool:
    """Whether the Triton kernels can take these tensors: on any device under UPCYCLE_TRITON=1
    (the CPU tests, under TRITON_INTERPRET=1), else when triton is installed and every tensor
    is on CUDA."""
    return _triton_env() or (TRITON_INSTALLED and all(t.is_cuda for t in tensors))


def experts(x: Tensor, plain_swiglu: bool) -> str:
    """ "triton", "grouped_mm" or "sorted" for an experts forward on x (T, H); "sorted" means
    the sorted Function for plain SwiGLU experts and autograd per expert for the others."""
    can = {"sorted", "grouped_mm"}
    if plain_swiglu and triton_runs_on(x):
        can.add("triton")
    forced = _override("UPCYCLE_EXPERTS", EXPERTS_CHOICES)
    if forced in can:
        return forced
    if _triton_env() and "triton" in can:
        return "triton"
    if not x.is_cuda:
        return "sorted"
    if "triton" in can and x.shape[0] <= TRITON_MAX_TOKENS:
        return "triton"
    return "grouped_mm"


def experts_lora(x: Tensor, lora: dict, *, silu: bool = False, dropout_p: float = 0.0) -> str:
    """ "triton", "grouped_mm" or "sorted" for experts with LoRA deltas on x (T, H); "sorted"
    means the sorted Function for SiLU experts and the reference for the others. The Triton
    kernels take SiLU experts without LoRA dropout only."""
    from upcycle.kernels import grouped

    can = {"sorted"}
    if silu and not dropout_p and triton_runs_on(x):
        can.add("triton")
    if grouped.supports(x, lora):
        can.add("grouped_mm")
    forced = _override("UPCYCLE_EXPERTS", EXPERTS_CHOICES)
    if forced in can:
        return forced
    if _triton_env():
        return "triton" if "triton" in can else "sorted"
    if not x.is_cuda:
        return "sorted"
    # Triton wherever it runs (no LoRA dropout: eval, or --dropout 0), at any token count, as
    # before this rule moved here; training with dropout (bench/gpu_train.py's experts-lora run,
    # 29.0k tokens/s on the H200) takes grouped_mm.
    for path in ("triton", "grouped_mm"):
        if path in can:
            return path
    return "sorted"


def mixlora_fused(projections, slices) -> bool:
    """Whether a MixLoRA FFN runs on the fused Functions (dense or lean, `mixlora`): the copy
    view (`slices` None) over plain weight tensors; projections: the base gate, up and down
    (weight tensors, or modules such as quantized linears). The activation does not matter."""
    import torch

    return slices is None and all(torch.is_tensor(w) for w in projections)


def mixlora(x: Tensor, num_experts: int, r: int, intermediate: int) -> str:
    """ "dense" or "lean" for a MixLoRA FFN on the fused Functions (`mixlora_fused`)."""
    from upcycle.kernels import mixlora_dense

    forced = _override("UPCYCLE_MIXLORA", ("dense", "lean"))
    if forced:
        return forced
    if x.is_cuda and mixlora_dense.fits(num_experts, r, intermediate):
        return "dense"
    return "lean"


def experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor):
    """The experts forward of a `@use_experts_implementation` module: (T, H) -> (T, H), on the
    implementation `experts` picks."""
    from upcycle.kernels import experts as sorted_experts

    plain = sorted_experts.is_plain_swiglu(self)
    path = experts(hidden_states, plain)
    if path == "triton":
        from upcycle.kernels import ops

        return ops.experts_swiglu(
            hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights
        )
    if path == "grouped_mm":
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if plain:
        return sorted_experts.sorted_swiglu_experts(
            hidden_states, top_k_weights, top_k_index, self.gate_up_proj, self.down_proj
        )
    return sorted_experts.autograd_experts(self, hidden_states, top_k_index, top_k_weights)


def routed_experts_lora(
    x: Tensor,
    gate_up_w: Tensor,
    down_w: Tensor,
    act,
    weights: Tensor,
    ids: Tensor,
    lora: dict,
    scaling: float,
    *,
    dropout_p: float = 0.0,
) -> Tensor:
    """`reference.routed_experts_lora` (experts with per-expert LoRA deltas) on the
    implementation `experts_lora` picks: the Triton kernels, grouped_mm, the sorted Function
    (SiLU) or the reference itself."""
    from upcycle.kernels import experts as sorted_experts
    from upcycle.kernels import grouped, reference

    silu = sorted_experts.is_silu(act)
    path = experts_lora(x, lora, silu=silu, dropout_p=dropout_p)
    if path == "triton":
        from upcycle.kernels import ops

        return ops.experts_swiglu(x, gate_up_w, down_w, ids, weights, lora, scaling)
    if path == "grouped_mm":
        return grouped.experts_lora(
            x, gate_up_w, down_w, act, weights, ids, lora, scaling, dropout_p
        )
    if silu:
        return sorted_experts.sorted_swiglu_experts(
            x, weights, ids, gate_up_w, down_w, lora, scaling, dropout_p
        )
    return reference.routed_experts_lora(
        x, gate_up_w, down_w, act, weights, ids, lora, scaling, dropout_p=dropout_p
    )


def routed_lora_swiglu(
    x: Tensor,
    gate_w: Tensor,
    up_w: Tensor,
    down_w: Tensor,
    weights: Tensor,
    ids: Tensor,
    num_experts: int,
    lora: dict,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    expert_scale: float = 1.0,
    recompute_base: bool = False,
    act=None,
) -> Tensor:
    """`reference.routed_lora_ffn` for a gated FFN of plain weights (copy view) on the
    implementation `mixlora` picks: the dense Function, or the lean sorted one (its LoRA
    products on the Triton kernels where `triton_runs_on` says they run; `recompute_base`
    applies to it only). lora: {role: (A (E, r, in), B (E, out, r))}, one rank for all.
    act: the gate's element-wise activation; None or SiLU run the Functions' SiLU code."""
    from upcycle.kernels.experts import is_silu

    act = None if act is None or is_silu(act) else act
    rank = next(iter(lora.values()))[0].shape[1]
    if mixlora(x, num_experts, rank, gate_w.shape[0]) == "dense":
        from upcycle.kernels.mixlora_dense import routed_lora_swiglu_dense

        return routed_lora_swiglu_dense(
            x, gate_w, up_w, down_w, weights, ids, num_experts, lora, scaling,
            dropout_p=dropout_p, expert_scale=expert_scale, act=act,
        )  # fmt: skip
    from upcycle.kernels.fused import routed_lora_swiglu as lean

    return lean(
        x, gate_w, up_w, down_w, weights, ids, num_experts, lora, scaling,
        dropout_p=dropout_p, expert_scale=expert_scale, recompute_base=recompute_base,
        triton=triton_runs_on(x), act=act,
    )  # fmt: skip


def routed_lora_ffn(
    x: Tensor,
    projections: tuple,
    act,
    weights: Tensor,
    ids: Tensor,
    num_experts: int,
    lora: dict,
    scaling: float,
    *,
    slices: list[tuple[int, int]] | None = None,
    expert_scale: float = 1.0,
    dropout_p: float = 0.0,
    recompute_base: bool = False,
) -> Tensor:
    """A MixLoRA FFN, `reference.routed_lora_ffn`, on the implementation the rules pick: the
    fused Functions where `mixlora_fused` says so (`routed_lora_swiglu`), else the reference.

    projections: the base (gate, up, down), weight tensors or modules; act: the FFN's own
    element-wise activation (SiLU, Gemma's tanh GELU, ...); dropout_p: LoRA-input dropout (0 in
    eval mode); `recompute_base` applies to the lean Function only."""
    from upcycle.kernels import reference

    if mixlora_fused(projections, slices):
        return routed_lora_swiglu(
            x, *projections, weights, ids, num_experts, lora, scaling,
            dropout_p=dropout_p, expert_scale=expert_scale, recompute_base=recompute_base,
            act=act,
        )  # fmt: skip
    drop = functools.partial(reference.fast_dropout, p=dropout_p) if dropout_p else None
    return reference.routed_lora_ffn(
        x, *projections, act, weights, ids, num_experts, lora, scaling,
        slices=slices, expert_scale=expert_scale, dropout=drop,
    )  # fmt: skip


def register() -> bool:
    """Add NAME to transformers' experts implementations; False on transformers without the
    interface."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(NAME, experts_forward)
    return True
