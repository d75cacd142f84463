"""Lookahead expert caching (examples/readme_lookahead.py): counts on hand-made plans, and the
plans of a tiny Read-ME model."""

import os
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli, save_tiny

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import readme_lookahead as la  # noqa: E402


def _plan(experts, layers=2):
    """(layers, tokens, 1): one expert per token, the same in every layer (as Read-ME)."""
    e = np.asarray(experts, dtype=np.int64)
    return np.broadcast_to(e[None, :, None], (layers, len(e), 1)).copy()


def test_belady_beats_lru_on_a_loop():
    loop = [0, 1, 2] * 2  # three blocks in a cycle, two slots: LRU always evicts the next one
    everything = [len(loop)] * len(loop)
    assert la.count_lru(loop, 2) == {"loads": 6, "stalls": 6, "prefetches": 0}
    # MIN: load 0, 1, 2 (evict 1, used after 0), hit 0, load 1 (evict 0, never used), hit 2
    assert la.count_lookahead(loop, 2, everything, prefetch=False)["loads"] == 4
    # prefetching takes loads off the critical path: only the first one stalls here, but
    # the block in use cannot be evicted, so it pays LRU's number of loads on this loop
    got = la.count_lookahead(loop, 2, everything)
    assert got == {"loads": 6, "stalls": 1, "prefetches": 5}
    # a longer loop with a cache of 3 of its 4 blocks: LRU misses everything, MIN one in three
    loop = [0, 1, 2, 3] * 6
    assert la.count_lru(loop, 3)["loads"] == 24
    least = la.count_lookahead(loop, 3, [24] * 24, prefetch=False)["loads"]
    got = la.count_lookahead(loop, 3, [24] * 24)
    assert least == 10 and got["loads"] < 24 and got["stalls"] == 1


def test_horizon_limits_what_lookahead_knows():
    loop = [0, 1, 2] * 2
    # nothing beyond the current access is known: no prefetch, Belady falls back to LRU
    blind = la.count_lookahead(loop, 2, list(range(1, 7)))
    assert blind == {"loads": 6, "stalls": 6, "prefetches": 0}
    # two steps of three accesses: the second step's first block cannot be prefetched
    steps = la.count_lookahead(loop, 2, [3, 3, 3, 6, 6, 6])
    assert steps["stalls"] == 2


def test_enough_slots_load_every_block_once():
    rng = np.random.default_rng(0)
    plans = [_plan(rng.integers(0, 3, size=7), layers=4) for _ in range(5)]
    for batch in (1, 2):
        sched = la.schedule(plans, 3, batch_size=batch, window=8, prompt_tokens=2)
        distinct = len(np.unique(sched.blocks))
        rows = la.simulate(plans, 3, [distinct, 12], batch_size=batch, window=8, prompt_tokens=2)
        assert {r["policy"] for r in rows} == set(la.POLICIES)
        for r in rows:
            assert r["loads"] == distinct and r["stalls"] <= r["loads"]
            assert r.get("min_loads", distinct) == distinct
        window = [r for r in rows if r["horizon"] == "window"]
        assert all(r["stalls"] == 1 for r in window)  # only the very first load is on time


def test_min_loads_never_exceed_lru():
    rng = np.random.default_rng(1)
    for _ in range(20):
        acc = rng.integers(0, 8, size=60).tolist()
        cap = int(rng.integers(1, 8))
        lru = la.count_lru(acc, cap)["loads"]
        full = la.count_lookahead(acc, cap, [60] * 60, prefetch=False)["loads"]
        pre = la.count_lookahead(acc, cap, [60] * 60)
        assert full <= lru and full <= pre["loads"] and pre["stalls"] <= lru


def test_schedule_steps_and_regrouping():
    a, b, c = _plan([0, 0, 1]), _plan([2, 2, 2]), _plan([0, 1, 0])
    # one request at a time, no prompt: each token is a step of one access per layer
    s = la.schedule([a], 3, prompt_tokens=0)
    assert s.blocks.tolist() == [0, 3, 0, 3, 1, 4] and s.tokens == 3 and s.steps == 3
    assert s.step_end.tolist() == [2, 2, 4, 4, 6, 6] and s.window_end.tolist() == [6] * 6
    # a prompt of two tokens is one prefill step: each layer loads the union of its experts
    s = la.schedule([c], 3, prompt_tokens=2)
    assert s.blocks.tolist() == [0, 1, 3, 4, 0, 3] and s.steps == 2
    # a batch of two: each decoding step runs the union of the two tokens' experts
    s = la.schedule([a, b], 3, batch_size=2, prompt_tokens=0)
    assert s.blocks.tolist()[:4] == [0, 2, 3, 5]
    # expert-aware batching: each window sorted by its prompts' dominant expert
    plans = [b, a, c, _plan([2, 2, 0])]
    assert la.dominant_expert(c, 3) == (0, pytest.approx(2 / 3))
    order = la.serving_order(plans, batch_size=2, window=4, regroup=True, prompt_tokens=3)
    assert order == [[[1, 2], [0, 3]]]
    assert la.serving_order(plans, batch_size=2, window=2) == [[[0, 1]], [[2, 3]]]


def test_batching_by_expert_saves_loads():
    # two domains alternate in arrival order; one domain's blocks fill the cache
    plans = [_plan([i % 2] * 8, layers=4) for i in range(8)]
    rows = la.simulate(plans, 2, [4], window=8, prompt_tokens=2, horizons=("step",))
    by = {r["policy"]: r for r in rows}
    assert by["lru"]["loads"] == 8 * 4  # every request reloads its expert's 4 blocks
    assert by["lru+batching"]["loads"] == 2 * 4  # grouped: each expert is loaded once
    assert by["lookahead+batching"]["loads"] == 8 and by["lookahead+batching"]["stalls"] == 2


@pytest.fixture(scope="module")
def readme_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lookahead")
    dense = save_tiny(str(root / "llama"), "llama", tokenizer=True)
    out = str(root / "moe")
    data = ("--calibration-data", "builtin:prose", "--calibration-data", "builtin:code")
    r = run_cli("convert", dense, out, "--method", "readme", *data, "--calibration-tokens", "512", "-q")  # fmt: skip
    assert r.code == 0, r
    return out


def test_plans_are_what_the_backbone_runs_and_group_requests(readme_model):
    model, _ = la.load_model(readme_model)
    L, E = model.config.num_hidden_layers, model.config.num_local_experts
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    plan = model.plan_experts(ids)
    assert plan.shape == (L, 4, 12, 1) and bool((plan == plan[:1]).all())
    seen = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[1][0].clone()))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == L and all(torch.equal(s, plan[i]) for i, s in enumerate(seen))
    # per-request plans equal the batch's rows; regrouping puts equal dominant experts together
    plans = la.plan_requests(model, ids.tolist())
    assert all(np.array_equal(p, plan[:, r].numpy()) for r, p in enumerate(plans))
    windows = la.serving_order(plans, window=4, regroup=True)
    order = [r for win in windows for batch in win for r in batch]
    keys = [la.dominant_expert(plans[r], 16)[0] for r in order]
    assert keys == sorted(keys) and set(keys) <= set(range(E))
    rows = la.simulate(plans, E, la.capacities_for(L, E, (0.5,)), prompt_tokens=4)
    assert {r["policy"] for r in rows} == set(la.POLICIES)


def test_example_runs_as_written(readme_model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["readme_lookahead.py", readme_model, "--requests", "6"])
    la.main()
    out = capsys.readouterr().out
    assert "plan_experts" in out and "| lookahead+batching | window |" in out
