"""Fit the routers of an upcycled MoE to its frozen experts on calibration text.

A router can only pick experts; what it should pick for a token is an *oracle* choice computed
from the experts' actual outputs. Two oracles (`objective`):

- "error" (default): the k experts whose outputs, added with the uniform weights 1/k the
  granular scaling assumes, come closest to the output of all experts together (for a granular
  model, the routed part of the dense FFN). Chosen greedily per token (matching pursuit on the
  per-token Gram matrix of expert outputs, E x E, so it costs little beyond the expert outputs).
  Parts whose outputs partly cancel are not all worth taking, which the norm oracle ignores.
- "norm": the k experts with the largest output norms ||expert_e(x)|| (MoEfication).

The router is fitted by ridge regression (closed form, seconds per layer): to the oracle's
k-hot choice for "error", to the log norms for "norm". A layer whose existing router already
picks more of the oracle's experts keeps it.

For each MoE layer, in order, we take the router inputs x the model actually produces (upstream
layers already calibrated): the hidden states of all calibration tokens are kept between layers
(tokens x hidden floats), each MoE layer's router inputs are gathered, its router is fitted, and
only then does the layer run for real. Memory is the model plus those hidden states, whatever
the number of tokens. The checkpoint is then rewritten with the new router weights, every other
tensor copied byte for byte.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from upcycle.arch import record
from upcycle.arch.targets import TARGETS
from upcycle.engine.outputs import PROVENANCE, Contents, write_model
from upcycle.errors import InputError, OptionError
from upcycle.io.arrays import from_torch
from upcycle.io.checkpoint import Checkpoint
from upcycle.io.writer import check_output_dir, claims_output_dir
from upcycle.methods.calibration import fit_linear_router, load_for_calibration


@dataclass
class LayerReport:
    layer: int
    oracle_overlap_before: float  # mean fraction of the oracle's top-k the router picks
    oracle_overlap_after: float


def topk_overlap(logits: np.ndarray, oracle: np.ndarray, k: int) -> float:
    """Mean over tokens of |router top-k ∩ oracle's k| / k; `oracle` is (T, E) bool (the
    oracle's choice) or scores whose top-k is the choice."""
    pick = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    if oracle.dtype != np.bool_:
        best = np.argpartition(-oracle, k - 1, axis=1)[:, :k]
        oracle = np.zeros(oracle.shape, dtype=bool)
        np.put_along_axis(oracle, best, True, axis=1)
    hits = np.take_along_axis(oracle, pick, axis=1).sum(axis=1)
    return float(hits.mean() / k)


OBJECTIVES = ("error", "norm")


def _expert_outputs(experts, x):
    """(T, E, H) outputs of every expert of a transformers fused-experts module on x (T, H):
    one matrix product for all gate/up projections, one batched product for the downs."""
    import torch

    num, two_inter, hidden = experts.gate_up_proj.shape
    with torch.no_grad():
        gu = (x @ experts.gate_up_proj.reshape(num * two_inter, hidden).t()).view(
            -1, num, two_inter
        )
        gate, up = gu.chunk(2, dim=-1)
        h = (experts.act_fn(gate) * up).transpose(0, 1)  # (E, T, I)
        return torch.bmm(h, experts.down_proj.transpose(1, 2)).transpose(0, 1)


def expert_output_norms(experts, x):
    """(T, E) output norms of every expert of a transformers fused-experts module on x (T, H)."""
    return _expert_outputs(experts, x).norm(dim=-1)


def error_oracle(experts, x, k: int, chunk: int = 1024):
    """(T, E) bool: per token, k experts chosen greedily so that their outputs with weights 1/k
    come closest to the sum of all expert outputs over k (for a granular model scaled by
    upcycle, exactly the routed part of the dense FFN output).

    With c_e = o_e / k, target t = sum_e c_e and chosen set S, the squared error is
    |t|^2 - 2 sum_S t.c_e + sum_{e,f in S} c_e.c_f; each greedy step adds the expert that lowers
    it most, which needs only t.c (T, E) and the Gram matrix c.c^T (T, E, E).
    """
    import torch

    picks = []
    for s in range(0, x.shape[0], chunk):
        c = _expert_outputs(experts, x[s : s + chunk]).float().contiguous() / k  # (t, E, H)
        tc = torch.bmm(c, c.sum(dim=1, keepdim=True).transpose(1, 2)).squeeze(2)  # (t, E)
        gram = torch.bmm(c, c.transpose(1, 2))  # (t, E, E)
        self_term = gram.diagonal(dim1=1, dim2=2)
        taken = torch.zeros_like(tc, dtype=torch.bool)
        acc = torch.zeros_like(tc)  # sum over chosen f of c_e . c_f
        rows = torch.arange(tc.shape[0])
        for _ in range(k):
            gain = (2 * (tc - acc) - self_term).masked_fill(taken, -torch.inf)
            best = gain.argmax(dim=1)
            taken[rows, best] = True
            acc += gram[rows, :, best]
        picks.append(taken)
    return torch.cat(picks)


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


