"""Branch-Train-MiX: experts from N models, everything else averaged (upcycle.methods.btx)."""

import json
import os
import shutil

import pytest
import torch
from conftest import logits, save_tiny
from safetensors.torch import load_file
from test_bad_input import assert_one_line_error
from transformers import AutoModelForCausalLM

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama (SEED), and two more llamas of the same shapes but other random weights."""
    root = tmp_path_factory.mktemp("btx")
    return {
        name: save_tiny(str(root / name), "llama", seed=seed)
        for name, seed in (("seed", 0), ("a", 1), ("b", 2))
    }


def _weights(folder: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


@pytest.mark.parametrize(
    "target,arch", [("mixtral", "MixtralForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM")]
)
def test_identical_models_give_the_dense_model(models, cli, tmp_path, target, arch):
    copies = []
    for e in range(3):  # three separate folders, so every tensor is really read three times
        copies.append(str(tmp_path / f"copy{e}"))
        shutil.copytree(models["seed"], copies[-1])
    out = str(tmp_path / "moe")
    args = [a for c in copies for a in ("--experts-from", c)]
    r = cli("convert", models["seed"], out, "--method", "btx", "--target", target, "-q", *args)
    assert r.code == 0, r
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == arch
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg.get("num_local_experts", cfg.get("num_experts")) == 3
    torch.testing.assert_close(logits(out, IDS), logits(models["seed"], IDS), atol=1e-5, rtol=0)
    got, dense = _weights(out), _weights(models["seed"])
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert torch.equal(got[name], dense[name])  # the average of equal tensors, bit for bit
    prov = json.load(open(os.path.join(out, "upcycle.json")))
    assert prov["method"] == "btx" and prov["options"]["experts_from"] == copies


@pytest.mark.parametrize("weights", [None, (3.0, 1.0)])
def test_different_models_experts_and_averages(models, cli, tmp_path, weights):
    a, b = models["a"], models["b"]
    out = str(tmp_path / "moe")
    extra = ["--weights", ",".join(map(str, weights))] if weights else []
    r = cli("convert", models["seed"], out, "--method", "btx", "--experts-from", a,
            "--experts-from", b, "-k", "1", "-q", *extra)  # fmt: skip
    assert r.code == 0, r
    got, wa, wb = _weights(out), _weights(a), _weights(b)
    p = "model.layers.1."
    for e, src in enumerate((wa, wb)):  # expert e is model e's FFN, bit for bit
        assert torch.equal(
            got[p + f"block_sparse_moe.experts.{e}.w1.weight"], src[p + "mlp.gate_proj.weight"]
        )
        assert torch.equal(
            got[p + f"block_sparse_moe.experts.{e}.w3.weight"], src[p + "mlp.up_proj.weight"]
        )
        assert torch.equal(got[p + f"block_sparse_moe.experts.{e}.w2.weight"], src[p + "mlp.down_proj.weight"])  # fmt: skip
    wa_, wb_ = (0.75, 0.25) if weights else (0.5, 0.5)
    for name in (p + "self_attn.q_proj.weight", p + "input_layernorm.weight", "model.norm.weight",
                 "model.embed_tokens.weight"):  # fmt: skip
        torch.testing.assert_close(got[name], wa_ * wa[name] + wb_ * wb[name], atol=1e-6, rtol=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()
    assert json.load(open(os.path.join(out, "upcycle.json")))["options"]["weights"] == (
        list(weights) if weights else []
    )


def test_hidden_router_rows_from_each_model(tmp_path, cli):
    """--router-init hidden: one prompt set per model; identical models stay exact."""
    seed = save_tiny(str(tmp_path / "seed"), "llama", tokenizer=True)
    copy = str(tmp_path / "copy")
    shutil.copytree(seed, copy)
    out = str(tmp_path / "moe")
    r = cli("convert", seed, out, "--method", "btx", "--experts-from", seed, "--experts-from",
            copy, "--router-init", "hidden", "--expert-prompts", "the cat sat",
            "--expert-prompts", "def return import", "-k", "1", "-q")  # fmt: skip
    assert r.code == 0, r
    router = _weights(out)["model.layers.0.block_sparse_moe.gate.weight"]
    torch.testing.assert_close(router.norm(dim=1), torch.ones(2))  # centered, unit rows
    torch.testing.assert_close(logits(out, IDS), logits(seed, IDS), atol=1e-5, rtol=0)


def _btx(cli, seed, out, *paths, extra=()):
    args = [a for p in paths for a in ("--experts-from", p)]
    return cli("convert", seed, out, "--method", "btx", *args, *extra)


def test_bad_input_is_one_line_and_writes_nothing(models, cli, tmp_path):
    seed, a = models["seed"], models["a"]
    out = tmp_path / "out"
    wide = save_tiny(str(tmp_path / "wide"), "llama", intermediate_size=128)
    r = _btx(cli, seed, str(out), a, wide)
    assert_one_line_error(r, wide, "mlp.down_proj.weight", "[64, 128]", "[64, 96]")
    other = save_tiny(str(tmp_path / "qwen"), "qwen2", tie_word_embeddings=True)
    assert_one_line_error(_btx(cli, seed, str(out), a, other), other, "model_type qwen2", "llama")
    assert_one_line_error(_btx(cli, seed, str(out), a), "at least 2", "got 1")
    assert_one_line_error(cli("convert", seed, str(out), "--method", "btx"), "--experts-from")
    r = _btx(cli, seed, str(out), a, a, extra=("--weights", "1,2,3"))
    assert_one_line_error(r, "--weights", "(2)", "got 3")
    assert_one_line_error(_btx(cli, seed, str(out), a, a, extra=("--weights", "1,0")), "positive")
    assert_one_line_error(_btx(cli, seed, str(out), a, a, extra=("-E", "3")), "--num-experts")
    assert_one_line_error(_btx(cli, seed, str(out), a, a, extra=("-k", "3")), "--top-k")
    r = cli("convert", seed, str(out), "--method", "copy", "--experts-from", a)
    assert_one_line_error(r, "--experts-from applies to --method btx")
    assert not out.exists()
