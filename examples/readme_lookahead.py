"""Lookahead expert caching with a Read-ME model: plan experts before the backbone runs.

    python examples/readme_lookahead.py MODEL_DIR [--requests 32] [--batch-size 1] [--window 16]

MODEL_DIR is an `upcycle convert ... --method readme` output. Its pre-gating router picks each
token's expert from the token ids alone, so `model.plan_experts(input_ids)` returns every
layer's expert choice, (num_layers, batch, seq_len, top_k), before any backbone layer runs.
This script prints the plans of a few prompts, then replays a stream of held-out requests
(built-in corpus snippets of every domain, shuffled) through a simulated expert cache and
counts how many expert loads lookahead saves.

The simulator below needs only numpy (the benchmark and the tests import it):

- Blocks: the weights of one routed expert in one layer, (layer, expert). Each block must be
  resident in a cache of N equal slots while it runs (every expert of a Read-ME checkpoint is
  padded to one width). The residual expert, attention and embeddings are always resident and
  not counted.
- Serving: static batches of B requests taken from windows of W requests. A batch runs one
  prefill step over the first P tokens of each request (its prompt), then one decoding step per
  further token (each running request's next token). A step runs the layers in order, and in
  each layer the distinct experts its tokens use, in ascending order: each (layer, expert) is
  one access, so a step of one token is L accesses. Texts are replayed as given: the tokens a
  real server would generate are those of the held-out text.
- Timing model: a load takes at most as long as one access computes; there is one load
  channel. A load is a *stall* when the block is missing at the moment its access starts (the
  load is on the critical path); a prefetch issued during access i for access i + 1 is not.
  With slower loads a prefetch would have to start several accesses ahead and more loads
  would stall: the stall counts are a best case for prefetching, the load counts are not.
- Policies:
  (a) `lru`: no lookahead. Blocks are loaded on demand (every load stalls), the least
      recently used one is evicted, requests are served in arrival order.
  (b) `lookahead`: the plan of the known horizon is available. Eviction is Belady's: the
      resident block whose next known use is furthest away goes (blocks with no use in the
      horizon first, least recently used among them). During each access the block of the
      next access is prefetched if it is missing, evicting the resident block with the
      furthest next known use other than the one in use, provided that use comes after the
      prefetched block's (otherwise the load waits for the access and stalls). Because the
      block in use cannot go, prefetching can cost a few more loads than Belady's minimum;
      `min_loads` is that minimum (the same eviction on demand, every load a stall).
  (c) `lookahead+batching`: as (b), and each window's requests are first regrouped by the
      dominant expert of their prompt's plan (expert-aware batching), so a batch and the
      batches next to it share experts. `lru+batching` is the same order with LRU: it
      separates the effect of the order from that of the eviction.
- Horizon (what is known for (b), (c)): `step`, the current step only: in real decoding the
  next token, hence its plan, exists only after the current step (a prompt is known whole),
  so the first block of every step cannot be prefetched; `window`, every token of the
  window's requests: a bound, as if the continuations were known in advance (true only when
  whole requests are, e.g. for scoring). The batching order uses the prompts' plans only.
- `loads_per_token` divides by every served token, prompt tokens included.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

POLICIES = ("lru", "lookahead", "lru+batching", "lookahead+batching")
HORIZONS = ("step", "window")


# -------------------------------------------------------------------------------- schedule


@dataclass
class Schedule:
    """The accesses of a served stream: block ids (layer * num_experts + expert) in order, and
    for each access the end (exclusive) of its step and of its window, which bound what a
    lookahead policy knows at that access."""

    blocks: np.ndarray  # (accesses,) int64
    step_end: np.ndarray  # (accesses,) int64
    window_end: np.ndarray  # (accesses,) int64
    num_layers: int
    num_experts: int
    tokens: int
    steps: int
    order: list[list[int]]  # the batches, as request indices in serving order

    def known_end(self, horizon: str) -> np.ndarray:
        if horizon not in HORIZONS:
            raise ValueError(f"horizon must be one of {HORIZONS}, got {horizon!r}")
        return self.step_end if horizon == "step" else self.window_end


def dominant_expert(plan: np.ndarray, prompt_tokens: int) -> tuple[int, float]:
    """(expert, share): the expert most of the prompt's (layer, token, k) choices name."""
    head = plan[:, : max(1, prompt_tokens)]
    counts = np.bincount(head.reshape(-1), minlength=int(head.max()) + 1)
    return int(counts.argmax()), float(counts.max() / counts.sum())


