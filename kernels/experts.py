"""`experts_implementation="upcycle"` for transformers' stock MoE experts (mixtral, qwen2_moe, ...).

Registered with transformers' `ExpertsInterface` when `upcycle.kernels` is imported, so an
exported checkpoint runs with

    import upcycle.kernels
    model = AutoModelForCausalLM.from_pretrained(out, experts_implementation="upcycle")

The (token, slot) pairs are sorted by expert once; each expert's up (or fused gate/up) and
down projections then run as one matrix product on its contiguous segment of tokens: no
per-token weight gather (transformers' `batched_mm`), no padding, no loop over experts that
rescans the routing for every expert (`eager`). Outputs are put back in (token, slot) order
and summed over the slots, which is deterministic. This is the torch reference that runs on
every device; the Triton kernels of DESIGN.md "Kernels" are not built yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from upcycle.kernels.reference import sort_by_expert

NAME = "upcycle"


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool):
    """x @ w^T (+ b) for weights stored (out, in), or x @ w for (in, out) when transposed."""
    y = x @ w if transposed else F.linear(x, w)
    return y if b is None else y + b


def sorted_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts forward of a `@use_experts_implementation` module: (T, H) -> (T, H)."""
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts = self.num_experts
    # expert-parallel sentinels (ids >= num_experts) sort last and are never computed
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


def register() -> bool:
    """Add "upcycle" to transformers' experts implementations; False on transformers without
    the interface."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(NAME, sorted_experts_forward)
    return True
