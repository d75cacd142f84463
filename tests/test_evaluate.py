"""Perplexity, routing statistics, the heatmap and `upcycle eval` on tiny models."""

import json
import math
import os

import pytest
import torch
from conftest import run_cli, save_tiny
from test_bad_input import assert_one_line_error

import upcycle.cli.evaluate  # noqa: F401  (registers `eval` until upcycle.cli imports it)
from upcycle.errors import InputError
from upcycle.evaluate.perplexity import evaluate, perplexity
from upcycle.evaluate.plot import plot_load_heatmap
from upcycle.evaluate.routing import RoutingRecorder

WORDS = "the cat sat on mat code python def return import".split()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny dense llama with tokenizer, its copy-upcycled mixtral, a zero-router one, a text."""
    root = tmp_path_factory.mktemp("eval")
    dense = save_tiny(str(root / "dense"), "llama", tokenizer=True)
    out = {"dense": dense, "root": root}
    for name, extra in [("moe", []), ("zeros", ["--router-init", "zeros"])]:
        out[name] = str(root / name)
        r = run_cli("convert", dense, out[name], "-E", "4", "-k", "2", "-q", *extra)
        assert r.code == 0, r
    g = torch.Generator().manual_seed(0)
    docs = [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (30,), generator=g).tolist())
        for _ in range(20)
    ]
    out["text"] = str(root / "docs.txt")
    with open(out["text"], "w") as f:
        f.write("\n\n".join(docs))
    return out


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def random_blocks(n=5, t=16, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_perplexity_matches_manual_computation(models):
    model, blocks = load(models["dense"]), random_blocks()
    result = perplexity(model, blocks, batch_size=2)  # uneven last batch
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=blocks).logits.double(), dim=-1)  # (N, T, V)
        nll = -logp[:, :-1].gather(-1, blocks[:, 1:, None]).mean()
        hf_loss = sum(model(input_ids=b[None], labels=b[None]).loss for b in blocks) / len(blocks)
    assert result["tokens"] == 5 * 15
    assert result["loss"] == pytest.approx(float(nll), abs=1e-5)
    assert result["loss"] == pytest.approx(float(hf_loss), abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert evaluate(model, blocks, batch_size=5)["routing"] is None


def test_copy_upcycled_moe_keeps_perplexity_and_routes_top_k(models):
    blocks = random_blocks(6)
    dense = perplexity(load(models["dense"]), blocks, batch_size=4)
    moe_model = load(models["moe"])
    moe = evaluate(moe_model, blocks, batch_size=4)
    assert moe["loss"] == pytest.approx(dense["loss"], abs=1e-5)
    routing = moe["routing"]
    assert routing["num_experts"] == 4 and routing["top_k"] == 2
    assert routing["moe_layers"] == [0, 1] and routing["shared_expert"] is False
    for layer in routing["layers"]:
        assert layer["tokens"] == 6 * 16  # the router sees every position, the last one too
        assert sum(layer["fraction"]) == pytest.approx(2.0)
        assert sum(layer["load"]) == pytest.approx(1.0)
        assert all(0 <= f <= 1 for f in layer["fraction"])
        assert 0 < layer["router_entropy"] <= math.log(4) + 1e-6
        assert 0 < layer["load_entropy"] <= math.log(4) + 1e-6
    json.dumps(routing)
    for block in (m for m in moe_model.modules() if hasattr(m, "experts")):
        assert not block.gate._forward_hooks  # the recorder removed its hooks


def test_routing_statistics_by_hand(models):
    """A zero router is uniform: entropy log E; fractions equal a count of the chosen experts."""
    model, blocks = load(models["zeros"]), random_blocks(2, 8)
    with RoutingRecorder(model) as rec:
        with torch.no_grad():
            out = model(input_ids=blocks, output_router_logits=True)
    stats = rec.stats()
    for layer, logits in zip(stats["layers"], out.router_logits, strict=True):
        assert layer["router_entropy"] == pytest.approx(math.log(4), abs=1e-6)
        chosen = torch.topk(torch.softmax(logits.float(), -1), 2, dim=-1).indices  # (T, 2)
        expected = torch.bincount(chosen.flatten(), minlength=4) / chosen.shape[0]
        assert layer["fraction"] == pytest.approx(expected.tolist())
        assert layer["max_load_ratio"] == pytest.approx(max(expected.tolist()) / 2 * 4)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_qwen2_moe_target_and_partial_moe_layers(models, tmp_path):
    out = str(tmp_path / "q")
    r = run_cli(
        "convert", models["dense"], out, "-E", "4", "-k", "2", "-q",
        "--target", "qwen2_moe", "--moe-layers", "1",
    )  # fmt: skip
    assert r.code == 0, r
    blocks = random_blocks(3)
    result = evaluate(load(out), blocks)
    assert result["routing"]["moe_layers"] == [1]
    assert result["routing"]["shared_expert"] is False  # zero-width shared expert
    assert result["loss"] == pytest.approx(
        perplexity(load(models["dense"]), blocks)["loss"], abs=1e-5
    )


def test_heatmap_png(models, tmp_path):
    stats = evaluate(load(models["moe"]), random_blocks(2))["routing"]
    path = plot_load_heatmap(stats, str(tmp_path / "h.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 1000
    with pytest.raises(InputError, match="no MoE layers"):
        plot_load_heatmap(None, str(tmp_path / "x.png"))


def test_cli_eval_json_dense_and_moe(models, cli, tmp_path):
    common = ["--data", models["text"], "--seq-len", "16", "--max-tokens", "96", "--json", "-q"]
    r = cli("eval", models["dense"], *common)
    assert r.code == 0, r
    dense = json.loads(r.out)
    assert dense["blocks"] == 6 and dense["tokens"] == 6 * 15 and dense["routing"] is None
    png = tmp_path / "h.png"
    r = cli("eval", models["moe"], *common, "--plot", str(png), "--batch-size", "4")
    assert r.code == 0, r
    moe = json.loads(r.out)
    assert moe["loss"] == pytest.approx(dense["loss"], abs=1e-5)
    assert len(moe["routing"]["layers"]) == 2 and moe["plot"] == str(png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_text_output(models, cli, tmp_path):
    r = cli(
        "eval", models["moe"], "--data", "builtin:prose", "--seq-len", "32", "--max-tokens", "64"
    )
    assert r.code == 0, r
    assert "perplexity" in r.out and "split heldout" in r.out
    assert "router-H" in r.out and len([x for x in r.out.splitlines() if x.startswith("    ")]) == 2
    assert "eval" in r.err  # progress bar on stderr
    png = tmp_path / "d.png"
    r = cli("eval", models["dense"], "--data", models["text"], "--seq-len", "16", "-q",
            "--max-tokens", "32", "--plot", str(png))  # fmt: skip
    assert r.code == 0 and "dense" in r.err and not png.exists(), r


def test_cli_eval_bad_input(models, cli, tmp_path):
    dense, text = models["dense"], models["text"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{nope\n')
    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    cases = [
        ((dense, "--data", str(tmp_path / "none.txt")), ["none.txt: no such file"]),
        ((dense, "--data", str(bad)), ["bad.jsonl:2", "invalid JSON"]),
        ((dense, "--data", "builtin:x"), ["unknown data alias"]),
        ((dense, "--data", text, "--split", "train"), ["--split"]),
        ((dense, "--data", text, "--seq-len", "512"), ["max_position_embeddings 128"]),
        ((dense, "--data", text, "--seq-len", "16", "--max-tokens", "8"), ["--max-tokens 8"]),
        ((dense, "--data", text, "--batch-size", "0"), ["--batch-size"]),
        ((dense, "--data", text, "--dtype", "int8"), ["--dtype"]),
        ((str(tmp_path / "nomodel"), "--data", text), ["no such file or directory"]),
        ((dense, "--data", str(short), "--seq-len", "100", "--max-tokens", "0"), ["fewer than"]),
    ]
    for args, words in cases:
        assert_one_line_error(cli("eval", *args), *words)
    notok = save_tiny(str(tmp_path / "notok"), "llama")
    assert_one_line_error(
        cli("eval", notok, "--data", text, "--seq-len", "16"), "no tokenizer files"
    )
