"""Routing statistics of MoE models, recorded by forward hooks on the routers.

Stock transformers MoE blocks (mixtral, qwen2_moe, qwen3_moe in transformers 5) are modules with
a ``gate`` (the router) and ``experts``; the router returns ``(logits, scores, indices)``:
logits (T, E) before the softmax, and the (T, k) indices of the chosen experts. Routers that
return only logits (transformers 4.x: ``gate`` is an ``nn.Linear``) get their top-k recomputed
from the softmax, as those models do.

Per MoE layer, over all tokens seen:

- ``fraction[e]``: share of tokens that chose expert e among their top-k (sums to k);
- ``load[e]``: share of all k * T assignments that went to e (``fraction / k``, sums to 1);
- ``router_entropy``: mean over tokens of the entropy of the softmax router distribution (nats;
  log E when the router is uniform, 0 when it is certain);
- ``load_entropy``: entropy of ``load`` (log E when perfectly balanced);
- ``max_load_ratio``: the busiest expert's load over the balanced load 1 / E.

Read-ME models (upcycle_readme) route every layer from one pre-gating router over token ids
(``model.router``, with an output ``head``); its logits are recorded once and counted for
every MoE layer, so the per-layer statistics are identical.

``shared_expert`` says whether the blocks also run an always-on shared expert (qwen2_moe with a
non-zero ``shared_expert_intermediate_size``); it is not counted among the E routed experts.
"""

from __future__ import annotations

import math
import re

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def find_moe_blocks(model: torch.nn.Module) -> list[tuple[int, str, torch.nn.Module]]:
    """(layer index, module name, MoE block) for every sparse MoE block, by layer."""
    blocks = []
    for name, module in model.named_modules():
        gate = getattr(module, "gate", None)
        if isinstance(gate, torch.nn.Module) and hasattr(module, "experts"):
            m = _LAYER.search(name + ".")
            blocks.append((int(m.group(1)) if m else len(blocks), name, module))
    return sorted(blocks, key=lambda b: b[0])


def find_pre_gate(model: torch.nn.Module) -> tuple[torch.nn.Module | None, list]:
    """(pre-gating router, [(layer, name, MoE block)]) of a Read-ME model, else (None, [])."""
    gate = None
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "router" and isinstance(
            getattr(module, "head", None), torch.nn.Linear
        ):
            gate = module
            break
    if gate is None:
        return None, []
    blocks = []
    for name, module in model.named_modules():
        m = _LAYER.search(name + ".")
        if m and name.endswith(".mlp") and hasattr(module, "experts") and "router" not in name:
            blocks.append((int(m.group(1)), name, module))
    return gate, sorted(blocks, key=lambda b: b[0])


def _num_experts(block: torch.nn.Module) -> int:
    """Routed experts of a block: the router's (or block's) num_experts, else its weight rows."""
    for obj in (block.gate, block, getattr(block, "experts", None)):
        n = getattr(obj, "num_experts", None)
        if isinstance(n, int):
            return n
    weight = getattr(block.gate, "weight", None)
    return int(weight.shape[0])


def _has_shared_expert(block: torch.nn.Module) -> bool:
    """qwen2_moe blocks always hold a shared expert; a zero-width one (as written by copy
    upcycling of a model without one) does not count."""
    shared = getattr(block, "shared_expert", None)
    return isinstance(shared, torch.nn.Module) and any(p.numel() for p in shared.parameters())


class _LayerStats:
    def __init__(self, layer: int, num_experts: int, top_k: int):
        self.layer, self.num_experts, self.top_k = layer, num_experts, top_k
        self.counts = torch.zeros(num_experts, dtype=torch.float64)  # (E,) top-k choices
        self.entropy_sum = 0.0
        self.tokens = 0

    def update(self, logits: torch.Tensor, indices: torch.Tensor | None) -> None:
        """logits: (T, E) router logits; indices: (T, k) chosen experts, or None to recompute."""
        logits = logits.detach().reshape(-1, logits.shape[-1]).float()
        logp = torch.log_softmax(logits, dim=-1)  # (T, E)
        entropy = -(logp.exp() * logp).sum(dim=-1)  # (T,)
        if indices is None:
            indices = torch.topk(logp, self.top_k, dim=-1).indices  # (T, k)
        indices = indices.detach().reshape(-1).cpu()
        self.counts += torch.bincount(indices, minlength=self.num_experts).double()
        self.entropy_sum += float(entropy.sum())
        self.tokens += logits.shape[0]

    def result(self) -> dict:
        t = max(self.tokens, 1)
        fraction = self.counts / t
        total = float(self.counts.sum())
        load = self.counts / total if total else torch.zeros_like(self.counts)
        nz = load[load > 0]
        return {
            "layer": self.layer,
            "tokens": self.tokens,
            "fraction": [round(float(x), 6) for x in fraction],
            "load": [round(float(x), 6) for x in load],
            "router_entropy": round(self.entropy_sum / t, 6),
            "load_entropy": round(float(-(nz * nz.log()).sum()), 6),
            "max_load_ratio": round(float(load.max()) * self.num_experts, 6),
        }


class RoutingRecorder:
    """Context manager: hooks every router of `model` and accumulates routing statistics.

    ``with RoutingRecorder(model) as rec: model(ids)`` then ``rec.stats()``. On a dense model
    it records nothing and ``rec.is_moe`` is False.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        config = getattr(model, "config", None)
        self.blocks = find_moe_blocks(model)
        self.pre_gate = None
        if not self.blocks:
            self.pre_gate, self.blocks = find_pre_gate(model)
        self.top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
        self.layers: list[_LayerStats] = []
        for layer, _, block in self.blocks:
            if self.pre_gate is not None:
                self.layers.append(
                    _LayerStats(layer, self.pre_gate.head.out_features, self.top_k or 1)
                )
                continue
            k = self.top_k or int(getattr(block.gate, "top_k", 0) or getattr(block, "top_k", 1))
            self.layers.append(_LayerStats(layer, _num_experts(block), k))
        if self.layers and not self.top_k:
            self.top_k = self.layers[0].top_k
        self.shared_expert = any(_has_shared_expert(block) for _, _, block in self.blocks)
        self.num_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        self._handles = []

    @property
    def is_moe(self) -> bool:
        return bool(self.blocks)

    def __enter__(self) -> RoutingRecorder:
        if self.pre_gate is not None:  # one choice for every layer

            def every_layer(_module, _inputs, logits):
                for stats in self.layers:
                    stats.update(logits, None)

            self._handles.append(self.pre_gate.register_forward_hook(every_layer))
            return self
        for (_, _, block), stats in zip(self.blocks, self.layers, strict=True):
            self._handles.append(block.gate.register_forward_hook(self._hook(stats)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def _hook(stats: _LayerStats):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                logits = output[0]
                indices = output[2] if len(output) >= 3 else None
            else:
                logits, indices = output, None
            stats.update(logits, indices)

        return hook

    def stats(self) -> dict | None:
        """JSON-able statistics (see the module docstring), or None for a dense model."""
        if not self.is_moe:
            return None
        layers = [s.result() for s in self.layers]
        num_experts = self.layers[0].num_experts
        return {
            "num_experts": num_experts,
            "top_k": self.top_k,
            "shared_expert": self.shared_expert,
            "moe_layers": [s["layer"] for s in layers],
            "num_layers": self.num_layers,
            "max_entropy": round(math.log(num_experts), 6),
            "mean_router_entropy": round(sum(s["router_entropy"] for s in layers) / len(layers), 6),
            "mean_load_entropy": round(sum(s["load_entropy"] for s in layers) / len(layers), 6),
            "layers": layers,
        }
