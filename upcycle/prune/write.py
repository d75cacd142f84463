"""The pruned checkpoint, streamed tensor by tensor through `write_model`.

Every tensor outside the pruned layers' routers and routed experts is copied as stored (the
shared expert and its gate included). A pruned layer's router and expert tensors are read
together (one layer's experts in memory), reduced (`upcycle.prune.experts`) and written under
the names of the source's first N experts, in the source's tensor order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from upcycle.engine.outputs import Contents, write_model
from upcycle.io.arrays import from_torch
from upcycle.io.checkpoint import Checkpoint
from upcycle.prune.experts import narrow_experts, read_experts, reduce_experts, split_gate_up
from upcycle.prune.plan import Layout, Schedule
from upcycle.prune.select import ExpertPlan


@dataclass
class LayerChange:
    """What happens to one MoE layer: its experts (None: all stay) and neurons (None: all)."""

    plan: ExpertPlan | None
    keep: np.ndarray | None  # (N, I') neuron indices per output expert


def _role_of(layout: Layout) -> dict[str, tuple[int, str, int]]:
    """Every router/expert tensor name of the MoE layers -> (layer, role, expert)."""
    roles = {}
    for i in layout.moe_layers:
        roles[layout.router(i)] = (i, "router", -1)
        if layout.fused:
            gate_up, down = layout.fused_names(i)
            roles[gate_up], roles[down] = (i, "gate_up", -1), (i, "down", -1)
        else:
            for e in range(layout.layer_experts[i]):
                for role in ("gate", "up", "down"):
                    roles[layout.expert(i, e, role)] = (i, role, e)
    return roles


def _shape(role: str, n: int, width: int, hidden: int) -> tuple[int, ...]:
    return {
        "router": (n, hidden),
        "gate_up": (n, 2 * width, hidden),
        "down": (n, hidden, width),
        "gate": (width, hidden),
        "up": (width, hidden),
        "expert_down": (hidden, width),
    }[role]


def output_entries(ckpt: Checkpoint, layout: Layout, schedule: Schedule, changes: dict):
    """(name, dtype, shape) of every output tensor, in the source's order."""
    roles = _role_of(layout)
    entries = []
    for name, info in ckpt.infos.items():
        if name not in roles or roles[name][0] not in changes:
            entries.append((name, info.dtype, tuple(info.shape)))
            continue
        i, role, e = roles[name]
        n = schedule.counts[i]
        if e >= n:
            continue  # a dropped expert's slot
        if e >= 0 and role == "down":
            role = "expert_down"
        entries.append((name, info.dtype, _shape(role, n, schedule.width, layout.hidden)))
    return entries


def layer_tensors(ckpt: Checkpoint, layout: Layout, i: int, change: LayerChange) -> dict:
    """Layer i's new router and expert tensors, by output name, in their stored dtypes."""
    router_name = layout.router(i)
    router, gate_up, down = read_experts(ckpt, layout, i)
    if change.plan is not None:
        router, gate_up, down = reduce_experts(router, gate_up, down, change.plan)
    if change.keep is not None:
        gate_up, down = narrow_experts(gate_up, down, change.keep)

    def stored(t, name):
        return from_torch(t, ckpt.infos[name].dtype)

    out = {router_name: stored(router, router_name)}
    if layout.fused:
        gate_up_name, down_name = layout.fused_names(i)
        out[gate_up_name] = stored(gate_up, gate_up_name)
        out[down_name] = stored(down, down_name)
        return out
    gate, up = split_gate_up(gate_up)
    for e in range(router.shape[0]):
        for role, t in (("gate", gate[e]), ("up", up[e]), ("down", down[e])):
            name = layout.expert(i, e, role)
            out[name] = stored(t, name)
    return out


def stream(ckpt: Checkpoint, layout: Layout, entries, changes: dict):
    """Yield the output tensors in `entries`' order, one {name: array} at a time; a changed
    layer's tensors are computed when its first one is due and dropped after its last."""
    roles = _role_of(layout)
    last = {}
    for name, _, _ in entries:
        if name in roles and roles[name][0] in changes:
            last[roles[name][0]] = name
    current: dict[int, dict] = {}
    for name, _, _ in entries:
        i = roles[name][0] if name in roles else None
        if i is None or i not in changes:
            yield {name: ckpt.get(name)}
            continue
        if i not in current:
            current = {i: layer_tensors(ckpt, layout, i, changes[i])}
        yield {name: current[i].pop(name)}
        if name == last[i]:
            current = {}


def write(ckpt, layout, schedule, changes, out, config, provenance, force) -> int:
    """Write the pruned model folder `out` (every non-weight file of the source comes along);
    returns its size in bytes."""
    entries = output_entries(ckpt, layout, schedule, changes)
    sizes = [
        os.path.getsize(os.path.join(ckpt.path, f))
        for f in os.listdir(ckpt.path)
        if f.endswith(".safetensors")
    ]
    from upcycle.modeling import code_files

    # upcycle's own architectures get the installed modeling code (a per-layer expert count
    # needs it), in place of the copy the source carries
    code = code_files(layout.model_type) if layout.target.remote_code else ()
    contents = Contents(
        config=config,
        files_from=ckpt.path,
        file_names=None,
        code_files=code,
        provenance=provenance,
    )
    return write_model(
        out,
        entries,
        stream(ckpt, layout, entries, changes),
        contents,
        max_shard_bytes=max(sizes),
        force=force,
    )
