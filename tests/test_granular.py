"""Granular upcycling: exactness on every target, partitions, router inits, bad input."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import logits
from test_bad_input import assert_one_line_error
from transformers import AutoModelForCausalLM

from upcycle.methods import partitions as P
from upcycle.methods.granular import GranularMethod

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

# I = 96 in the tiny models: G=8 -> 12 neurons per part.
EXACT = [
    ("llama", ["-G", "8"], "MixtralForCausalLM"),
    ("llama", ["-G", "4", "-E", "8", "--partition", "random"], "MixtralForCausalLM"),
    ("qwen2", ["-G", "8", "-S", "2", "--partition", "kmeans"], "Qwen2MoeForCausalLM"),
    ("llama", ["-G", "6", "-S", "3", "-E", "6", "--target", "qwen2_moe"], "Qwen2MoeForCausalLM"),
    ("qwen3", ["-G", "8", "--partition", "kmeans", "--moe-layers", "1"], "Qwen3MoeForCausalLM"),
]


def granular(cli, src, out, *args):
    return cli("convert", src, out, "--method", "granular", "-q", *args)


@pytest.mark.parametrize("family,extra,arch", EXACT, ids=[f"{c[0]}{''.join(c[1])}" for c in EXACT])
def test_full_activation_with_uniform_router_is_exact(tiny, cli, tmp_path, family, extra, arch):
    src = tiny(family)
    out = str(tmp_path / "moe")
    g = int(extra[extra.index("-G") + 1])
    s = int(extra[extra.index("-S") + 1]) if "-S" in extra else 0
    e = int(extra[extra.index("-E") + 1]) if "-E" in extra else g - s
    r = granular(cli, src, out, "--router-init", "zeros", "-k", str(e), *extra)
    assert r.code == 0, r
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == arch
    torch.testing.assert_close(logits(out, IDS), logits(src, IDS), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        ("-G", "8", "-k", "8"),  # one group, every expert active
        ("-G", "8", "-E", "24", "-k", "8"),  # 3 copies, top-8 takes one whole copy
        ("-G", "8", "-S", "2", "-E", "12", "-k", "12", "--target", "qwen2_moe"),  # all of 2
    ],
)
def test_virtual_group_router_picking_whole_copies_is_exact(tiny, cli, tmp_path, options):
    src = tiny("qwen2" if "qwen2_moe" in options else "llama")
    out = str(tmp_path / "moe")
    r = granular(cli, src, out, *options, "--router-init", "virtual-group")
    assert r.code == 0, r
    torch.testing.assert_close(logits(out, IDS), logits(src, IDS), atol=1e-5, rtol=0)


def test_shapes_config_and_active_params(tiny, cli, tmp_path):
    out = str(tmp_path / "moe")
    r = cli(
        "convert",
        tiny("qwen2"),
        out,
        "--method",
        "granular",
        "-G",
        "8",
        "-S",
        "2",
        "-E",
        "12",
        "-k",
        "3",
        "--partition",
        "kmeans",
        "--router-init",
        "centroid",
        "-q",
    )
    assert r.code == 0, r
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["moe_intermediate_size"] == 12 and cfg["shared_expert_intermediate_size"] == 24
    assert (
        cfg["num_experts"] == 12
        and cfg["num_experts_per_tok"] == 3
        and cfg["norm_topk_prob"] is True
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    gate = model.model.layers[0].mlp.gate.weight
    assert gate.shape == (12, 64)
    torch.testing.assert_close(gate[:6], gate[6:])  # replicas of a part share its router row
    info = json.loads(cli("inspect", out, "--json").out)
    per_expert = 3 * 12 * 64
    assert info["params_total"] - info["params_active"] == 2 * (12 - 3) * per_expert


def test_partial_activation_is_close_but_not_exact(tiny, cli, tmp_path):
    src = tiny("llama")
    out = str(tmp_path / "moe")
    assert granular(cli, src, out, "-G", "8", "-k", "6", "--router-init", "zeros").code == 0
    dense, moe = logits(src, IDS), logits(out, IDS)
    diff = (dense - moe).abs().max()
    assert 1e-6 < diff < dense.abs().max()


def test_deterministic_under_seed(tiny, cli, tmp_path):
    src = tiny("llama")
    outs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = str(tmp_path / name)
        assert (
            granular(
                cli, src, out, "-G", "8", "-k", "2", "--partition", "random", "--seed", seed
            ).code
            == 0
        )
        outs.append(open(os.path.join(out, "model.safetensors"), "rb").read())
    assert outs[0] == outs[1] != outs[2]


@pytest.mark.parametrize("n,g", [(96, 8), (1536, 64), (100, 4)])
def test_partition_invariants(n, g):
    rng = np.random.default_rng(0)
    gate, up = (
        rng.standard_normal((n, 16)).astype(np.float32),
        rng.standard_normal((n, 16)).astype(np.float32),
    )
    contrib = rng.random((200, n)).astype(np.float32) ** 4
    for parts in (
        P.contiguous(n, g),
        P.random_partition(n, g, 0, 0),
        P.kmeans_partition(gate, up, g, 0, 0),
        P.coactivation_partition(contrib, g, 0, 0)[1],
        P.coactivation_partition(contrib, g, 0, 0, top_k=g // 4)[1],
    ):
        assert len(parts) == g
        P.check_partition(parts, n)
    shared, routed = P.coactivation_partition(contrib, g, 0, 0, shared=2, top_k=g // 4)
    assert len(routed) == g - 2 and shared.size == 2 * (n // g)
    P.check_partition(routed + [shared[: n // g], shared[n // g :]], n)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            P.kmeans_partition(gate, up, g, 3, 1),
            P.kmeans_partition(gate, up, g, 3, 1),
            strict=True,
        )
    )


def test_kmeans_groups_similar_neurons():
    """Neurons built as noisy copies of 4 prototypes end up grouped by prototype."""
    rng = np.random.default_rng(0)
    protos = rng.standard_normal((4, 32))
    labels = np.repeat(np.arange(4), 10)
    rng.shuffle(labels)
    rows = protos[labels] + 0.05 * rng.standard_normal((40, 32))
    parts = P.kmeans_partition(
        rows[:, :16].astype(np.float32), rows[:, 16:].astype(np.float32), 4, 0, 0
    )
    assert all(len(set(labels[p])) == 1 for p in parts)


def _coactivating(seed=0, groups=6, size=8, tokens=300):
    """Contributions where neurons come in `groups` hidden teams, each active on its own tokens,
    plus two always-large neurons per team's worth of width (the natural shared ones)."""
    rng = np.random.default_rng(seed)
    team = np.repeat(np.arange(groups), size)
    rng.shuffle(team)
    topic = rng.integers(0, groups, tokens)
    contrib = 0.05 * rng.random((tokens, groups * size))
    contrib += (team[None, :] == topic[:, None]) * (1 + rng.random((tokens, groups * size)))
    return contrib.astype(np.float32), team


