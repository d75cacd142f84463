"""Copy upcycling equals the dense model on every supported family and target (fp32 logits)."""

import json
import os

import pytest
import torch
from conftest import logits
from transformers import AutoModelForCausalLM

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

CASES = [
    ("llama", [], "MixtralForCausalLM"),
    ("llama-untied-rope3", [], "MixtralForCausalLM"),
    ("mistral", [], "MixtralForCausalLM"),
    ("qwen2", [], "Qwen2MoeForCausalLM"),
    ("qwen3", [], "Qwen3MoeForCausalLM"),
    ("llama", ["--target", "qwen2_moe"], "Qwen2MoeForCausalLM"),
    ("qwen2", ["--moe-layers", "1"], "Qwen2MoeForCausalLM"),
    ("qwen3", ["--moe-layers", "0", "--top-k", "1"], "Qwen3MoeForCausalLM"),
    ("llama", ["--router-init", "zeros", "-E", "3", "-k", "3"], "MixtralForCausalLM"),
]


@pytest.mark.parametrize("family,extra,arch", CASES, ids=[f"{c[0]}{''.join(c[1])}" for c in CASES])
def test_copy_upcycling_is_exact(tiny, cli, tmp_path, family, extra, arch):
    src = tiny(family)
    out = str(tmp_path / "moe")
    r = cli("convert", src, out, "-E", "4", "-k", "2", "--quiet", *extra)
    assert r.code == 0, r
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == arch
    torch.testing.assert_close(logits(out, IDS), logits(src, IDS), atol=1e-5, rtol=0)


def test_moe_layers_stay_dense_where_asked(tiny, cli, tmp_path):
    out = str(tmp_path / "moe")
    assert cli("convert", tiny("qwen2"), out, "--moe-layers", "1", "-q").code == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["mlp_only_layers"] == [0]
    assert cfg["norm_topk_prob"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].mlp).__name__ == "Qwen2MoeMLP"
    assert type(model.model.layers[1].mlp).__name__ == "Qwen2MoeSparseMoeBlock"


def test_expert_noise_breaks_symmetry(tiny, cli, tmp_path):
    src = tiny("llama")
    out = str(tmp_path / "moe")
    assert cli("convert", src, out, "--expert-noise", "0.05", "-q").code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    experts = model.model.layers[0].mlp.experts.gate_up_proj  # (E, 2I, H) in memory
    assert not torch.allclose(experts[0], experts[1])
    diff = (logits(out, IDS) - logits(src, IDS)).abs().max()
    assert 1e-4 < diff < 1.0


def test_config_fields(tiny, cli, tmp_path):
    out = str(tmp_path / "moe")
    assert (
        cli(
            "convert",
            tiny("llama"),
            out,
            "-E",
            "6",
            "-k",
            "3",
            "--router-aux-loss-coef",
            "0.01",
            "-q",
        ).code
        == 0
    )
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_local_experts"] == 6 and cfg["num_experts_per_tok"] == 3
    assert cfg["router_aux_loss_coef"] == 0.01 and cfg["output_router_logits"] is False
    assert cfg["tie_word_embeddings"] is True and cfg["head_dim"] == 16
    prov = json.load(open(os.path.join(out, "upcycle.json")))
    assert prov["method"] == "copy" and prov["options"]["num_experts"] == 6
    assert "MixtralForCausalLM" in open(os.path.join(out, "README.md")).read()


def test_qwen3_moe_config_names_experts_for_every_reader(tiny, cli, tmp_path):
    out = str(tmp_path / "moe")
    assert cli("convert", tiny("qwen3"), out, "-E", "4", "-q").code == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_experts"] == 4 and cfg["num_local_experts"] == 4


def test_output_keys_match_save_pretrained(tiny, cli, tmp_path):
    """Our per-expert layout is exactly what transformers' own save_pretrained writes."""
    from safetensors import safe_open

    for family in ("llama", "qwen2", "qwen3"):
        out = str(tmp_path / f"moe-{family}")
        assert cli("convert", tiny(family), out, "-E", "3", "-q").code == 0
        resaved = str(tmp_path / f"resaved-{family}")
        AutoModelForCausalLM.from_pretrained(out).save_pretrained(resaved)
        with (
            safe_open(os.path.join(out, "model.safetensors"), "pt") as a,
            safe_open(os.path.join(resaved, "model.safetensors"), "pt") as b,
        ):
            assert set(a.keys()) == set(b.keys())
            for k in a.keys():
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_hidden_router_init(tmp_path, cli):
    from conftest import save_tiny

    src = save_tiny(str(tmp_path / "src"), "llama", tokenizer=True)
    out = str(tmp_path / "moe")
    r = cli(
        "convert",
        src,
        out,
        "-E",
        "2",
        "-k",
        "1",
        "--router-init",
        "hidden",
        "--expert-prompts",
        "the cat sat on the mat",
        "--expert-prompts",
        "def python return import",
        "-q",
    )
    assert r.code == 0, r
    model = AutoModelForCausalLM.from_pretrained(out)
    gate = model.model.layers[1].mlp.gate.weight
    torch.testing.assert_close(gate.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(gate[0], -gate[1])  # two centered rows point in opposite directions
    torch.testing.assert_close(logits(out, IDS), logits(src, IDS), atol=1e-5, rtol=0)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_dtype_and_shards(tiny, cli, tmp_path):
    src = tiny("llama")
    out = str(tmp_path / "moe")
    assert (
        cli("convert", src, out, "--dtype", "bfloat16", "--max-shard-size", "100KB", "-q").code == 0
    )
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0].startswith("model-00001-of-")
    for shard in shards:
        assert os.path.getsize(os.path.join(out, shard)) < 100_000 + 8 * 96 * 64 * 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    dense = logits(src, IDS)
    assert (logits(out, IDS) - dense).abs().max() < 0.05 * dense.abs().max()