def serving_order(
    plans: Sequence[np.ndarray],
    batch_size: int = 1,
    window: int = 16,
    regroup: bool = False,
    prompt_tokens: int = 16,
) -> list[list[list[int]]]:
    """Windows of batches of request indices. Without `regroup`, arrival order; with it, each
    window's requests sorted by the dominant expert of their prompt (largest share first)."""
    if batch_size < 1 or window < 1:
        raise ValueError("batch_size and window must be at least 1")
    windows = []
    for w0 in range(0, len(plans), window):
        idx = list(range(w0, min(w0 + window, len(plans))))
        if regroup:
            keys = {r: dominant_expert(plans[r], prompt_tokens) for r in idx}
            idx.sort(key=lambda r: (keys[r][0], -keys[r][1], r))
        windows.append([idx[b : b + batch_size] for b in range(0, len(idx), batch_size)])
    return windows


def schedule(
    plans: Sequence[np.ndarray],
    num_experts: int,
    batch_size: int = 1,
    window: int = 16,
    regroup: bool = False,
    prompt_tokens: int = 16,
) -> Schedule:
    """Serve requests whose plans are (num_layers, tokens, top_k) expert indices (see the
    module docstring): one prefill step over each batch's prompts, then one step per token."""
    if not plans:
        raise ValueError("no requests")
    num_layers = plans[0].shape[0]
    if any(p.ndim != 3 or p.shape[0] != num_layers for p in plans):
        raise ValueError("every plan must be (num_layers, tokens, top_k) with the same layers")
    layer_of = np.arange(num_layers)[:, None]
    blocks: list[np.ndarray] = []
    step_sizes: list[int] = []
    window_sizes: list[int] = []
    order: list[list[int]] = []
    tokens = 0
    for win in serving_order(plans, batch_size, window, regroup, prompt_tokens):
        start = sum(step_sizes)
        for batch in win:
            order.append(batch)
            length = max(plans[r].shape[1] for r in batch)
            cuts = [(0, prompt_tokens)] if prompt_tokens > 0 else []
            cuts += [(t, t + 1) for t in range(max(prompt_tokens, 0), length)]
            for a, b in cuts:
                used = np.zeros((num_layers, num_experts), dtype=bool)
                for r in batch:
                    part = plans[r][:, a:b]  # (L, tokens in the step, k)
                    if part.shape[1]:
                        used[np.broadcast_to(layer_of[:, :, None], part.shape), part] = True
                        tokens += part.shape[1]
                if used.any():
                    layer, expert = np.nonzero(used)  # layer-major, experts ascending
                    blocks.append(layer * num_experts + expert)
                    step_sizes.append(len(layer))
        window_sizes.append(sum(step_sizes) - start)
    steps = np.asarray(step_sizes, dtype=np.int64)
    wins = np.asarray(window_sizes, dtype=np.int64)
    return Schedule(
        blocks=np.concatenate(blocks).astype(np.int64),
        step_end=np.repeat(np.cumsum(steps), steps),
        window_end=np.repeat(np.cumsum(wins), wins),
        num_layers=num_layers,
        num_experts=num_experts,
        tokens=tokens,
        steps=len(step_sizes),
        order=order,
    )


# -------------------------------------------------------------------------------- caches


def count_lru(blocks: Sequence[int], capacity: int) -> dict:
    """Demand loading with least-recently-used eviction: every load is a stall."""
    if capacity < 1:
        raise ValueError("capacity must be at least 1")
    cache: OrderedDict[int, None] = OrderedDict()
    loads = 0
    for b in map(int, blocks):
        if b in cache:
            cache.move_to_end(b)
            continue
        loads += 1
        if len(cache) >= capacity:
            cache.popitem(last=False)
        cache[b] = None
    return {"loads": loads, "stalls": loads, "prefetches": 0}


def next_uses(blocks: Sequence[int]) -> list[int]:
    """For each access, the index of the next access to the same block (len(blocks): none)."""
    n = len(blocks)
    out = [n] * n
    seen: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        b = int(blocks[i])
        out[i] = seen.get(b, n)
        seen[b] = i
    return out