def test_coactivation_groups_neurons_that_matter_together():
    contrib, team = _coactivating()
    shared, routed = P.coactivation_partition(contrib, 6, 0, 0, top_k=1)
    assert shared.size == 0
    assert all(len(set(team[p])) == 1 for p in routed)


def test_coactivation_shared_takes_largest_mean_share_and_is_deterministic():
    contrib, _ = _coactivating()
    big = np.array([3, 17, 30, 41, 44, 47, 5, 9])
    contrib[:, big] += 5.0  # always large: these must be the shared expert
    a = P.coactivation_partition(contrib, 6, 3, 1, shared=1, top_k=2)
    b = P.coactivation_partition(contrib, 6, 3, 1, shared=1, top_k=2)
    assert np.array_equal(a[0], np.sort(big))
    P.check_partition(a[1] + [a[0]], contrib.shape[1])
    assert np.array_equal(a[0], b[0]) and all(
        np.array_equal(x, y) for x, y in zip(a[1], b[1], strict=True)
    )


def test_refine_for_topk_never_lowers_the_captured_weight():
    contrib, team = _coactivating(seed=1)
    share = P.token_shares(contrib)
    rng = np.random.default_rng(0)
    start = rng.permutation(np.repeat(np.arange(6), 8))  # a random balanced start
    _, before = P.topk_captured(share, start, 6, 2)
    refined = P.refine_for_topk(share, start, 6, 2)
    _, after = P.topk_captured(share, refined, 6, 2)
    assert after > before
    assert np.array_equal(np.bincount(refined, minlength=6), np.full(6, 8))
    assert np.array_equal(P.refine_for_topk(share, start, 6, 6), start)  # k = all: no-op


