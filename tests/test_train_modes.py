"""`upcycle train --adapter full|router`: training, exact merge, exact resume, bad options."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import run_cli, save_tiny, spy_on_final_model
from safetensors.torch import load_file
from test_bad_input import assert_one_line_error
from test_train import write_data

MOES = {
    "llama": {},  # dense (tied embeddings): full fine-tuning applies, router training does not
    # tied embeddings on mixtral: one parameter for input and output embeddings
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        tie_word_embeddings=False,
    ),
}
# the routers on disk (transformers writes Mixtral's mlp.gate as block_sparse_moe.gate)
ROUTERS = {
    "mixtral": {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)},
    "qwen2_moe": {
        f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in ("gate", "shared_expert_gate")
    },
}
# a few steps on one global batch; held-out data = training data, so the loss must go down
ARGS = ["--seq-len", "16", "--batch-size", "8", "--schedule", "constant", "-q"]
LR = {"full": "0.05", "router": "0.1"}


def moe_base(tmp_path, family: str) -> str:
    # larger initial weights than transformers' 0.02 make experts differ, so routing matters
    return save_tiny(
        str(tmp_path / family), family, tokenizer=True, initializer_range=0.2, **MOES[family]
    )


def weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors") and name.startswith("model"):
            out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.mark.parametrize(
    "family,mode",
    [
        ("mixtral", "full"),
        ("mixtral", "router"),
        ("qwen2_moe", "full"),
        ("qwen2_moe", "router"),
        ("llama", "full"),
    ],
)
def test_train_then_merge_is_exact(tmp_path, monkeypatch, family, mode):
    from transformers import AutoModelForCausalLM

    base = moe_base(tmp_path, family)
    data = write_data(tmp_path, n=12)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    seen = spy_on_final_model(monkeypatch, ids)
    run = tmp_path / "run"
    r = run_cli(
        "train", base, run, "--data", data, "--eval-data", data, "--adapter", mode,
        "--lr", LR[mode], "--max-steps", "4", "--save-steps", "2", *ARGS,
    )  # fmt: skip
    assert r.code == 0, r.err
    record = json.loads((run / "upcycle_train.json").read_text())
    assert record["final"]["eval_loss"] < record["final"]["eval_loss_before"] - 0.05
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    moe = family != "llama"  # MoEs train with their balance loss; a dense model has none
    assert all((m["aux_loss"] > 0) == moe for m in metrics if "loss" in m)
    step2 = run / "checkpoints" / "step-2"
    assert (step2 / "optimizer.safetensors").is_file() and (step2 / "trainer_state.json").is_file()
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in run.rglob("*"))

    if mode == "router":  # only the routers, under the base's own names
        saved = load_file(run / "routers.safetensors")
        assert set(saved) == ROUTERS[family] and (step2 / "routers.safetensors").is_file()
        assert not (run / "model.safetensors").exists()
    else:  # the whole model as save_pretrained writes it: a loadable folder
        assert json.loads((run / "config.json").read_text())["model_type"] == family
        assert ROUTERS.get(family, set()) <= set(weights(run))

    out = tmp_path / "merged"
    r = run_cli("merge", run, out, "-q")
    assert r.code == 0, r.err
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - seen["logits"]).abs().max() < 1e-5
    provenance = json.loads((out / "upcycle.json").read_text())
    assert provenance["method"] == f"{mode}-finetune" and provenance["source"]["path"] == base
    assert (out / "tokenizer.json").is_file()
    assert run_cli("merge", step2, tmp_path / "merged-2", "-q").code == 0  # a checkpoint merges too

    before, after = weights(base), weights(out)
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if mode == "router":
        assert changed == ROUTERS[family]  # every other tensor bit for bit
    else:
        assert changed == set(before)
        if family != "qwen2_moe":  # tied: one trained matrix is input and output embedding
            assert "lm_head.weight" not in after and model.config.tie_word_embeddings
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("mode", ["full", "router"])
def test_resume_gives_the_uninterrupted_weights(tmp_path, mode):
    """Resumed from its step-2 checkpoint (accumulation, warmup + cosine, checkpointed
    activations), a run ends with exactly the weights and losses of the uninterrupted one."""
    base = moe_base(tmp_path, "mixtral")
    data = write_data(tmp_path, n=24)
    args = [
        "--data", data, "--adapter", mode, "--lr", LR[mode], "--max-steps", "4",
        "--save-steps", "2", "--grad-accum", "2", "--warmup-steps", "1",
        "--gradient-checkpointing", "--seq-len", "16", "--batch-size", "2", "-q",
    ]  # fmt: skip
    whole = tmp_path / "whole"
    r = run_cli("train", base, whole, *args)
    assert r.code == 0, r.err
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    shutil.rmtree(part / "checkpoints" / "step-4")
    for name in os.listdir(part):
        if os.path.isfile(part / name) and name != "metrics.jsonl":
            (part / name).unlink()  # back to the state after an interruption at step 2
    r = run_cli("merge", part, tmp_path / "m")
    assert_one_line_error(r, "the run has not finished", "checkpoints/step-N")
    r = run_cli("train", base, part, *args, "--resume")
    assert r.code == 0, r.err

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(m["step"], m["loss"]) for m in map(json.loads, lines) if "loss" in m]

    assert losses(part) == losses(whole)
    name = "routers.safetensors" if mode == "router" else "model.safetensors"
    a, b = load_file(whole / name), load_file(part / name)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    a_state = json.loads((whole / "upcycle_train.json").read_text())
    b_state = json.loads((part / "upcycle_train.json").read_text())
    assert a_state["base_fingerprint"] == b_state["base_fingerprint"]


def test_weight_modes_refuse_lora_options_and_dense_routers(tmp_path):
    base = moe_base(tmp_path, "mixtral")
    dense = save_tiny(str(tmp_path / "dense"), "llama", tokenizer=True)
    data = write_data(tmp_path, n=12)
    out = tmp_path / "out"

    def train(model, *args):
        return run_cli("train", model, out, "--data", data, "--max-steps", "1", *ARGS, *args)

    assert_one_line_error(train(base, "--adapter", "full", "--r", "8"), "--r applies to the LoRA")
    assert_one_line_error(train(base, "--adapter", "router", "-E", "4"), "--num-experts/-E")
    assert_one_line_error(train(base, "--adapter", "router", "-k", "1"), "--top-k/-k")
    for flag in ("--alpha 8", "--dropout 0", "--target-modules q_proj", "--load-in-4bit"):
        r = train(base, "--adapter", "full", *flag.split())
        assert_one_line_error(r, flag.split()[0], "not to --adapter full")
    r = train(base, "--adapter", "router", "--expert-view", "granular")
    assert_one_line_error(r, "--expert-view applies to the LoRA adapters")
    assert train(base, "--adapter", "full", "--r", "16").code == 0  # the default is no change
    assert_one_line_error(
        train(dense, "--adapter", "router", "--force"),
        f"--adapter router: {dense} has no routers (not an MoE model)",
    )
    r = train(base, "--adapter", "router", "--resume", "--max-steps", "2")
    assert_one_line_error(r, "--resume: option adapter was 'full' and is now 'router'")
    assert_one_line_error(
        run_cli("merge", out, tmp_path / "m", "--target", "qwen2_moe"), "--target applies"
    )
    assert not (tmp_path / "m").exists()


CUSTOM_CODE = """
from transformers import MixtralConfig, MixtralForCausalLM


