"""Branch-Attend-Mix: FFN and soft-routed attention experts from N models (--method bam)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import logits, save_tiny
from safetensors.torch import load_file
from test_bad_input import assert_one_line_error
from test_btx import _weights
from transformers import AutoModelForCausalLM

import upcycle.modeling  # noqa: F401  (registers upcycle_bam with the Auto classes)

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny llamas and qwen2s (q, k, v biases): a seed and two others with other weights."""
    root = tmp_path_factory.mktemp("bam")
    return {
        (family, name): save_tiny(str(root / f"{family}-{name}"), family, seed=seed)
        for family in ("llama", "qwen2")
        for name, seed in (("seed", 0), ("a", 1), ("b", 2))
    }


def _convert(cli, seed, out, members, *extra):
    args = [a for m in members for a in ("--experts-from", m)]
    r = cli("convert", seed, out, "--method", "bam", "-q", *args, *extra)
    assert r.code == 0, r
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["full", "shared-kv"])
def test_identical_models_give_the_dense_model(models, cli, tmp_path, family, kind):
    seed = models[family, "seed"]
    copies = []
    for e in range(3):
        copies.append(shutil.copytree(seed, str(tmp_path / f"copy{e}")))
    out = _convert(cli, seed, str(tmp_path / "bam"), copies, "--attention-experts", kind)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "UpcycleBamForCausalLM"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_attention_experts"] == 3 and cfg["num_local_experts"] == 3
    assert cfg["attention_experts"] == kind.replace("-", "_")
    assert cfg["qkv_bias"] == (family == "qwen2")
    torch.testing.assert_close(logits(out, IDS), logits(seed, IDS), atol=1e-5, rtol=0)
    dense = AutoModelForCausalLM.from_pretrained(seed).eval()
    prompt = IDS[:1, :5]
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **greedy), dense.generate(prompt, **greedy))


def _reference_attention(member_dirs, kind, layer, x, router):
    """sum_a softmax(router x)_a * attention_a(x), each expert run as its own dense attention."""
    denses = [AutoModelForCausalLM.from_pretrained(m).eval() for m in member_dirs]
    attns = [d.model.layers[layer].self_attn for d in denses]
    if kind == "shared-kv":  # every expert uses the averaged k and v
        for proj in ("k_proj", "v_proj"):
            mean = {
                k: torch.stack([getattr(a, proj).state_dict()[k] for a in attns]).mean(0)
                for k in getattr(attns[0], proj).state_dict()
            }
            for a in attns:
                getattr(a, proj).load_state_dict(mean)
    pos = torch.arange(x.shape[1])[None]
    cos_sin = denses[0].model.rotary_emb(x, pos)
    weights = torch.softmax(x @ router.T, dim=-1)
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    outs = [a(x, position_embeddings=cos_sin, attention_mask=mask)[0] for a in attns]
    return sum(w.unsqueeze(-1) * o for w, o in zip(weights.unbind(-1), outs, strict=True)), cos_sin


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["full", "shared-kv"])
def test_attention_experts_are_the_models_attentions_mixed_by_the_router(
    models, cli, tmp_path, family, kind
):
    members = [models[family, n] for n in ("seed", "a", "b")]
    out = _convert(
        cli, members[0], str(tmp_path / "bam"), members, "--attention-experts", kind,
        "--router-init", "random", "--router-std", "0.5",
    )  # fmt: skip
    bam = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    attn = bam.model.layers[1].self_attn
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, cos_sin = _reference_attention(members, kind, 1, x, attn.router.weight)
        mask = torch.full((7, 7), float("-inf")).triu(1)[None, None]
        got = attn(x, position_embeddings=cos_sin, attention_mask=mask)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    got_w, src = _weights(out), [_weights(m) for m in members]
    p = "model.layers.0."
    for e, w in enumerate(src):  # FFN expert e is model e's FFN
        gate_up = got_w[p + "mlp.experts.gate_up_proj"][e]
        assert torch.equal(gate_up[:96], w[p + "mlp.gate_proj.weight"])
        assert torch.equal(gate_up[96:], w[p + "mlp.up_proj.weight"])
        assert torch.equal(got_w[p + "mlp.experts.down_proj"][e], w[p + "mlp.down_proj.weight"])


