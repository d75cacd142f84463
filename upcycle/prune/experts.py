"""One MoE layer's routers and experts, reduced: the tensor operations of a prune (torch).

Experts travel fused as transformers 5 holds them in memory: gate_up (E, 2I, H) with the gate
rows first, down (E, H, I), router (E, H). The same functions reduce the model in memory (for
statistics gathered after the experts are pruned) and the checkpoint's tensors on their way to
the output, so both agree by construction.
"""

from __future__ import annotations

import numpy as np
import torch

from upcycle.prune.select import ExpertPlan


def read_experts(ckpt, layout, i: int, dtype: torch.dtype | None = None):
    """MoE layer i's (router (E, H), gate_up (E, 2I, H), down (E, H, I)), fused whichever way
    the checkpoint holds its experts (`layout.fused` or one tensor each), as stored or cast to
    `dtype`. One tensor per expert is cast as it is read, straight into the fused tensors, so
    only one expert's tensor is ever held twice."""
    router = ckpt.get_torch(layout.router(i), dtype)
    if layout.fused:
        gate_up_name, down_name = layout.fused_names(i)
        return router, ckpt.get_torch(gate_up_name, dtype), ckpt.get_torch(down_name, dtype)
    num, width, hidden = layout.layer_experts[i], layout.width, layout.hidden
    dtype = dtype or router.dtype  # the writer casts each output tensor to its stored dtype
    gate_up = torch.empty((num, 2 * width, hidden), dtype=dtype)
    down = torch.empty((num, hidden, width), dtype=dtype)
    for e in range(num):
        gate_up[e, :width] = ckpt.get_torch(layout.expert(i, e, "gate"))
        gate_up[e, width:] = ckpt.get_torch(layout.expert(i, e, "up"))
        down[e] = ckpt.get_torch(layout.expert(i, e, "down"))
    return router, gate_up, down


def combine(t: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """Rows of `t` (E, ...) per output expert: a row picked as it is, or the weighted average
    of the members' rows (computed in float32, returned in t's dtype), written into one
    output tensor as they are made."""
    if plan.is_selection:
        return t.index_select(0, torch.tensor(plan.kept()))
    out = torch.empty((plan.num_experts, *t.shape[1:]), dtype=t.dtype)
    for j, (members, weights) in enumerate(zip(plan.members, plan.weights, strict=True)):
        acc = torch.zeros(t.shape[1:], dtype=torch.float32)
        for e, w in zip(members, weights, strict=True):
            acc += w * t[e].float()
        out[j] = acc
    return out


def combine_in_place(t: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """`combine(t, plan)` built in t's own memory, returned as the view t[:N] (t's rows past
    N are left as garbage): no second copy of the experts exists at any time.

    Output expert j is first made in the row of one of its members (j itself when it is
    one), which no other output expert reads, since each expert belongs to one output at
    most; then every row moves to its place. The arithmetic is `combine`'s, so both give the
    same bits."""
    rows = [m for members in plan.members for m in members]
    if len(set(rows)) < len(rows):  # an expert in two outputs: not expressible in place
        return combine(t, plan)
    sources = []
    for j, (members, weights) in enumerate(zip(plan.members, plan.weights, strict=True)):
        row = j if j in members else members[0]
        if len(members) > 1:
            acc = torch.zeros(t.shape[1:], dtype=torch.float32)
            for e, w in zip(members, weights, strict=True):
                acc += w * t[e].float()
            t[row] = acc
        sources.append(row)
    _gather_rows(t, sources)
    return t[: len(sources)]


def _gather_rows(t: torch.Tensor, sources: list[int]) -> None:
    """t[j] = t[sources[j]] for every j at once (sources distinct), in place: each row has
    at most one source and one destination, so the moves form chains, done from the row
    whose content nobody needs, and cycles, which hold one row aside."""
    incoming = {j: s for j, s in enumerate(sources) if s != j}
    moved = set(incoming.values())
    for end in [d for d in incoming if d not in moved]:
        d = end
        while d in incoming:
            s = incoming.pop(d)
            t[d] = t[s]
            d = s
    while incoming:  # cycles
        first = d = next(iter(incoming))
        held = t[first].clone()
        while True:
            s = incoming.pop(d)
            if s == first:
                t[d] = held
                break
            t[d] = t[s]
            d = s


def reduce_experts(router, gate_up, down, plan: ExpertPlan, in_place: bool = False):
    """(router, gate_up, down) of the plan's experts: router rows are combined as the experts.
    With `in_place`, the experts' tensors are reduced in their own memory (`combine_in_place`)."""
    experts = combine_in_place if in_place else combine
    return combine(router, plan), experts(gate_up, plan), experts(down, plan)


def narrow_experts(gate_up: torch.Tensor, down: torch.Tensor, keep: np.ndarray):
    """Each expert e keeps its neurons keep[e] (N, I'): gate and up rows, down columns."""
    keep = torch.from_numpy(np.asarray(keep, dtype=np.int64))
    num, width, new_width = down.shape[0], down.shape[2], keep.shape[1]
    gu = torch.empty((num, 2 * new_width, gate_up.shape[2]), dtype=gate_up.dtype)
    dn = torch.empty((num, down.shape[1], new_width), dtype=down.dtype)
    for e, idx in enumerate(keep):
        torch.index_select(gate_up[e], 0, torch.cat([idx, idx + width]), out=gu[e])
        torch.index_select(down[e], 1, idx, out=dn[e])
    return gu, dn


def split_gate_up(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, 2I, H) -> gate (E, I, H), up (E, I, H)."""
    width = gate_up.shape[1] // 2
    return gate_up[:, :width], gate_up[:, width:]


def install(block: torch.nn.Module, router, gate_up, down, top_k: int) -> None:
    """Put reduced experts into a loaded MoE block (router `gate`, fused `experts`), so that
    it runs as the pruned model will: the router's rows, the experts' tensors, and every
    `num_experts` / `top_k` attribute the block's modules read while routing."""
    n = router.shape[0]
    gate, experts = block.gate, block.experts
    gate.weight = torch.nn.Parameter(router, requires_grad=False)
    if isinstance(gate, torch.nn.Linear):
        gate.out_features = n
    experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
    for module in (block, gate, experts):
        if isinstance(getattr(module, "num_experts", None), int):
            module.num_experts = n
        if isinstance(getattr(module, "top_k", None), int):
            module.top_k = top_k
