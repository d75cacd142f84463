"""`upcycle prune`: check, gather statistics, decide, write (see upcycle.prune)."""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from upcycle.engine.outputs import PROVENANCE
from upcycle.io.checkpoint import Checkpoint
from upcycle.io.writer import check_output_dir, claims_output_dir
from upcycle.prune.plan import (
    Layout,
    PruneOptions,
    Schedule,
    check_tokens,
    new_config,
    plan_schedule,
    read_layout,
)
from upcycle.prune.select import ExpertPlan, keep_neurons, plan_layer, ranges
from upcycle.prune.write import LayerChange, write


def _statistics(model_dir, layout: Layout, schedule: Schedule, opts, ids, progress, log):
    """Load the model, gather what the prune needs and decide: (routing stats, layer ->
    ExpertPlan, layer -> kept neurons). With --experts and --width, the neuron statistics
    come from the model with its experts already pruned (and its new top-k)."""
    from upcycle.prune.experts import install, reduce_experts
    from upcycle.prune.stats import (
        load_model,
        moe_blocks,
        neuron_importance,
        routing_stats,
        trim_heap,
    )

    model = load_model(model_dir)
    blocks = moe_blocks(model, layout.moe_layers)
    routing, plans, keeps = {}, {}, {}
    pruned = [i for i, n in schedule.counts.items() if n < layout.num_experts]
    if pruned:
        log(f"routing statistics on {ids.numel()} tokens ...")
        keep_logits = opts.by != "frequency"
        routing = routing_stats(model, blocks, ids, layout.top_k, keep_logits, progress)
        for i in pruned:
            stats = routing[i]
            plans[i] = plan_layer(
                opts.by, schedule.counts[i], stats.counts, stats.logits, opts.seed, i
            )
            stats.logits = None
    if schedule.width < layout.width:
        for i, block in blocks.items():
            tensors = (block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj)
            if i in plans:
                tensors = reduce_experts(*(t.detach() for t in tensors), plans[i])
            install(block, *(t.detach() for t in tensors), schedule.top_k)
        log(f"neuron statistics on {ids.numel()} tokens ...")
        importance = neuron_importance(model, blocks, ids, progress)
        keeps = {i: keep_neurons(imp, schedule.width) for i, imp in importance.items()}
    del model, blocks
    gc.collect()
    trim_heap()  # the writer starts from the resident memory of the statistics' results
    return routing, plans, keeps


def _plan_record(plan: ExpertPlan, by: str) -> dict:
    if by == "merge":
        return {
            "clusters": [
                {"members": m, "weights": w}
                for m, w in zip(plan.members, plan.weights, strict=True)
            ]
        }
    record = {"kept": plan.kept()}
    if plan.clusters is not None:
        record["clusters"] = plan.clusters
    return record


def prune_record(opts, data, tokens, layout, schedule, routing, plans, keeps) -> dict:
    """The "prune" record of upcycle.json."""
    layers = {}
    for i in layout.moe_layers:
        entry: dict = {"experts": schedule.counts[i]}
        if i in routing:
            share = routing[i].counts / max(routing[i].tokens, 1)
            entry["routed"] = [round(float(x), 6) for x in share]
        if i in plans:
            entry.update(_plan_record(plans[i], opts.by))
        if i in keeps:
            entry["neurons"] = [ranges(row) for row in keeps[i]]
        layers[str(i)] = entry
    return {
        "criterion": opts.by if plans else None,
        "data": data,
        "tokens": tokens,
        "seq_len": opts.seq_len,
        "seed": opts.seed,
        "num_experts": {"from": layout.num_experts, "to": schedule.num_experts},
        "top_k": {"from": layout.top_k, "to": schedule.top_k},
        "expert_width": {"from": layout.width, "to": schedule.width, "fraction": opts.width},
        "layers": layers,
    }


def _provenance(ckpt: Checkpoint, record: dict) -> dict:
    """The source's upcycle.json with this prune appended to its "prune" list."""
    path = os.path.join(ckpt.path, PROVENANCE)
    prov = {}
    if os.path.isfile(path):
        with open(path) as f:
            prov = json.load(f)
    prov["prune"] = [*prov.get("prune", []), record]
    return prov


@claims_output_dir  # OUT is claimed before the work: a concurrent writer stops here
def prune(
    model_dir: str,
    out: str,
    texts: list[str],
    opts: PruneOptions,
    *,
    data: str = "",
    force: bool = False,
    progress: bool = True,
    log=None,
) -> dict:
    """Write a copy of the MoE at `model_dir` into `out` with fewer experts and/or narrower
    experts; returns the prune record written to upcycle.json."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    check_output_dir(out, force)
    ckpt = Checkpoint(model_dir)
    layout = read_layout(ckpt)
    schedule = plan_schedule(layout, opts)
    from upcycle.data import token_blocks
    from upcycle.io.models import load_tokenizer

    ids = token_blocks(
        texts, load_tokenizer(ckpt.path), seq_len=opts.seq_len, max_tokens=opts.max_tokens
    )
    check_tokens(ids.numel(), layout)
    routing, plans, keeps = _statistics(ckpt.path, layout, schedule, opts, ids, progress, log)
    changes = {
        i: LayerChange(plans.get(i), keeps.get(i))
        for i in layout.moe_layers
        if i in plans or i in keeps
    }
    record = prune_record(opts, data, int(ids.numel()), layout, schedule, routing, plans, keeps)
    config = new_config(ckpt.config, layout, schedule)
    write(ckpt, layout, schedule, changes, out, config, _provenance(ckpt, record), force)
    log(f"pruned {len(changes)} MoE layers in {time.perf_counter() - start:.1f} s")
    return record
