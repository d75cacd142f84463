"""`upcycle prune`: check, gather statistics, decide, write (see upcycle.prune)."""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from upcycle.engine.outputs import PROVENANCE
from upcycle.errors import InputError
from upcycle.io.checkpoint import Checkpoint
from upcycle.io.writer import check_output_dir, claims_output_dir
from upcycle.prune.experts import read_experts
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
from upcycle.train.memory import freeing_eagerly


def _statistics(ckpt, layout: Layout, schedule: Schedule, opts, ids, progress, log):
    """Gather what the prune needs and decide, one decoder layer at a time
    (`upcycle.prune.layerwise`): (routing stats, layer -> ExpertPlan, layer -> kept neurons).

    A layer is decided from its own statistics, then pruned in place (experts, new top-k,
    neurons) before its output is computed: every later layer is measured on the hidden states
    of the pruned model, and with --experts and --width the neuron statistics come from the
    layer with its experts already pruned."""
    import torch
    from tqdm.auto import tqdm

    from upcycle.prune.layerwise import LayerRunner
    from upcycle.train.memory import trim_heap

    log(f"statistics on {ids.numel()} tokens, one layer at a time ...")
    runner = LayerRunner(ckpt, layout, ids)
    routing, plans, keeps = {}, {}, {}
    last = max(layout.moe_layers)  # the layers after it change nothing the prune measures
    for i in tqdm(range(last + 1), desc="layers", disable=not progress, file=sys.stderr):
        runner.load(i, lambda j: read_experts(ckpt, layout, j, torch.float32))
        if i in layout.moe_layers:
            _decide(runner, i, layout, schedule, opts, (routing, plans, keeps))
        if i < last:
            runner.run(i, advance=True)
        runner.release(i)
        trim_heap()  # freed layers and activations would otherwise stay resident
    del runner
    gc.collect()
    trim_heap()  # the writer starts from the resident memory of the statistics' results
    return routing, plans, keeps


def _decide(runner, i, layout, schedule, opts, results) -> None:
    """Layer i's expert plan and kept neurons, applied to the loaded layer."""
    from upcycle.prune.experts import install, narrow_experts, reduce_experts
    from upcycle.prune.layerwise import moe_block
    from upcycle.prune.stats import neuron_importance, routing_stats
    from upcycle.train.memory import trim_heap

    routing, plans, keeps = results
    block = moe_block(runner.layers[i], layout, i)

    def forward():
        runner.run(i)
        trim_heap()

    def weights():
        return block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj

    router, gate_up, down = weights()
    if schedule.counts[i] < layout.layer_experts[i]:
        keep_logits = opts.by in ("uncurl", "merge")
        stats = routing_stats(block, forward, layout.top_k, keep_logits)
        plans[i] = plan_layer(opts.by, schedule.counts[i], stats.counts, stats.logits, opts.seed, i)
        stats.logits = None
        routing[i] = stats
        # in place: the layer's full set of experts is never held twice
        router, gate_up, down = reduce_experts(router, gate_up, down, plans[i], in_place=True)
    install(block, router, gate_up, down, schedule.top_k)
    if schedule.width < layout.width:
        keeps[i] = keep_neurons(neuron_importance(block, forward), schedule.width)
        gate_up, down = narrow_experts(*weights()[1:], keeps[i])
        install(block, router, gate_up, down, schedule.top_k)


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
        "layer_experts": {
            "from": [layout.layer_experts[i] for i in layout.moe_layers],
            "to": [schedule.counts[i] for i in layout.moe_layers],
        },
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
    rows = ckpt.config.get("vocab_size")
    if isinstance(rows, int) and int(ids.max()) >= rows:
        raise InputError(
            f"{ckpt.path}: the tokenizer gives token id {int(ids.max())}, past the model's "
            f"{rows} embedding rows"
        )
    with freeing_eagerly():  # what a pass frees goes back to the system at once
        routing, plans, keeps = _statistics(ckpt, layout, schedule, opts, ids, progress, log)
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