def test_parallel_attention_reads_the_layer_input(models, cli, tmp_path):
    members = [models["llama", n] for n in ("seed", "a")]
    out = _convert(cli, members[0], str(tmp_path / "bam"), members, "--parallel-attention")
    bam = AutoModelForCausalLM.from_pretrained(out).eval()
    assert bam.config.parallel_attention
    layer = bam.model.layers[0]
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(5)[None]
    cos_sin = bam.model.rotary_emb(x, pos)
    mask = torch.full((5, 5), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        attn = layer.self_attn(layer.input_layernorm(x), cos_sin, mask)[0]
        want = x + attn + layer.mlp(layer.post_attention_layernorm(x))
        got = layer(x, position_embeddings=cos_sin, attention_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


_LOAD_WITHOUT_UPCYCLE = """
import importlib.abc, sys, torch
class NoUpcycle(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "upcycle" or name.startswith("upcycle."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoUpcycle())
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "upcycle" not in sys.modules and type(model).__name__ == "UpcycleBamForCausalLM"
assert model.__module__.startswith("transformers_modules"), model.__module__
ids = torch.tensor([[1, 5, 9, 3]])
with torch.no_grad():
    save_file({"logits": model(ids).logits.contiguous()}, sys.argv[2])
print(model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1])
"""


def test_loads_with_remote_code_where_upcycle_is_not_installed(models, cli, tmp_path):
    members = [models["qwen2", n] for n in ("seed", "a", "b")]
    out = _convert(cli, members[0], str(tmp_path / "bam"), members, "--router-init", "random")
    assert {"configuration_upcycle_bam.py", "modeling_upcycle_bam.py"} <= set(os.listdir(out))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    saved = str(tmp_path / "logits.safetensors")
    r = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_UPCYCLE, out, saved],
        capture_output=True, text=True, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "7"  # 4 prompt tokens + 3 generated
    want = AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor([[1, 5, 9, 3]])).logits
    torch.testing.assert_close(load_file(saved)["logits"], want.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--attention-experts", "half"], "unknown --attention-experts 'half'"),
        (["--target", "qwen2_moe"], "--method bam writes its own architecture"),
        (["--moe-layers", "0"], "makes every layer an MoE layer"),
    ],
)
def test_bad_options_are_one_line_errors(models, cli, tmp_path, extra, message):
    members = [models["llama", n] for n in ("seed", "a")]
    args = [a for m in members for a in ("--experts-from", m)]
    r = cli("convert", members[0], str(tmp_path / "out"), "--method", "bam", *args, *extra)
    assert_one_line_error(r, message)
    assert not os.path.exists(tmp_path / "out")


def test_bam_options_need_bam(models, cli, tmp_path):
    members = [models["llama", n] for n in ("seed", "a")]
    args = [a for m in members for a in ("--experts-from", m)]
    r = cli("convert", members[0], str(tmp_path / "o"), "--method", "btx", "--parallel-attention",
            *args)  # fmt: skip
    assert_one_line_error(r, "--parallel-attention applies to --method bam")


def test_experts_lora_on_bam_trains_both_routers_and_merges_exactly(models, cli, tmp_path):
    """LoRA on the FFN experts, trained FFN and attention routers, LoRA on the stacked attention
    projections: `upcycle merge` folds all of it back into an upcycle_bam checkpoint."""
    import upcycle.adapters as A
    from peft import get_peft_model

    members = [models["llama", n] for n in ("seed", "a", "b")]
    bam = _convert(cli, members[0], str(tmp_path / "bam"), members, "--attention-experts",
                   "shared-kv", "--router-init", "random")  # fmt: skip
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(bam), A.MixLoraConfig(mode="experts", r=4)
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("self_attn.router.mixlora_router" in n for n in trainable)
    assert any("mlp.gate.mixlora_router" in n for n in trainable)
    assert any("gate_up_A" in n for n in trainable) and any("q_proj" in n for n in trainable)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    assert (want - logits(bam, IDS)).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "run")
    r = cli("merge", tmp_path / "run", tmp_path / "out", "-q")
    assert r.code == 0, r.err
    assert json.load(open(tmp_path / "out" / "config.json"))["model_type"] == "upcycle_bam"
    assert (logits(str(tmp_path / "out"), IDS) - want).abs().max() <= 1e-4


@pytest.mark.parametrize("mode", ["full", "router", "experts-lora"])
def test_train_and_merge_a_bam_model(cli, tmp_path, mode):
    """upcycle train (every weight, only the FFN and attention routers, or LoRA experts) on a
    BAM model, then upcycle merge: the merged upcycle_bam checkpoint loads and differs."""
    from test_train import write_data

    seeds = [save_tiny(str(tmp_path / f"m{s}"), "llama", seed=s, tokenizer=True) for s in (0, 1)]
    bam = _convert(cli, seeds[0], str(tmp_path / "bam"), seeds, "--router-init", "random")
    data = write_data(tmp_path)
    run, out = tmp_path / "run", tmp_path / "out"
    r = cli("train", bam, run, "--data", data, "--adapter", mode, "--max-steps", "2",
            "--lr", "0.05", "--seq-len", "16", "--batch-size", "4", "-q")  # fmt: skip
    assert r.code == 0, r.err
    assert cli("merge", run, out, "-q").code == 0
    assert {"configuration_upcycle_bam.py", "modeling_upcycle_bam.py"} <= set(os.listdir(out))
    got, before = _weights(str(out)), _weights(bam)
    changed = {n for n in before if not torch.equal(got[n], before[n])}
    routers = {n for n in before if n.endswith(("mlp.gate.weight", "self_attn.router.weight"))}
    if mode == "router":
        assert changed == routers
    else:
        assert changed & routers and changed - routers
    assert (logits(str(out), IDS) - logits(bam, IDS)).abs().max() > 1e-4
