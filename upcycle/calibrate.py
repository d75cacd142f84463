"""Fit the routers of an upcycled MoE to its frozen experts on calibration text.

The oracle for a token is the set of top-k experts with the largest outputs ||expert_e(x)||:
the experts that matter most for the layer's output. For each MoE layer, in order, we take the
router inputs x the model actually produces (upstream layers already calibrated), compute every
expert's output norm, and fit the router by ridge regression to predict the log norms
(as MoEfication's activation router does; closed form, seconds per layer); a layer whose
existing router already picks more of the oracle's experts keeps it. The pass
goes layer by layer over one block of tokens at a time: the hidden states of all calibration
tokens are kept between layers (tokens x hidden floats), each MoE layer's router inputs are
gathered, its router is fitted, and only then does the layer run for real. Memory is the model
plus those hidden states, whatever the number of tokens. The checkpoint is then rewritten with
the new router weights, every other tensor copied byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from upcycle.arch.targets import TARGETS
from upcycle.converters.calibration import fit_linear_router, load_for_calibration
from upcycle.errors import InputError, OptionError
from upcycle.io.arrays import from_torch
from upcycle.io.checkpoint import INDEX, SINGLE, Checkpoint
from upcycle.io.writer import ShardedWriter, atomic_output_dir, check_output_dir


@dataclass
class LayerReport:
    layer: int
    oracle_overlap_before: float  # mean fraction of the oracle's top-k the router picks
    oracle_overlap_after: float


def topk_overlap(logits: np.ndarray, norms: np.ndarray, k: int) -> float:
    """Mean over tokens of |router top-k ∩ oracle top-k| / k."""
    pick = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    best = np.argpartition(-norms, k - 1, axis=1)[:, :k]
    hits = (pick[:, :, None] == best[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / k)


def expert_output_norms(experts, x):
    """(T, E) output norms of every expert of a transformers fused-experts module on x (T, H)."""
    import torch

    out = []
    with torch.no_grad():
        for e in range(experts.gate_up_proj.shape[0]):
            gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
            out.append(y.norm(dim=-1))
    return torch.stack(out, dim=1)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once its input is captured."""


def _input_of(module, run):
    """The first input `module` receives while run() executes; the pass stops right there."""
    seen = []

    def hook(_m, inputs, kw):
        seen.append(inputs[0] if inputs else kw["hidden_states"])
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def _layer_kwargs(model, ids) -> dict[int, tuple[tuple, dict]]:
    """Each decoder layer's extra arguments (masks, rotary embeddings) for blocks shaped like ids."""
    found: dict[int, tuple[tuple, dict]] = {}

    def hook(i):
        def fn(_m, inputs, kw):
            found[i] = (tuple(inputs[1:]), dict(kw))

        return fn

    handles = [
        layer.register_forward_pre_hook(hook(i), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def calibrate(
    model_dir: str,
    out: str,
    texts: list[str],
    *,
    max_tokens: int = 32768,
    seq_len: int = 256,
    ridge: float = 0.1,
    force: bool = False,
    progress: bool = True,
    log=None,
) -> list[LayerReport]:
    """Write a copy of the MoE at `model_dir` into `out` with calibrated routers."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    check_output_dir(out, force)
    ckpt = Checkpoint(model_dir)
    target = TARGETS.get(ckpt.model_type)
    if target is None:
        raise InputError(
            f"{ckpt.path} is not an MoE checkpoint upcycle can calibrate ({ckpt.model_type}); "
            f"supported: {', '.join(TARGETS)}"
        )
    if ridge <= 0:
        raise OptionError("--ridge must be positive")
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from upcycle.data import token_blocks

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(ckpt.path)
    model = load_for_calibration(ckpt.path)
    blocks = token_blocks(texts, tok, seq_len=seq_len, max_tokens=max_tokens)
    moe = [
        (i, layer.mlp)
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "experts")
    ]
    if not moe:
        raise InputError(f"{ckpt.path}: no MoE layer found")
    top_k = model.config.num_experts_per_tok
    reports: list[LayerReport] = []
    routers: dict[int, np.ndarray] = {}
    bar = tqdm(
        total=len(moe), desc="calibrating", unit="layer", disable=not progress, file=sys.stderr
    )

    log(f"fitting {len(moe)} routers on {blocks.numel()} tokens ...")
    with torch.no_grad():
        layers = model.model.layers
        kwargs = _layer_kwargs(model, blocks[:1])
        hidden = [
            _input_of(layers[0], partial(model, input_ids=blocks[b : b + 1], use_cache=False))
            for b in range(blocks.shape[0])
        ]
        for i, layer in enumerate(layers):
            args, kw = kwargs[i]
            if hasattr(layer.mlp, "experts"):
                block = layer.mlp
                x = torch.cat([_input_of(block, partial(layer, h, *args, **kw)) for h in hidden])
                x = x.reshape(-1, x.shape[-1])
                norms = expert_output_norms(block.experts, x).float().numpy()
                xs = x.float().numpy()
                old = block.gate.weight.detach().float().numpy()
                before = topk_overlap(xs @ old.T, norms, top_k)
                w = fit_linear_router(xs, norms, ridge=ridge)
                after = topk_overlap(xs @ w.T, norms, top_k)
                if (
                    after < before
                ):  # the fit ranks worse than the router it would replace: keep that
                    w, after = old.copy(), before
                block.gate.weight.data.copy_(torch.from_numpy(w))
                reports.append(LayerReport(i, before, after))
                routers[i] = w
                bar.update()
            hidden = [_output(layer(h, *args, **kw)) for h in hidden]
    bar.close()
    del model
    _write(ckpt, target, routers, out, force, reports, texts_tokens=int(blocks.numel()))
    log(f"calibrated {len(reports)} routers in {time.perf_counter() - start:.1f} s")
    return reports


def _write(
    ckpt: Checkpoint,
    target,
    routers: dict[int, np.ndarray],
    out: str,
    force: bool,
    reports: list[LayerReport],
    texts_tokens: int,
) -> None:
    prefix = "model.layers.{i}."
    replace = {prefix.format(i=i) + target.router: w for i, w in routers.items()}
    entries = [(name, info.dtype, info.shape) for name, info in ckpt.infos.items()]
    sizes = [
        os.path.getsize(os.path.join(ckpt.path, f))
        for f in os.listdir(ckpt.path)
        if f.endswith(".safetensors")
    ]
    with atomic_output_dir(out, force=force) as tmp:
        writer = ShardedWriter(tmp, entries, max(sizes))
        for name, dtype, _ in entries:
            a = ckpt.get(name)
            if name in replace:
                import torch

                a = from_torch(torch.from_numpy(replace[name]), dtype)
            writer.write(name, a)
        writer.finish()
        for f in os.listdir(ckpt.path):
            src = os.path.join(ckpt.path, f)
            if os.path.isfile(src) and not f.endswith(".safetensors") and f not in (INDEX, SINGLE):
                shutil.copyfile(src, os.path.join(tmp, f))
        prov_path = os.path.join(tmp, "upcycle.json")
        prov = json.load(open(prov_path)) if os.path.isfile(prov_path) else {}
        prov["calibration"] = {
            "tokens": texts_tokens,
            "oracle_overlap_before": float(np.mean([r.oracle_overlap_before for r in reports])),
            "oracle_overlap_after": float(np.mean([r.oracle_overlap_after for r in reports])),
        }
        with open(prov_path, "w") as f:
            json.dump(prov, f, indent=2)
            f.write("\n")
