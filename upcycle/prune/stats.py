"""Routing and neuron statistics of one loaded MoE block on the calibration tokens, by hooks.

Each function hooks one block and calls `forward()`, which passes every calibration batch
through the block's layer (`upcycle.prune.layerwise.LayerRunner.run`). A hook raises `Measured`
once it has recorded a batch: what the layer would compute after it (the experts' products,
for routing statistics; the experts' own pass, for neuron importance) is skipped.

- `routing_stats`: a hook on the block's router records its logits (T, E); we keep how often
  each expert is in a token's top-k and, when clustering needs them, the logits.
- `neuron_importance`: a pre-hook on the block's fused experts receives the block input x and
  the routing (top-k indices) and recomputes, per expert e and neuron i, the down projection's
  input act(gate_i x) * up_i x on the tokens routed to e; importance is its mean absolute value.
  An expert no token chose is scored by weights alone, ||gate_i|| * ||up_i|| * ||down[:, i]||.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from upcycle.prune.layerwise import Measured


@dataclass
class RoutingStats:
    counts: np.ndarray  # (E,) top-k choices per expert
    logits: np.ndarray | None  # (T, E) float32 router logits, when kept
    tokens: int


def _logits(output) -> torch.Tensor:
    logits = output[0] if isinstance(output, (tuple, list)) else output
    return logits.detach().reshape(-1, logits.shape[-1]).float()


def routing_stats(block, forward, top_k: int, keep_logits: bool) -> RoutingStats:
    """RoutingStats of the block's router while `forward()` runs (top-k with `top_k`)."""
    counts = np.zeros(block.gate.weight.shape[0], dtype=np.int64)
    logits: list[np.ndarray] = []
    tokens = 0

    def record(_module, _inputs, output):
        nonlocal counts, tokens
        x = _logits(output)
        chosen = torch.topk(x, top_k, dim=-1).indices.reshape(-1)
        counts += np.bincount(chosen.numpy(), minlength=len(counts))
        tokens += x.shape[0]
        if keep_logits:
            logits.append(x.numpy().copy())
        raise Measured

    handle = block.gate.register_forward_hook(record)
    try:
        forward()
    finally:
        handle.remove()
    return RoutingStats(counts, np.concatenate(logits) if keep_logits else None, tokens)


def _routing_args(args, kwargs):
    x = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return x, index


def neuron_importance(block, forward) -> np.ndarray:
    """(E, I) importance of each expert's neurons while `forward()` runs (module docstring)."""
    num, two_width, _ = block.experts.gate_up_proj.shape
    sums = torch.zeros(num, two_width // 2, dtype=torch.float64)
    counts = np.zeros(num, dtype=np.int64)

    def record(module, args, kwargs):
        x, index = _routing_args(args, kwargs)
        x, index = x.reshape(-1, x.shape[-1]), index.reshape(x.shape[0], -1)
        for e in range(num):
            token = (index == e).any(dim=-1).nonzero().flatten()
            if not len(token):
                continue
            gate, up = (x[token] @ module.gate_up_proj[e].t()).chunk(2, dim=-1)
            h = module.act_fn(gate.float()) * up.float()
            sums[e] += h.abs().sum(dim=0).double()
            counts[e] += len(token)
        raise Measured

    handle = block.experts.register_forward_pre_hook(record, with_kwargs=True)
    try:
        forward()
    finally:
        handle.remove()
    return _importance(sums, counts, block.experts)


def _importance(sums: torch.Tensor, counts: np.ndarray, experts) -> np.ndarray:
    """Mean |activation| per neuron; experts without tokens get their weight-norm score."""
    out = (sums / torch.from_numpy(np.maximum(counts, 1))[:, None].double()).numpy()
    for e in np.flatnonzero(counts == 0):
        gate, up = experts.gate_up_proj[e].detach().float().chunk(2, dim=0)
        down = experts.down_proj[e].detach().float()
        out[e] = (gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)).double().numpy()
    return out