def count_lookahead(
    blocks: Sequence[int], capacity: int, known_end: Sequence[int], prefetch: bool = True
) -> dict:
    """Belady eviction within the known horizon; with `prefetch`, the next access's block is
    loaded during the current access (see the module docstring). `known_end[i]`: the first
    access not known at access i. Without `prefetch` the loads are the fewest any policy with
    this horizon can make (Belady's MIN; every one stalls)."""
    if capacity < 1:
        raise ValueError("capacity must be at least 1")
    acc = [int(b) for b in blocks]
    ends = [int(e) for e in known_end]
    n = len(acc)
    nxt = next_uses(acc)
    resident: dict[int, int] = {}  # block -> index of its next access
    last: dict[int, int] = {}  # block -> index of its last access

    def victim(i: int, busy: int) -> tuple[int, int]:
        """(block, rank) Belady evicts at access i, never `busy`: the furthest next known use;
        blocks without one rank above all (n + ...), least recently used first."""
        end, best, rank = ends[i], -1, -1
        for b, use in resident.items():
            r = use if use < end else 2 * n - last[b]
            if r > rank and b != busy:
                best, rank = b, r
        return best, rank

    loads = stalls = prefetches = 0
    for i, b in enumerate(acc):
        if b not in resident:
            loads += 1
            stalls += 1
            if len(resident) >= capacity:
                del resident[victim(i, b)[0]]
        resident[b] = nxt[i]
        last[b] = i
        j = i + 1
        if not prefetch or j >= ends[i] or acc[j] in resident:
            continue
        if len(resident) >= capacity:
            v, rank = victim(i, b)  # the block in use stays until its access ends
            if v < 0 or rank <= j:  # every other block is needed before acc[j]: wait
                continue
            del resident[v]
        resident[acc[j]] = j
        last[acc[j]] = i
        loads += 1
        prefetches += 1
    return {"loads": loads, "stalls": stalls, "prefetches": prefetches}


def simulate(
    plans: Sequence[np.ndarray],
    num_experts: int,
    capacities: Sequence[int],
    batch_size: int = 1,
    window: int = 16,
    prompt_tokens: int = 16,
    policies: Sequence[str] = POLICIES,
    horizons: Sequence[str] = HORIZONS,
) -> list[dict]:
    """One row per (capacity, policy, horizon): loads, stalls and their ratios to `lru`."""
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise ValueError(f"unknown policies {sorted(unknown)} (choose from {POLICIES})")
    kw = dict(batch_size=batch_size, window=window, prompt_tokens=prompt_tokens)
    plain = schedule(plans, num_experts, regroup=False, **kw)
    grouped = schedule(plans, num_experts, regroup=True, **kw)
    rows = []
    for cap in capacities:
        base = count_lru(plain.blocks, cap)
        for policy in policies:
            sched = grouped if policy.endswith("+batching") else plain
            if policy.startswith("lru"):
                runs = [("-", count_lru(sched.blocks, cap))]
            else:
                runs = []
                for h in horizons:
                    known = sched.known_end(h)
                    r = count_lookahead(sched.blocks, cap, known)
                    least = count_lookahead(sched.blocks, cap, known, prefetch=False)["loads"]
                    runs.append((h, {**r, "min_loads": least}))
            for horizon, r in runs:
                rows.append(
                    {
                        "capacity": int(cap),
                        "policy": policy,
                        "horizon": horizon,
                        **r,
                        "accesses": len(sched.blocks),
                        "distinct_blocks": int(len(np.unique(sched.blocks))),
                        "tokens": sched.tokens,
                        "steps": sched.steps,
                        "loads_per_token": r["loads"] / sched.tokens,
                        "loads_vs_lru": r["loads"] / base["loads"],
                        "stalls_vs_lru": r["stalls"] / base["stalls"],
                    }
                )
    return rows


def capacities_for(num_layers: int, num_experts: int, fractions=(0.25, 0.5, 0.75)) -> list[int]:
    """Cache sizes as fractions of all (layer, expert) blocks, at least one block."""
    return [max(1, int(round(f * num_layers * num_experts))) for f in fractions]


