"""`upcycle merge`: MixLoRA runs fold exactly into stock MoE checkpoints, LoRA runs into dense."""

from __future__ import annotations

import json

import pytest
import torch
import upcycle.adapters as A
from conftest import logits, save_tiny
from test_bad_input import assert_one_line_error


def trained_run(tmp_path, family, config, seed=1):
    """A base checkpoint and a saved adapter with random (non-zero) weights; adapter logits."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = save_tiny(str(tmp_path / "base"), family)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    ids = torch.randint(0, 128, (2, 11), generator=g)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "run")
    return base, str(tmp_path / "run"), ids, want


@pytest.mark.parametrize(
    "family,kwargs,architecture",
    [
        ("llama", dict(num_experts=4, top_k=2), "MixtralForCausalLM"),
        ("mistral", dict(num_experts=3, top_k=1), "MixtralForCausalLM"),
        ("qwen2", dict(num_experts=4, top_k=2), "Qwen2MoeForCausalLM"),
        ("qwen3", dict(num_experts=4, top_k=3), "Qwen3MoeForCausalLM"),
        (
            "llama",
            dict(num_experts=8, top_k=3, expert_view="granular", granularity=4),
            "MixtralForCausalLM",
        ),
        (
            "llama",
            dict(num_experts=4, top_k=2, layers_to_transform=[1], target_modules=["up_proj"]),
            "MixtralForCausalLM",
        ),
    ],
)
def test_mixlora_merge_is_exact(tmp_path, cli, family, kwargs, architecture):
    config = A.MixLoraConfig(r=4, **kwargs)
    _, run, ids, want = trained_run(tmp_path, family, config)
    out = str(tmp_path / "out")
    r = cli("merge", run, out, "-q")
    assert r.code == 0, r.err
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == [architecture]
    assert "auto_map" not in cfg
    got = logits(out, ids)
    assert (got - want).abs().max() <= 1e-4


def test_lora_merge_gives_the_dense_model(tmp_path, cli):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"])
    base, run, ids, want = trained_run(tmp_path, "qwen2", config)
    r = cli("merge", run, str(tmp_path / "out"), "-q", "--dtype", "float32")
    assert r.code == 0, r.err
    base_cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["architectures"] == base_cfg["architectures"]
    assert (logits(str(tmp_path / "out"), ids) - want).abs().max() <= 1e-4


def test_merge_bad_input(tmp_path, cli):
    _, run, _, _ = trained_run(tmp_path, "qwen2", A.MixLoraConfig(num_experts=2, top_k=1, r=2))
    other = save_tiny(str(tmp_path / "other"), "qwen2", seed=5)
    out = tmp_path / "out"
    assert_one_line_error(cli("merge", str(tmp_path / "nope"), str(out)), "no such adapter")
    assert_one_line_error(cli("merge", other, str(out)), "no adapter_config.json")
    r = cli("merge", run, str(out), "--base", other)
    assert_one_line_error(r, "trained on another base model")
    assert_one_line_error(cli("merge", run, str(out), "--target", "qwen3_moe"), "qwen3_moe")
    cfg_path = tmp_path / "run" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    (tmp_path / "run" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    assert_one_line_error(cli("merge", run, str(out)), "not a readable safetensors file")
    cfg["peft_type"] = "IA3"
    cfg_path.write_text(json.dumps(cfg))
    assert_one_line_error(cli("merge", run, str(out)), "cannot merge a IA3 adapter")
    assert not out.exists()


def test_loading_an_adapter_on_another_base_fails(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run, _, _ = trained_run(tmp_path, "llama", A.MixLoraConfig(num_experts=2, top_k=1, r=2))
    other = AutoModelForCausalLM.from_pretrained(
        save_tiny(str(tmp_path / "other"), "llama", seed=7)
    )
    with pytest.raises(ValueError, match="trained on another base model"):
        PeftModel.from_pretrained(other, run)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_experts_lora_on_a_converted_moe_merges_exactly(tmp_path, cli, family):
    """LoRA on each expert of an upcycled MoE plus a trained router, folded back in place."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    dense = save_tiny(str(tmp_path / "dense"), family)
    moe = str(tmp_path / "moe")
    assert cli("convert", dense, moe, "-E", "4", "-k", "2", "-q").code == 0
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(moe), A.MixLoraConfig(mode="experts", r=4)
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("mixlora_router" in n for n in trainable)
    assert any("gate_up_A" in n for n in trainable) and any("q_proj" in n for n in trainable)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    ids = torch.randint(0, 128, (2, 9), generator=g)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(moe)(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "run")
    r = cli("merge", tmp_path / "run", tmp_path / "out", "-q")
    assert r.code == 0, r.err
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        cfg["architectures"]
        == json.loads((tmp_path / "moe" / "config.json").read_text())["architectures"]
    )
    assert (logits(str(tmp_path / "out"), ids) - want).abs().max() <= 1e-4


def test_experts_lora_layer_matches_naive_experts():
    """ExpertsLora's sorted-token computation equals per-token merged experts (and grads)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from upcycle.adapters.layers import ExpertsLora

    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=24, intermediate_size=20, num_local_experts=5, num_experts_per_tok=2
    )
    block = MixtralSparseMoeBlock(cfg).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
        p.requires_grad_(False)
    layer = ExpertsLora(
        block.experts, "default", A.MixLoraConfig(mode="experts", r=3, lora_dropout=0.0)
    )
    layer.double()
    with torch.no_grad():
        for p in layer.mixlora_experts.parameters():
            p.normal_(std=0.3)
    x = torch.randn(13, 24, dtype=torch.float64, requires_grad=True)
    _, w, ids = block.gate(x)
    w = w.detach().double()
    ex = layer.mixlora_experts["default"]
    s = layer.scaling["default"]
    y = layer(x, ids, w)
    ref = torch.zeros_like(x)
    for t in range(13):
        for k in range(2):
            e = int(ids[t, k])
            gu = block.experts.gate_up_proj[e] + s * ex.gate_up_B[e] @ ex.gate_up_A[e]
            d = block.experts.down_proj[e] + s * ex.down_B[e] @ ex.down_A[e]
            g_, u_ = (gu @ x[t]).chunk(2)
            ref[t] = ref[t] + w[t, k] * (d @ (torch.nn.functional.silu(g_) * u_))
    torch.testing.assert_close(y, ref)
    params = [x, *ex.parameters()]
    for a, b in zip(
        torch.autograd.grad(y.sum(), params), torch.autograd.grad(ref.sum(), params), strict=True
    ):
        torch.testing.assert_close(a, b)