class TinyRemoteConfig(MixtralConfig):
    model_type = "tiny_remote_moe"


class TinyRemoteForCausalLM(MixtralForCausalLM):
    config_class = TinyRemoteConfig
"""


def test_custom_architecture_with_auto_map(tmp_path, monkeypatch):
    """A base whose config.json has auto_map (code shipped next to the weights, model_type
    unknown to transformers) trains, and merges into a folder that carries its code."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from upcycle.io.models import needs_remote_code

    base = tmp_path / "remote"
    base.mkdir()
    (base / "modeling_tiny_remote.py").write_text(CUSTOM_CODE)
    spec = importlib.util.spec_from_file_location(
        "tiny_remote_test", base / "modeling_tiny_remote.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from conftest import TINY, save_tiny_tokenizer

    config = module.TinyRemoteConfig(**{**TINY, **MOES["mixtral"]}, initializer_range=0.2)
    config.auto_map = {
        "AutoConfig": "modeling_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
    }
    torch.manual_seed(0)
    module.TinyRemoteForCausalLM(config).save_pretrained(base)
    (base / "modeling_tiny_remote.py").write_text(CUSTOM_CODE)
    save_tiny_tokenizer(str(base), TINY["vocab_size"])
    assert needs_remote_code(str(base))

    data = write_data(tmp_path, n=12)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    seen = spy_on_final_model(monkeypatch, ids)
    run = tmp_path / "run"
    args = ["--data", data, "--adapter", "router", "--lr", "0.1", "--max-steps", "2", *ARGS]
    refused = run_cli("train", base, tmp_path / "refused", *args)
    assert_one_line_error(refused, "pass --trust-remote-code")
    r = run_cli("train", base, run, *args, "--trust-remote-code")
    assert r.code == 0, r.err
    # custom code gets no load-time renaming: the routers keep their in-memory names
    assert set(load_file(run / "routers.safetensors")) == {
        f"model.layers.{i}.mlp.gate.weight" for i in range(2)
    }
    out = tmp_path / "merged"
    r = run_cli("merge", run, out, "-q")
    assert r.code == 0, r.err
    assert (out / "modeling_tiny_remote.py").is_file()
    assert json.loads((out / "config.json").read_text())["auto_map"] == config.auto_map
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "TinyRemoteForCausalLM"
    with torch.no_grad():
        assert (model(input_ids=ids).logits - seen["logits"]).abs().max() < 1e-5


def test_router_parameters_follow_the_module_name_rule():
    """gate (not gate_proj), router and shared_expert_gate modules hold routers."""
    from torch import nn

    from upcycle.train.strategies.router import router_parameters

    layer = nn.Module()
    layer.self_attn = nn.Module()
    layer.self_attn.router = nn.Linear(4, 2, bias=False)  # BAM: soft-routed attention experts
    layer.self_attn.q_proj = nn.Linear(4, 4)
    layer.mlp = nn.Module()
    layer.mlp.gate = nn.Linear(4, 3, bias=False)
    layer.mlp.gate_proj = nn.Linear(4, 8)
    layer.mlp.shared_expert_gate = nn.Linear(4, 1, bias=False)
    layer.mlp.gate_up = nn.Linear(4, 8)
    assert router_parameters(layer) == [
        "self_attn.router.weight",
        "mlp.gate.weight",
        "mlp.shared_expert_gate.weight",
    ]
    pregate = nn.Module()  # Read-ME: every parameter of the pre-gating transformer
    pregate.router = nn.Module()
    pregate.router.head = nn.Linear(4, 2, bias=False)
    pregate.router.layers = nn.ModuleList([nn.Linear(4, 4)])
    pregate.layers = nn.ModuleList([nn.Linear(4, 4)])
    assert router_parameters(pregate) == [
        "router.head.weight",
        "router.layers.0.weight",
        "router.layers.0.bias",
    ]
