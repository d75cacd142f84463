"""upcycle prune, layer by layer: the layer-at-a-time runner, per-layer expert counts
(--pyramid, --layers) in upcycle_moe, and the random floor (--by random)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_prune import (
    IDS,
    NOISY,
    _convert,
    check_output,
    dense_sources,
    out_logits,
    prune,
    reference_logits,
)
from test_upcycle_moe_modeling import LOAD
from transformers import AutoModelForCausalLM

import upcycle.modeling  # noqa: F401  (registers upcycle_moe)
from upcycle.io.checkpoint import Checkpoint
from upcycle.prune.experts import combine, combine_in_place, read_experts
from upcycle.prune.layerwise import BATCH_ROWS, LayerRunner
from upcycle.prune.plan import pyramid, read_layout
from upcycle.prune.select import ExpertPlan


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from conftest import run_cli as cli

    root = tmp_path_factory.mktemp("prune_layers")
    base = dense_sources(root, num_hidden_layers=4)
    llama, gemma = base["llama"], base.pop("gemma_dense")
    return {
        **base,
        "copy": _convert(
            cli, llama, str(root / "copy"), "-E", "6", "-k", "2", "--target", "upcycle_moe"
        ),
        "noisy": _convert(cli, llama, str(root / "noisy"), *NOISY, "--target", "upcycle_moe"),
        "gemma": _convert(cli, gemma, str(root / "gemma_moe"), *NOISY),
    }


@pytest.mark.parametrize("name", ["mixtral", "gemma"])
def test_the_layer_runner_computes_the_loaded_models_layers(models, name):
    """Each layer run alone on the recorded arguments (Gemma 3: sliding and global layers, their
    own masks and rotary embeddings) gives the loaded model's layer outputs."""
    ckpt = Checkpoint(models[name])
    layout = read_layout(ckpt)
    ids = torch.randint(3, 128, (5, 24), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
    want = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda _m, _a, out, i=i: want.setdefault(i, []).append(out))
    with torch.no_grad():
        for s in range(0, 5, BATCH_ROWS):  # the runner's batches
            model(input_ids=ids[s : s + BATCH_ROWS], use_cache=False)
    runner = LayerRunner(ckpt, layout, ids)
    assert len(runner.hidden) == -(-5 // BATCH_ROWS)
    for i in range(layout.num_layers):
        runner.load(i, lambda j: read_experts(ckpt, layout, j, torch.float32))
        runner.run(i, advance=True)
        runner.release(i)
        for got, ref in zip(runner.hidden, want[i], strict=True):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert all(p.device.type == "meta" for p in runner.layers[i].parameters())


def test_the_runner_keeps_each_blocks_arguments_once(models):
    """Blocks of one length get equal masks and rotary embeddings: the recorded calls share
    the first block's tensors instead of holding a copy per block."""
    ckpt = Checkpoint(models["gemma"])
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    runner = LayerRunner(ckpt, read_layout(ckpt), ids)

    def tensors(call):
        found = []

        def walk(x):
            if isinstance(x, torch.Tensor):
                found.append(x)
            elif isinstance(x, (tuple, list)):
                for y in x:
                    walk(y)
            elif isinstance(x, dict):
                for y in x.values():
                    walk(y)

        walk(call)
        return found

    for calls in runner.calls:
        first = tensors(calls[0])
        assert first  # rotary embeddings at least
        for call in calls[1:]:
            assert all(a is b for a, b in zip(tensors(call), first, strict=True))


def test_blas_buffers_go_uncached_only_before_torch_loads():
    """`upcycle prune` asks MKL not to cache GEMM buffers; MKL reads that when torch loads."""
    code = (
        "import os\n"
        "from upcycle.train.memory import uncached_blas\n"
        "first = uncached_blas()\n"
        "import torch\n"
        "print(first, os.environ['MKL_DISABLE_FAST_MM'], uncached_blas())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "1", "False"]


def _random_plan(rng, num, n, merge):
    """n output experts from num: single members, or disjoint clusters covering them all."""
    order = rng.permutation(num).tolist()
    if not merge:
        return ExpertPlan([[e] for e in order[:n]], [[1.0]] * n)
    cuts = sorted(rng.choice(range(1, num), n - 1, replace=False).tolist())
    members = [order[a:b] for a, b in zip([0, *cuts], [*cuts, num], strict=True)]
    weights = [(w / w.sum()).tolist() for w in (rng.random(len(m)) for m in members)]
    return ExpertPlan(members, weights)


@pytest.mark.parametrize("merge", [False, True])
def test_reducing_in_place_gives_what_is_written(merge):
    """combine_in_place (the statistics' prune, in the layer's own memory) makes the same bits
    as combine (the writer's), for selections in any order and merges whose rows move along
    chains and cycles."""
    rng = torch.Generator().manual_seed(0)
    np_rng = np.random.default_rng(0)
    for trial in range(200):
        num = int(np_rng.integers(2, 9))
        n = int(np_rng.integers(1, num + 1))
        plan = _random_plan(np_rng, num, n, merge)
        t = torch.randn(num, 3, 4, generator=rng)
        want = combine(t, plan)
        got = combine_in_place(t, plan)
        assert got.data_ptr() == t.data_ptr(), trial
        assert torch.equal(got, want), (trial, plan)


def test_pyramid_on_upcycle_moe_lists_the_counts_and_stays_exact(cli, models, tmp_path):
    """Merging identical copies keeps the dense function at any count per layer."""
    out = str(tmp_path / "pyramid")
    record = prune(cli, models["copy"], out, models["data"], "--experts", "2", "--pyramid")
    counts = pyramid(2, 6, 4)
    assert counts == [2, 3, 5, 6]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["layer_experts"] == counts and cfg["num_experts"] == 6
    assert record["layer_experts"] == {"from": [6] * 4, "to": counts}
    assert [record["layers"][str(i)]["experts"] for i in range(4)] == counts
    dense = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        want = dense(IDS).logits
    torch.testing.assert_close(out_logits(out)[1], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("by", ["frequency", "merge"])
def test_per_layer_counts_compute_the_recorded_choices(cli, models, tmp_path, by):
    out = str(tmp_path / "out")
    args = ("--experts", "2", "--pyramid", "--by", by, "--width", "0.5")
    record = prune(cli, models["noisy"], out, models["data"], *args)
    assert record["layer_experts"]["to"] == [2, 3, 5, 6]
    torch.testing.assert_close(
        out_logits(out)[1], reference_logits(models["noisy"], out, record), atol=1e-5, rtol=0
    )
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    loss = model(IDS, labels=IDS, output_router_logits=True)
    assert torch.isfinite(loss.aux_loss) and torch.isfinite(loss.loss)
    assert [b.gate.out_features for b in model.moe_blocks()] == [2, 3, 5, 6]


def test_a_layer_subset_then_every_layer(cli, models, tmp_path):
    """--layers keeps the other layers' experts; pruning that model again to one count for all
    layers drops the list."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    record = prune(cli, models["noisy"], first, models["data"], "--experts", "3", "--layers", "1-2")
    assert json.load(open(os.path.join(first, "config.json")))["layer_experts"] == [6, 3, 3, 6]
    assert list(record["layers"]["0"]) == ["experts"]  # untouched: nothing measured there
    torch.testing.assert_close(
        out_logits(first)[1], reference_logits(models["noisy"], first, record), atol=1e-5, rtol=0
    )
    record = prune(cli, first, second, models["data"], "--experts", "2", "--by", "uncurl")
    cfg = json.load(open(os.path.join(second, "config.json")))
    assert cfg["num_experts"] == 2 and "layer_experts" not in cfg
    assert record["layer_experts"] == {"from": [6, 3, 3, 6], "to": [2, 2, 2, 2]}
    prov = json.load(open(os.path.join(second, "upcycle.json")))
    assert len(prov["prune"]) == 2
    check_output(first, second, record, "upcycle_moe", 2)


def test_per_layer_counts_load_without_upcycle(cli, models, tmp_path):
    """The folder carries modeling code that knows `layer_experts` (the installed code, not the
    source's copy): stock transformers loads it with trust_remote_code and generates."""
    out = str(tmp_path / "pyramid")
    prune(cli, models["noisy"], out, models["data"], "--experts", "2", "--pyramid")
    job = dict(folder=out, ids=IDS.tolist(), new_tokens=4, result=str(tmp_path / "r.safetensors"))
    with open(tmp_path / "jobs.json", "w") as f:
        json.dump([job], f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    r = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path / "jobs.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    got = load_file(job["result"])["logits"]
    torch.testing.assert_close(got, out_logits(out)[1], atol=1e-5, rtol=0)


def test_random_is_seeded_per_layer(cli, models, tmp_path):
    def kept(seed, name):
        record = prune(
            cli, models["mixtral"], str(tmp_path / name), models["data"],
            "--experts", "2", "--by", "random", "--seed", str(seed),
        )  # fmt: skip
        assert record["criterion"] == "random"
        return [record["layers"][str(i)]["kept"] for i in range(4)]

    a, b, c = kept(0, "a"), kept(0, "b"), kept(1, "c")
    assert a == b and a != c
    assert len({tuple(k) for k in a}) > 1  # layers draw apart
    assert all(len(k) == 2 and k == sorted(k) for k in a + c)


def test_stock_classes_refuse_per_layer_counts(cli, models, tmp_path):
    out = str(tmp_path / "out")
    r = cli("prune", models["mixtral"], out, "--data", models["data"], "--experts", "2",
            "--pyramid", "-q")  # fmt: skip
    assert r.code != 0 and "--target upcycle_moe" in r.err and len(r.err.strip().splitlines()) == 1
    assert not os.path.exists(out)