def test_refine_for_router_keeps_balance_and_never_lowers_what_the_router_captures():
    contrib, team = _coactivating(seed=2)
    share = P.token_shares(contrib)
    rng = np.random.default_rng(1)
    # router inputs that reveal each token's topic (linearly), plus noise
    topic = np.argmax(contrib @ np.eye(6)[team], axis=1)
    x = np.eye(6)[topic] @ rng.standard_normal((6, 16)) + 0.1 * rng.standard_normal((300, 16))
    start = rng.permutation(np.repeat(np.arange(6), 8))
    refined = P.refine_for_router(share, x.astype(np.float32), start, 6, 1)
    assert np.array_equal(np.bincount(refined, minlength=6), np.full(6, 8))
    # neurons of one team end up together: then the router can pick them
    assert all(len(set(refined[team == t])) == 1 for t in range(6))
    shared, routed = P.coactivation_partition(contrib, 6, 0, 0, top_k=1, router_inputs=x)
    assert shared.size == 0
    P.check_partition(routed, contrib.shape[1])


def test_split_shared_takes_most_important():
    parts = P.contiguous(12, 4)
    importance = np.arange(12, dtype=float)
    shared, routed = P.split_shared(parts, 1, importance)
    assert list(shared) == [9, 10, 11]
    P.check_partition(routed + [shared], 12)


def test_router_inits_shapes():
    rng = np.random.default_rng(0)
    gate, up, down = (
        rng.standard_normal(s).astype(np.float32) for s in ((96, 64), (96, 64), (64, 96))
    )
    ffn = {"gate": gate, "up": up, "down": down}
    for init in ("random", "zeros", "virtual-group", "centroid"):
        k = 8 if init == "virtual-group" else 4  # virtual groups take whole copies
        m = GranularMethod(granularity=8, num_experts=16, top_k=k, router_init=init)
        m.validate()
        layer = m.layer(0, ffn, "F32")
        assert layer.router.shape == (16, 64) and layer.router.dtype == np.float32
        assert len(layer.experts) == 16 and layer.experts[0]["gate"].shape == (12, 64)
        again = m.layer(0, ffn, "F32").router
        assert np.array_equal(layer.router, again)


@pytest.mark.parametrize(
    "args,words",
    [
        (["-G", "7"], ["does not divide the FFN width 96"]),
        (["-G", "8", "-E", "12"], ["multiple of the routed parts"]),
        (
            ["-G", "8", "-S", "2", "-k", "7", "--target", "qwen2_moe"],
            ["--top-k counts routed experts only"],
        ),
        (["-G", "8", "-S", "2"], ["mixtral has no shared expert"]),
        (
            ["-G", "8", "--partition", "coactivation"],
            ["--partition coactivation needs --calibration-data"],
        ),
        (
            ["-G", "8", "--router-init", "activation"],
            ["--router-init activation needs --calibration-data"],
        ),
        (["-G", "8", "--router-init", "hidden"], ["unknown --router-init"]),
        (
            ["-G", "8", "-E", "16", "-k", "4", "--router-init", "virtual-group"],
            ["--top-k must be a multiple of 8"],
        ),
        (["-G", "8", "--partition", "spectral"], ["unknown --partition"]),
        ([], ["needs --granularity"]),
        (["-G", "8", "--expert-noise", "0.1"], ["--expert-noise applies to --method copy"]),
    ],
)
def test_bad_granular_options(cli, tiny, tmp_path, args, words):
    out = tmp_path / "o"
    assert_one_line_error(
        cli("convert", tiny("llama"), str(out), "--method", "granular", *args), *words
    )
    assert not out.exists()


def test_granular_options_refused_for_copy(cli, tiny, tmp_path):
    assert_one_line_error(
        cli("convert", tiny("llama"), str(tmp_path / "o"), "-G", "8"),
        "--granularity applies to --method granular",
    )
