"""Routing and neuron statistics of a loaded MoE on calibration tokens, by forward hooks.

- `routing_stats`: a hook on each MoE block's router records its logits (T, E); per layer we
  keep how often each expert is in a token's top-k and, when clustering needs them, the logits.
- `neuron_importance`: a pre-hook on each block's fused experts receives the block input x and
  the routing (top-k indices) and recomputes, per expert e and neuron i, the down projection's
  input act(gate_i x) * up_i x on the tokens routed to e; importance is its mean absolute value.
  An expert no token chose is scored by weights alone, ||gate_i|| * ||up_i|| * ||down[:, i]||.

Each pass ends at the last MoE block (a hook stops the forward there): later layers and the LM
head are never run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from upcycle.errors import InputError
from upcycle.evaluate.routing import find_moe_blocks

BATCH_ROWS = 4  # calibration blocks per forward pass


def load_model(path: str):
    """The model for statistics: fp32 while its fp32 weights fit FP32_LIMIT_BYTES (as
    calibration loads it), else the checkpoint's dtype. A bf16 checkpoint is loaded as stored
    and cast afterwards, then the heap is trimmed: transformers' direct fp32 load of the default
    model's 8-expert copy peaks at 6.9 GB resident, this at 4.7 GB (the same fp32 weights)."""
    from upcycle.io.checkpoint import Checkpoint
    from upcycle.io.models import load_causal_lm
    from upcycle.methods.calibration import FP32_LIMIT_BYTES

    model = load_causal_lm(path, dtype="auto").eval()
    if Checkpoint(path).num_params() * 4 <= FP32_LIMIT_BYTES:
        model.float()
    trim_heap()
    return model


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc; elsewhere nothing happens)."""
    from upcycle.train.memory import HeapTrimmer

    trimmer = HeapTrimmer()
    if trimmer.available:
        trimmer.libc.malloc_trim(0)


class _Stop(Exception):
    """Raised after the last MoE block: nothing past it is needed."""


@dataclass
class RoutingStats:
    counts: np.ndarray  # (E,) top-k choices per expert
    logits: np.ndarray | None  # (T, E) float32 router logits, when kept
    tokens: int


def moe_blocks(model, layers) -> dict[int, torch.nn.Module]:
    """Layer -> MoE block of a loaded model; InputError when they are not the checkpoint's."""
    blocks = {i: block for i, _, block in find_moe_blocks(model)}
    if sorted(blocks) != sorted(layers):
        raise InputError(
            f"the loaded model has MoE blocks in layers {sorted(blocks)}, "
            f"the checkpoint routers in {sorted(layers)}"
        )
    for i, block in blocks.items():
        if not hasattr(block.experts, "gate_up_proj"):
            raise InputError(f"layer {i}: the loaded experts are not fused; cannot prune them")
    return blocks


def run(model, blocks: dict, ids: torch.Tensor, desc: str, progress: bool) -> None:
    """Run the calibration blocks `ids` (B, S) through the model up to its last MoE block."""
    from tqdm.auto import tqdm

    from upcycle.train.memory import HeapTrimmer

    def stop(*_):
        raise _Stop

    handle = blocks[max(blocks)].register_forward_hook(stop)
    trimmer = HeapTrimmer()  # the heap grows by freed activations otherwise (see its module)
    trimmer.attach(model)
    starts = range(0, ids.shape[0], BATCH_ROWS)
    try:
        with torch.no_grad():
            for s in tqdm(starts, desc=desc, disable=not progress, file=sys.stderr):
                try:
                    model(input_ids=ids[s : s + BATCH_ROWS], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
        trimmer.detach()


def _logits(output) -> torch.Tensor:
    logits = output[0] if isinstance(output, (tuple, list)) else output
    return logits.detach().reshape(-1, logits.shape[-1]).float()


def routing_stats(model, blocks, ids, top_k: int, keep_logits: bool, progress=False) -> dict:
    """Layer -> RoutingStats of the model's routers on `ids`."""
    counts = {i: np.zeros(b.gate.weight.shape[0], dtype=np.int64) for i, b in blocks.items()}
    logits: dict[int, list] = {i: [] for i in blocks}
    tokens = dict.fromkeys(blocks, 0)

    def hook(i):
        def record(_module, _inputs, output):
            x = _logits(output)
            chosen = torch.topk(x, top_k, dim=-1).indices.reshape(-1)
            counts[i] += np.bincount(chosen.numpy(), minlength=len(counts[i]))
            tokens[i] += x.shape[0]
            if keep_logits:
                logits[i].append(x.numpy().copy())

        return record

    handles = [b.gate.register_forward_hook(hook(i)) for i, b in blocks.items()]
    try:
        run(model, blocks, ids, "routing statistics", progress)
    finally:
        for h in handles:
            h.remove()
    return {
        i: RoutingStats(counts[i], np.concatenate(logits[i]) if keep_logits else None, tokens[i])
        for i in blocks
    }


def _routing_args(args, kwargs):
    x = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return x, index


def neuron_importance(model, blocks, ids, progress=False) -> dict[int, np.ndarray]:
    """Layer -> (E, I) importance of each expert's neurons (see the module docstring)."""
    sums, counts = {}, {}
    for i, b in blocks.items():
        num, two_width, _ = b.experts.gate_up_proj.shape
        sums[i] = torch.zeros(num, two_width // 2, dtype=torch.float64)
        counts[i] = np.zeros(num, dtype=np.int64)

    def hook(i):
        def record(module, args, kwargs):
            x, index = _routing_args(args, kwargs)
            x, index = x.reshape(-1, x.shape[-1]), index.reshape(x.shape[0], -1)
            for e in range(sums[i].shape[0]):
                token = (index == e).any(dim=-1).nonzero().flatten()
                if not len(token):
                    continue
                gate, up = (x[token] @ module.gate_up_proj[e].t()).chunk(2, dim=-1)
                h = module.act_fn(gate.float()) * up.float()
                sums[i][e] += h.abs().sum(dim=0).double()
                counts[i][e] += len(token)

        return record

    handles = [
        b.experts.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in blocks.items()
    ]
    try:
        run(model, blocks, ids, "neuron statistics", progress)
    finally:
        for h in handles:
            h.remove()
    return {i: _importance(sums[i], counts[i], blocks[i].experts) for i in blocks}


def _importance(sums: torch.Tensor, counts: np.ndarray, experts) -> np.ndarray:
    """Mean |activation| per neuron; experts without tokens get their weight-norm score."""
    out = (sums / torch.from_numpy(np.maximum(counts, 1))[:, None].double()).numpy()
    for e in np.flatnonzero(counts == 0):
        gate, up = experts.gate_up_proj[e].detach().float().chunk(2, dim=0)
        down = experts.down_proj[e].detach().float()
        out[e] = (gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)).double().numpy()
    return out
