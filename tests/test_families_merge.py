"""Training and merging on the new families and on upcycle_moe outputs: MixLoRA runs on dense
gemma2, gemma3_text and phi3 merge into upcycle_moe exactly; experts-lora, full and router runs
on an upcycle_moe model merge back into it exactly."""

from __future__ import annotations

import json

import pytest
import torch
import upcycle.adapters as A
from conftest import run_cli, save_tiny, spy_on_final_model
from test_families_convert import FAMILIES
from test_train import write_data


def load(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=True)
    return model.eval()


def randomised_peft(base: str, config, seed: int = 1):
    """`base` with a peft adapter whose trainable weights are random (non-zero)."""
    from peft import get_peft_model

    model = get_peft_model(load(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "family,extra,kwargs",
    [
        ("gemma2", (), dict(num_experts=4, top_k=2)),
        ("gemma3_text", (), dict(num_experts=4, top_k=2)),
        ("phi3", (), dict(num_experts=4, top_k=2)),
        ("gemma3_text", (), dict(num_experts=8, top_k=3, expert_view="granular", granularity=4)),
        ("llama", ("--target", "upcycle_moe"), dict(num_experts=3, top_k=2)),
    ],
)
def test_mixlora_merges_into_upcycle_moe_exactly(tmp_path, cli, family, extra, kwargs):
    base = save_tiny(str(tmp_path / "base"), family, **FAMILIES.get(family, {}))
    model = randomised_peft(base, A.MixLoraConfig(r=4, **kwargs))
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "run")
    out = tmp_path / "out"
    r = cli("merge", tmp_path / "run", out, "-q", *extra)
    assert r.code == 0, r.err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["UpcycleMoeForCausalLM"] and cfg["base_model_type"] == family
    with torch.no_grad():
        got = load(str(out))(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-4


def test_experts_lora_on_upcycle_moe_merges_exactly(tmp_path, cli):
    """LoRA on each GeGLU expert of a Gemma-3 upcycle_moe model, folded back in place."""
    dense = save_tiny(str(tmp_path / "dense"), "gemma3_text", **FAMILIES["gemma3_text"])
    moe = str(tmp_path / "moe")
    assert cli("convert", dense, moe, "-E", "4", "-k", "2", "-q").code == 0
    model = randomised_peft(moe, A.MixLoraConfig(mode="experts", r=4), seed=3)
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        plain = load(moe)(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "run")
    r = cli("merge", tmp_path / "run", tmp_path / "out", "-q")
    assert r.code == 0, r.err
    with torch.no_grad():
        got = load(str(tmp_path / "out"))(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("mode", ["full", "router"])
def test_train_an_upcycle_moe_then_merge(tmp_path, monkeypatch, mode):
    dense = save_tiny(str(tmp_path / "dense"), "gemma2", tokenizer=True, **FAMILIES["gemma2"])
    moe = str(tmp_path / "moe")
    # noisy copies: with identical experts the routers could not change the function
    r = run_cli("convert", dense, moe, "-E", "4", "-k", "2", "--expert-noise", "0.2", "-q")
    assert r.code == 0, r.err
    data = write_data(tmp_path, n=12)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    seen = spy_on_final_model(monkeypatch, ids)
    run = tmp_path / "run"
    r = run_cli("train", moe, run, "--data", data, "--adapter", mode, "--lr", "1e-2",
                "--max-steps", "3", "--seq-len", "16", "--batch-size", "4", "-q")  # fmt: skip
    assert r.code == 0, r.err
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["aux_loss"] > 0 for m in metrics if "loss" in m)  # the MoE's balance loss
    out = tmp_path / "merged"
    r = run_cli("merge", run, out, "-q")
    assert r.code == 0, r.err
    with torch.no_grad():
        got = load(str(out))(input_ids=ids).logits
        before = load(moe)(input_ids=ids).logits
    assert (got - seen["logits"]).abs().max() < 1e-5
    assert (got - before).abs().max() > 1e-4  # the run changed the model
