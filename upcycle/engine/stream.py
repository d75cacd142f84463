"""Run a conversion plan: stream one decoder layer at a time into the output folder.

    plan (upcycle.engine.plan) --method.calibrate (data, dense model runs)--> replan if the
    layout changed --one layer--> method.layer(ffn) --> write_model (upcycle.engine.outputs):
    shards in a temporary sibling folder, then config, tokenizer files, provenance, model
    card, and one rename to OUT

Peak memory is one layer's tensors: the reader reads tensors on demand, and the writer's shard
headers are computed from the plan so tensors go to disk as soon as they exist.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from upcycle.arch.spec import FFNSpec
from upcycle.engine.card import conversion_contents
from upcycle.engine.outputs import human_bytes, human_count, write_model
from upcycle.engine.plan import Plan, plan_conversion, replan
from upcycle.io.arrays import STORAGE, cast, to_float32
from upcycle.io.checkpoint import Checkpoint
from upcycle.io.writer import check_output_dir, claims_output_dir
from upcycle.methods.base import Method, MoELayer
from upcycle.methods.options import ConvertOptions


def read_ffn(ckpt: Checkpoint, ffn: FFNSpec, prefix: str, dtype: str) -> dict[str, np.ndarray]:
    """One layer's dense FFN by role (gate, up, down); a fused gate_up tensor (phi3: gate rows
    first, then up) is split."""
    if ffn.kind == "fused_glu":
        gate_up = ckpt.get(prefix + ffn.up, dtype)
        half = gate_up.shape[0] // 2
        return {
            "gate": gate_up[:half],
            "up": gate_up[half:],
            "down": ckpt.get(prefix + ffn.down, dtype),
        }
    return {
        role: ckpt.get(prefix + rel, dtype)
        for role, rel in (("gate", ffn.gate), ("up", ffn.up), ("down", ffn.down))
    }


def layer_outputs(plan: Plan, ckpt: Checkpoint, i: int) -> dict[str, np.ndarray]:
    fam, tgt, dtype = plan.family, plan.target, plan.dtype
    prefix = fam.layer_prefix.format(i=i)
    roles = {"gate": fam.ffn.gate, "up": fam.ffn.up, "down": fam.ffn.down}
    out: dict[str, np.ndarray] = {}
    for name in plan.layer_tensors[i]:
        if name[len(prefix) :] not in roles.values():
            out[name] = ckpt.get(name, dtype)
    for rel in plan.zero_fill:
        out[prefix + rel] = np.zeros(
            ckpt.shape(prefix + rel.replace(".bias", ".weight"))[:1], dtype=STORAGE[dtype]
        )
    if i not in plan.moe_layers and tgt.keeps_source:  # the source's FFN, as it is
        out.update({prefix + r: ckpt.get(prefix + r, dtype) for r in roles.values() if r})
        return plan.method.finish_layer(i, prefix, out, dtype)
    ffn = read_ffn(ckpt, fam.ffn, prefix, dtype)
    if i not in plan.moe_layers:
        for role, t in ffn.items():
            out[prefix + tgt.dense_mlp.format(p=tgt.proj[role])] = t
        return plan.method.finish_layer(i, prefix, out, dtype)
    layer: MoELayer = plan.method.layer(i, ffn, dtype)
    if tgt.router:
        out[prefix + tgt.router] = cast(layer.router, "F32", dtype)
    if tgt.fused:
        gate_up, down = tgt.fused
        out[prefix + gate_up] = np.stack(
            [np.concatenate([x["gate"], x["up"]]) for x in layer.experts]
        )
        out[prefix + down] = np.stack([x["down"] for x in layer.experts])
    else:
        for e, expert in enumerate(layer.experts):
            for role, t in expert.items():
                out[prefix + tgt.expert_name(e, role)] = t
    if tgt.shared and (layer.shared or not tgt.shared_optional):
        hidden = ffn["down"].shape[0]
        empty = np.zeros((0, hidden), STORAGE[dtype])
        shared = layer.shared or {"gate": empty, "up": empty, "down": empty.T}
        if layer.shared and tgt.shared_gate_at_zero != 1.0:  # undo the gate's value at zero weights
            down = to_float32(shared["down"], dtype) / np.float32(tgt.shared_gate_at_zero)
            shared = {**shared, "down": cast(down, "F32", dtype)}
        for role, t in shared.items():
            out[prefix + tgt.shared.format(p=tgt.proj[role])] = t
        if tgt.shared_gate:
            out[prefix + tgt.shared_gate] = np.zeros((1, hidden), STORAGE[dtype])
    return plan.method.finish_layer(i, prefix, out, dtype)


@dataclass
class Summary:
    out: str
    architecture: str
    total_params: int
    active_params: int
    bytes_on_disk: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"wrote {self.out}\n"
            f"  {self.architecture}: {human_count(self.total_params)} params, "
            f"{human_count(self.active_params)} active per token\n"
            f"  {human_bytes(self.bytes_on_disk)} on disk, {self.seconds:.1f} s"
        )


def tensors(plan: Plan, progress: bool) -> Iterator[dict[str, np.ndarray]]:
    """The output tensors in plan.entries' order: embeddings, each layer, the tail, the
    method's extra tensors."""
    from tqdm.auto import tqdm

    reader, family, dtype = plan.reader, plan.family, plan.dtype
    yield {family.embed: reader.get(family.embed, dtype)}
    layers = tqdm(
        range(plan.num_layers),
        desc="converting",
        unit="layer",
        disable=not progress,
        file=sys.stderr,
    )
    for i in layers:
        yield layer_outputs(plan, reader, i)
    tail = {family.final_norm: reader.get(family.final_norm, dtype)}
    if any(name == family.lm_head for name, _, _ in plan.entries):  # untied embeddings
        tail[family.lm_head] = reader.get(family.lm_head, dtype)
    yield tail
    yield plan.method.extra_tensors(plan, reader)


@claims_output_dir  # OUT is claimed before the work: a concurrent writer stops here
def convert(
    source: str,
    out: str,
    opts: ConvertOptions,
    *,
    force: bool = False,
    progress: bool = True,
    fsync: bool = False,
    log=None,
    method: Method | None = None,
    ckpt: Checkpoint | None = None,
) -> Summary:
    """Convert the dense checkpoint at `source` into an MoE checkpoint at `out`.

    `fsync` flushes every file to disk before the final rename; without it the result is still
    atomic against errors, Ctrl-C and full disks, but not against a power cut.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    check_output_dir(out, force)
    plan = plan_conversion(source, opts, method=method, ckpt=ckpt)
    plan.method.calibrate(plan.reader, plan.moe_layers, log)
    plan = replan(plan)
    size = write_model(
        out,
        plan.entries,
        tensors(plan, progress),
        lambda: conversion_contents(plan),
        max_shard_bytes=plan.max_shard_bytes,
        force=force,
        fsync=fsync,
    )
    return Summary(
        os.path.abspath(out),
        plan.target.architecture,
        plan.total_params,
        plan.active_params,
        size,
        time.perf_counter() - start,
    )
