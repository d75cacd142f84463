"""upcycle calibrate: routers fitted to frozen experts pick more of the oracle's experts."""

import json
import os

import numpy as np
import torch
from conftest import save_tiny
from test_bad_input import assert_one_line_error
from transformers import AutoModelForCausalLM

from upcycle.calibrate import topk_overlap


def _corpus(path, n=300, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "mat", "code", "python", "def", "return", "import"] + [
        f"w{i}" for i in range(10, 100)
    ]
    lines = [" ".join(rng.choice(words, size=20)) for _ in range(n)]
    path.write_text("\n\n".join(lines))
    return str(path)


def calibrate_small(cli, moe, out, data, *extra):
    """A quick calibration: 1024 tokens in blocks of 64, per-layer report as JSON."""
    return cli(
        "calibrate",
        moe,
        out,
        "--data",
        data,
        "--max-tokens",
        "1024",
        "--seq-len",
        "64",
        "--json",
        "-q",
        *extra,
    )


def test_topk_overlap():
    logits = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    norms = np.array([[9.0, 1.0, 8.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert topk_overlap(logits, norms, 2) == 0.75


def test_topk_overlap_with_a_chosen_set():
    logits = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    chosen = np.array([[True, False, True, False], [False, False, True, True]])
    assert topk_overlap(logits, chosen, 2) == 0.75


class _Experts(torch.nn.Module):
    """transformers' fused-experts layout, random weights."""

    def __init__(self, e=6, h=8, i=5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(e, 2 * i, h, generator=g))
        self.down_proj = torch.nn.Parameter(torch.randn(e, h, i, generator=g))
        self.act_fn = torch.nn.functional.silu


def _outputs(experts, x):
    return torch.stack(
        [
            torch.nn.functional.linear(
                experts.act_fn(g) * u, experts.down_proj[e]
            )  # expert e's output
            for e in range(experts.gate_up_proj.shape[0])
            for g, u in [torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, -1)]
        ],
        dim=1,
    )


def test_error_oracle_picks_the_closest_sums():
    """k experts per token, chosen greedily to approach the sum of all outputs: exact for k=1
    (the best single expert), and on average closer than the k largest outputs for k=2."""
    from itertools import combinations

    from upcycle.calibrate import error_oracle

    experts = _Experts()
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        o = _outputs(experts, x).double()

    def error(chosen, k):  # (T,) squared distance of the chosen outputs / k to the target
        t = o.sum(1) / k
        return ((o * chosen[:, :, None]).sum(1) / k - t).square().sum(-1)

    for k in (1, 2):
        chosen = error_oracle(experts, x, k, chunk=128)  # several chunks
        assert chosen.dtype == torch.bool and (chosen.sum(1) == k).all()
        sets = [
            torch.zeros(6, dtype=torch.bool).index_fill(0, torch.tensor(c), True)
            for c in combinations(range(6), k)
        ]
        errors = torch.stack([error(s.expand(300, 6).double(), k) for s in sets], 1)
        ours = error(chosen.double(), k)
        assert (ours >= errors.min(1).values - 1e-6).all()
        if k == 1:
            torch.testing.assert_close(ours, errors.min(1).values)
        else:
            norms = o.norm(dim=-1).topk(k, dim=1).indices
            by_norm = torch.zeros(300, 6, dtype=torch.double).scatter(1, norms, 1.0)
            assert ours.mean() < error(by_norm, k).mean()


def test_calibrate_moves_routers_toward_the_oracle(tmp_path, cli):
    src = save_tiny(str(tmp_path / "src"), "llama", tokenizer=True)
    moe, out = str(tmp_path / "moe"), str(tmp_path / "cal")
    assert cli("convert", src, moe, "--method", "granular", "-G", "8", "-k", "2", "-q").code == 0
    data = _corpus(tmp_path / "data.txt")
    r = calibrate_small(cli, moe, out, data)
    assert r.code == 0, r
    reports = json.loads(r.out)
    assert len(reports) == 2
    before = np.mean([x["oracle_overlap_before"] for x in reports])
    after = np.mean([x["oracle_overlap_after"] for x in reports])
    assert after > before + 0.1
    norm = calibrate_small(cli, moe, str(tmp_path / "cal-norm"), data, "--objective", "norm")
    assert norm.code == 0, norm
    assert np.mean([x["oracle_overlap_after"] for x in json.loads(norm.out)]) > 0.5
    a, b = AutoModelForCausalLM.from_pretrained(moe), AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(a.model.layers[0].mlp.gate.weight, b.model.layers[0].mlp.gate.weight)
    torch.testing.assert_close(
        a.model.layers[0].mlp.experts.down_proj, b.model.layers[0].mlp.experts.down_proj
    )
    assert "calibration" in json.load(open(os.path.join(out, "upcycle.json")))
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_calibrate_refuses_dense_models(tmp_path, cli, tiny):
    data = _corpus(tmp_path / "d.txt", n=5)
    assert_one_line_error(
        cli("calibrate", tiny("llama"), str(tmp_path / "o"), "--data", data),
        "not an MoE checkpoint",
    )


def test_fitted_router_ranks_by_fit_and_mixes_near_uniformly():
    from upcycle.methods.calibration import fit_linear_router

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    true = rng.standard_normal((6, 16))
    y = np.exp(0.3 * (x @ true.T) + 0.01 * rng.standard_normal((500, 6)))  # positive sizes
    w = fit_linear_router(x, y, logit_std=0.1)  # any spread; the default is smaller
    logits = x @ w.T
    assert abs((logits - logits.mean(1, keepdims=True)).std() - 0.1) < 1e-3
    assert topk_overlap(logits, y, 2) > 0.9  # the ranking comes from the fit
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert probs.max() < 2.5 / 6  # no expert takes most of the weight


def test_large_models_are_calibrated_in_their_own_dtype(tmp_path, cli, monkeypatch):
    """Past the fp32 size limit, statistics come from the checkpoint's dtype (bf16 here).

    G=4: bf16 grouped matmuls on CPU need expert widths of a multiple of 8 (96 / 4 = 24).
    """
    from upcycle.methods import calibration

    monkeypatch.setattr(calibration, "FP32_LIMIT_BYTES", 0)
    src = save_tiny(str(tmp_path / "src"), "llama", tokenizer=True)
    moe, out = str(tmp_path / "moe"), str(tmp_path / "cal")
    data = _corpus(tmp_path / "data.txt")
    r = cli(
        "convert",
        src,
        moe,
        "--method",
        "granular",
        "-G",
        "4",
        "-k",
        "2",
        "--dtype",
        "bfloat16",
        "--partition",
        "coactivation",
        "--router-init",
        "activation",
        "--calibration-data",
        data,
        "-q",
    )
    assert r.code == 0, r
    assert calibration.load_for_calibration(moe).dtype == torch.bfloat16
    r = calibrate_small(cli, moe, out, data)
    assert r.code == 0, r
    assert all(0 <= x["oracle_overlap_after"] <= 1 for x in json.loads(r.out))