def _fit_router(block, x, objective: str, top_k: int, ridge: float):
    """A new router weight for one MoE block from its inputs x (tokens, hidden), and the
    fraction of the oracle's experts the old and the new router pick. The block keeps its old
    router when the fit ranks worse than it: (weight, overlap before, overlap after)."""
    xs = x.float().numpy()
    if objective == "error":
        oracle = error_oracle(block.experts, x, top_k).numpy()
        w = fit_linear_router(xs, oracle.astype(np.float64), ridge=ridge, log=False)
    else:
        oracle = expert_output_norms(block.experts, x).float().numpy()
        w = fit_linear_router(xs, oracle, ridge=ridge)
    old = block.gate.weight.detach().float().numpy()
    before = topk_overlap(xs @ old.T, oracle, top_k)
    after = topk_overlap(xs @ w.T, oracle, top_k)
    if after < before:  # the fit ranks worse than the router it would replace: keep that
        w, after = old.copy(), before
    return w, before, after


def _fit_routers(model, blocks, objective: str, ridge: float, bar):
    """Fit every MoE layer's router in order, each on the inputs the layers before it (already
    calibrated) produce; the model's routers change in place. (reports, layer -> weight)."""
    import torch

    top_k = model.config.num_experts_per_tok
    reports: list[LayerReport] = []
    routers: dict[int, np.ndarray] = {}
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
                w, before, after = _fit_router(block, x, objective, top_k, ridge)
                block.gate.weight.data.copy_(torch.from_numpy(w))
                reports.append(LayerReport(i, before, after))
                routers[i] = w
                bar.update()
            hidden = [_output(layer(h, *args, **kw)) for h in hidden]
    return reports, routers


def _check_options(ckpt: Checkpoint, ridge: float, objective: str):
    """The target spec of the checkpoint's MoE architecture, once the options make sense."""
    target = TARGETS.get(ckpt.model_type)
    if target is None:
        raise InputError(
            f"{ckpt.path} is not an MoE checkpoint upcycle can calibrate ({ckpt.model_type}); "
            f"supported: {', '.join(TARGETS)}"
        )
    if ridge <= 0:
        raise OptionError("--ridge must be positive")
    if objective not in OBJECTIVES:
        raise OptionError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return target


@claims_output_dir  # OUT is claimed before the work: a concurrent writer stops here
def calibrate(
    model_dir: str,
    out: str,
    texts: list[str],
    *,
    max_tokens: int = 32768,
    seq_len: int = 256,
    ridge: float = 0.1,
    objective: str = "error",
    force: bool = False,
    progress: bool = True,
    log=None,
) -> list[LayerReport]:
    """Write a copy of the MoE at `model_dir` into `out` with calibrated routers."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    check_output_dir(out, force)
    ckpt = Checkpoint(model_dir)
    target = _check_options(ckpt, ridge, objective)
    from tqdm.auto import tqdm

    from upcycle.data import token_blocks
    from upcycle.io.models import load_tokenizer

    start = time.perf_counter()
    tok = load_tokenizer(ckpt.path)
    model = load_for_calibration(ckpt.path)
    blocks = token_blocks(texts, tok, seq_len=seq_len, max_tokens=max_tokens)
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    if not moe:
        raise InputError(f"{ckpt.path}: no MoE layer found")
    bar = tqdm(
        total=len(moe), desc="calibrating", unit="layer", disable=not progress, file=sys.stderr
    )

    log(f"fitting {len(moe)} routers on {blocks.numel()} tokens ...")
    reports, routers = _fit_routers(model, blocks, objective, ridge, bar)
    bar.close()
    del model
    _write(ckpt, target, routers, out, force, reports, int(blocks.numel()), objective)
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
    objective: str,
) -> None:
    prefix = record(ckpt.model_type).layer_prefix
    replace = {prefix.format(i=i) + target.router: w for i, w in routers.items()}
    entries = [(name, info.dtype, info.shape) for name, info in ckpt.infos.items()]
    sizes = [
        os.path.getsize(os.path.join(ckpt.path, f))
        for f in os.listdir(ckpt.path)
        if f.endswith(".safetensors")
    ]

    def tensors():
        import torch

        for name, dtype, _ in entries:
            a = ckpt.get(name)
            if name in replace:
                a = from_torch(torch.from_numpy(replace[name]), dtype)
            yield {name: a}

    prov_path = os.path.join(ckpt.path, PROVENANCE)
    prov = json.load(open(prov_path)) if os.path.isfile(prov_path) else {}
    prov["calibration"] = {
        "tokens": texts_tokens,
        "objective": objective,
        "oracle_overlap_before": float(np.mean([r.oracle_overlap_before for r in reports])),
        "oracle_overlap_after": float(np.mean([r.oracle_overlap_after for r in reports])),
    }
    # every file of the model but its weights comes along (card, tokenizer, code)
    contents = Contents(config=ckpt.config, files_from=ckpt.path, file_names=None, provenance=prov)
    write_model(out, entries, tensors(), contents, max_shard_bytes=max(sizes), force=force)
