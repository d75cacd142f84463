"""Read-ME (--method readme): domain-mask experts, a residual expert and one pre-gating router."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import logits, save_tiny
from safetensors.torch import load_file
from test_bad_input import assert_one_line_error
from test_bam import _LOAD_WITHOUT_UPCYCLE
from test_btx import _weights
from transformers import AutoModelForCausalLM

import upcycle.modeling  # noqa: F401  (registers upcycle_readme with the Auto classes)

IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
DOMAINS = ("builtin:prose", "builtin:code")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("readme") / "llama"), "llama", tokenizer=True)


def _convert(cli, dense, out, *extra, data=DOMAINS):
    args = [a for d in data for a in ("--calibration-data", d)]
    if "--calibration-tokens" not in extra:
        extra = ("--calibration-tokens", "512", *extra)
    r = cli("convert", dense, out, "--method", "readme", "-q", *args, *extra)
    assert r.code == 0, r
    return out


@pytest.fixture(scope="module")
def converted(dense, tmp_path_factory):
    from conftest import run_cli

    return _convert(run_cli, dense, str(tmp_path_factory.mktemp("readme") / "moe"))


def test_keep_everything_is_the_dense_model(dense, cli, tmp_path):
    out = _convert(cli, dense, str(tmp_path / "moe"), "--keep", "1")
    report = json.load(open(os.path.join(out, "upcycle.json")))["report"]
    assert report["residual_width"] == 96  # every neuron is in every mask
    torch.testing.assert_close(logits(out, IDS), logits(dense, IDS), atol=1e-5, rtol=0)


def test_experts_are_the_masks_minus_their_intersection(dense, converted):
    cfg = json.load(open(os.path.join(converted, "config.json")))
    assert cfg["model_type"] == "upcycle_readme" and cfg["num_local_experts"] == 2
    assert cfg["num_experts_per_tok"] == 1 and cfg["auto_map"]
    got, src = _weights(converted), _weights(dense)
    width, shared = cfg["intermediate_size"], cfg["shared_expert_intermediate_size"]
    for i in range(2):
        p = f"model.layers.{i}."
        gate = src[p + "mlp.gate_proj.weight"]  # (96, 64): which rows went where
        rows = {tuple(r.tolist()): j for j, r in enumerate(gate)}

        def neurons(g, rows=rows):
            return [rows[tuple(r.tolist())] for r in g if r.abs().sum() > 0]

        residual = neurons(got[p + "mlp.shared_expert.gate_proj.weight"])
        experts = [neurons(got[p + "mlp.experts.gate_up_proj"][e, :width]) for e in range(2)]
        keep = 48  # --keep 0.5 of 96
        for e, ex in enumerate(experts):
            assert not set(ex) & set(residual) and len(ex) + len(residual) == keep
            gate_up = got[p + "mlp.experts.gate_up_proj"][e]
            up = src[p + "mlp.up_proj.weight"]
            down = src[p + "mlp.down_proj.weight"]
            assert torch.equal(gate_up[width : width + len(ex)], up[ex])
            assert torch.equal(got[p + "mlp.experts.down_proj"][e][:, : len(ex)], down[:, ex])
            assert not gate_up[len(ex) : width].any()  # padding neurons are zero
        assert not set(experts[0]) & set(experts[1])  # a neuron in both masks is residual
        assert len(residual) <= shared
        recorded = json.load(open(os.path.join(converted, "readme_neurons.json")))["layers"][i]
        assert recorded["residual"] == residual and recorded["experts"] == experts


def test_pre_gate_plans_every_layer_before_the_backbone(converted):
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    plan = model.plan_experts(IDS)
    assert plan.shape == (2, 2, 10, 1) and int(plan.max()) < 2
    assert torch.equal(plan[0], plan[1])  # one choice for every layer
    seen = []
    hook = model.model.layers[1].mlp.experts.register_forward_pre_hook(
        lambda _m, args: seen.append(args[1].reshape(2, 10, 1))
    )
    with torch.no_grad():
        model(IDS)
    hook.remove()
    assert torch.equal(seen[0], plan[1])


def test_generation_with_cache_routes_as_a_full_forward(converted):
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    with torch.no_grad():  # make routing depend on context: the pre-gate's layers leave identity
        for name, p in model.model.router.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    prompt = IDS[:1, :5]
    cached = model.generate(prompt, use_cache=True, **greedy)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **greedy))
    with torch.no_grad():
        full = model(cached).logits[:, 4:-1]
        steps = [model(cached[:, :5], use_cache=True)]
        cache = steps[0].cache
        for t in range(5, cached.shape[1] - 1):
            steps.append(model(cached[:, t : t + 1], cache=cache, use_cache=True))
    incremental = torch.cat([s.logits[:, -1:] for s in steps], 1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)


def test_one_dataset_is_clustered_into_domains(dense, cli, tmp_path):
    out = _convert(cli, dense, str(tmp_path / "moe"), "-E", "3", "--calibration-tokens", "2048",
                   data=("builtin",))  # fmt: skip
    report = json.load(open(os.path.join(out, "upcycle.json")))["report"]
    assert report["domains"] == 3 and min(report["blocks_per_domain"]) >= 1
    assert json.load(open(os.path.join(out, "config.json")))["num_local_experts"] == 3


def test_loads_with_remote_code_where_upcycle_is_not_installed(converted, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    saved = str(tmp_path / "logits.safetensors")
    r = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_UPCYCLE.replace("UpcycleBam", "UpcycleReadme"),
         converted, saved],
        capture_output=True, text=True, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    want = AutoModelForCausalLM.from_pretrained(converted).eval()(torch.tensor([[1, 5, 9, 3]]))
    torch.testing.assert_close(load_file(saved)["logits"], want.logits.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "needs --num-experts"),
        (["-E", "3", "--keep", "0"], "--keep must be in (0, 1]"),
        (["-E", "2", "--target", "mixtral"], "writes its own architecture"),
        (["-E", "2", "-k", "3"], "--top-k must be between 1 and 2"),
    ],
)
def test_bad_options_are_one_line_errors(dense, cli, tmp_path, extra, message):
    r = cli("convert", dense, str(tmp_path / "o"), "--method", "readme",
            "--calibration-data", "builtin", *extra)  # fmt: skip
    assert_one_line_error(r, message)
    assert not os.path.exists(tmp_path / "o")


def test_readme_needs_calibration_data_and_a_supported_family(cli, tiny, tmp_path):
    r = cli("convert", tiny("llama"), str(tmp_path / "o"), "--method", "readme")
    assert_one_line_error(r, "needs --calibration-data")
    r = cli("convert", tiny("qwen2"), str(tmp_path / "o"), "--method", "readme",
            "--calibration-data", "builtin", "-E", "2")  # fmt: skip
    assert_one_line_error(r, "supports llama and mistral")


def test_kmeans_is_deterministic_and_separates_clusters():
    from upcycle.methods.readme import _kmeans

    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.1, (20, 4)), rng.normal(5, 0.1, (20, 4))])
    a, b = _kmeans(points, 2, seed=3), _kmeans(points, 2, seed=3)
    assert np.array_equal(a, b) and len(set(a[:20])) == 1 and len(set(a[20:])) == 1
    assert a[0] != a[-1]


def test_eval_reports_the_pre_gate_routing(converted, cli):
    r = cli("eval", converted, "--data", "builtin:code", "--max-tokens", "256", "--seq-len", "64",
            "--json", "-q")  # fmt: skip
    assert r.code == 0, r.err
    routing = json.loads(r.out)["routing"]
    assert routing["num_experts"] == 2 and routing["top_k"] == 1 and routing["shared_expert"]
    layers = routing["layers"]
    assert [x["layer"] for x in layers] == [0, 1] and layers[0]["load"] == layers[1]["load"]
    assert abs(sum(layers[0]["load"]) - 1) < 1e-6 and layers[0]["tokens"] == 256


def test_router_mode_trains_the_pre_gate_only(converted, cli, tmp_path):
    """upcycle train --adapter router on a Read-ME model trains its pre-gating transformer with
    the LM loss (everything else frozen); merge writes it back."""
    from test_train import write_data

    run, out = tmp_path / "run", tmp_path / "out"
    r = cli("train", converted, run, "--data", write_data(tmp_path), "--adapter", "router",
            "--max-steps", "2", "--lr", "0.05", "--seq-len", "16", "--batch-size", "4", "-q")  # fmt: skip
    assert r.code == 0, r.err
    assert cli("merge", run, out, "-q").code == 0
    got, before = _weights(str(out)), _weights(converted)
    changed = {n for n in before if not torch.equal(got[n], before[n])}
    assert changed and all(n.startswith("model.router.") for n in changed)