def format_table(rows: Sequence[dict], num_blocks: int | None = None) -> str:
    """Markdown: one line per row of `simulate`; N as a share of all blocks if given."""
    cols = ("cache N", "policy", "horizon", "loads", "stalls", "min loads", "loads/token")
    cols += ("loads vs lru", "stalls vs lru")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        share = f" ({r['capacity'] / num_blocks:.0%})" if num_blocks else ""
        cells = (
            f"{r['capacity']}{share}",
            r["policy"],
            r["horizon"],
            r["loads"],
            r["stalls"],
            r.get("min_loads", "-"),
            f"{r['loads_per_token']:.2f}",
            f"{r['loads_vs_lru']:.3f}",
            f"{r['stalls_vs_lru']:.3f}",
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- the model


def request_stream(
    tokenizer,
    num_requests: int,
    tokens: int,
    domains: Sequence[str] | None = None,
    split: str = "heldout",
    seed: int = 0,
) -> list[tuple[str, list[int]]]:
    """(domain, token ids) pairs: the first `tokens` tokens of built-in corpus texts, about the
    same number from each domain, shuffled into one arrival order (deterministic)."""
    from upcycle.data import DATA_ALIASES, resolve_texts

    if domains is None:
        domains = [d for d in ("prose", "code", "manual") if f"builtin:{d}" in DATA_ALIASES]
    per = -(-num_requests // len(domains))
    pool: list[tuple[str, list[int]]] = []
    for d in domains:
        got = 0
        for text in resolve_texts(f"builtin:{d}", split=split):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= tokens:
                pool.append((d, ids[:tokens]))
                got += 1
                if got == per:
                    break
    rng = np.random.default_rng(seed)
    pool = [pool[i] for i in rng.permutation(len(pool))]
    return pool[:num_requests]


def plan_requests(model, requests: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Each request's (num_layers, tokens, top_k) plan from `model.plan_experts`."""
    import torch

    plans = []
    for ids in requests:
        planned = model.plan_experts(torch.tensor([list(ids)]))  # (L, 1, T, k)
        plans.append(planned[:, 0].cpu().numpy().astype(np.int64))
    return plans


def load_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import upcycle.modeling  # noqa: F401  (registers upcycle_readme with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if not hasattr(model, "plan_experts"):
        raise SystemExit(f"{model_dir}: not a Read-ME model (convert with --method readme)")
    return model, AutoTokenizer.from_pretrained(model_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", help="an `upcycle convert --method readme` output folder")
    ap.add_argument("--requests", type=int, default=32, help="requests in the stream")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="P: prefilled tokens")
    ap.add_argument("--gen-tokens", type=int, default=48, help="decoded tokens per request")
    ap.add_argument("--batch-size", type=int, default=1, help="B: requests served together")
    ap.add_argument("--window", type=int, default=16, help="W: requests regrouped together")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model_dir)
    cfg = model.config
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    stream = request_stream(tok, args.requests, args.prompt_tokens + args.gen_tokens)
    plans = plan_requests(model, [ids for _, ids in stream])

    print(f"{args.model_dir}: {L} layers x {E} experts, top-{cfg.num_experts_per_tok}")
    print("plan_experts of a few requests (layer 0; every layer makes the same choice here):")
    shown = set()
    for (domain, ids), plan in zip(stream, plans, strict=True):
        if domain in shown:
            continue
        shown.add(domain)
        share = np.bincount(plan[0, :, 0], minlength=E) / plan.shape[1]
        words = [f"{tok.decode([t])!r}:{e}" for t, e in zip(ids[:10], plan[0, :10, 0], strict=True)]
        print(f"  {domain:7s} " + " ".join(words))
        print(f"  {'':7s} expert shares " + ", ".join(f"e{e} {s:.0%}" for e, s in enumerate(share)))

    rows = simulate(
        plans,
        E,
        capacities_for(L, E),
        batch_size=args.batch_size,
        window=args.window,
        prompt_tokens=args.prompt_tokens,
    )
    print(
        f"\n{len(plans)} requests ({args.prompt_tokens} prompt + {args.gen_tokens} decoded "
        f"tokens each), batches of {args.batch_size}, windows of {args.window}; "
        f"{L * E} (layer, expert) blocks:"
    )
    print(format_table(rows, L * E))


if __name__ == "__main__":
    main()
