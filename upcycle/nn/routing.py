"""Routing of tokens to experts and the router losses, in plain torch (CPU and CUDA).

`top_k_routing` is Mixtral's rule (softmax in fp32, top-k, renormalized weights), the one
MixLoRA's routers use (`upcycle.adapters.layers`); `balance_loss` and `z_loss` are the
auxiliary losses those routers and trained stock routers add. What the experts then compute
for the routed tokens is `upcycle.kernels`' business.

Shapes: logits and probs (T, E); weights and ids (T, K).
"""

from __future__ import annotations

import torch


def top_k_routing(logits: torch.Tensor, top_k: int):
    """Mixtral routing: softmax over experts (fp32), top-k, renormalized. (weights, ids, probs)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids, probs


def balance_loss(probs: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/Mixtral load-balance loss E * sum_e f_e * P_e (1.0 when perfectly balanced).

    f_e: fraction of routed slots that went to expert e; P_e: mean router probability of e.
    """
    # a histogram over fixed bins: bincount sizes its output from the data (a host sync on CUDA)
    flat = ids.reshape(-1)
    flat = flat.int() if flat.is_cuda else flat.to(probs.dtype)
    counts = torch.histc(flat, bins=num_experts, min=0, max=num_experts - 1).to(probs.dtype)
    f = counts / ids.numel()
    return num_experts * torch.sum(f * probs.mean(dim=0))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-sum-exp of the router logits."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
