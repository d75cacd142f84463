"""Gemma 2, Gemma 3 and Phi-3 (and any supported family with --target upcycle_moe) convert
into upcycle_moe: the family's own decoder with an MoE FFN, loaded with trust_remote_code and
no upcycle installed. Copy upcycling reproduces the dense model (logits and greedy generation,
past the sliding window too); granular does at full activation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAMILY_CONFIGS, NO_UPCYCLE, save_tiny

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny configs (conftest.FAMILY_CONFIGS): windows shorter than the test sequences.
FAMILIES = {f: FAMILY_CONFIGS[f] for f in ("gemma2", "gemma3_text", "phi3", "mistral")}

# Loads a folder in a process where `import upcycle` fails: the output needs nothing of ours.
LOAD = (
    NO_UPCYCLE
    + r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
model.eval()
with torch.no_grad():
    logits = model(ids).logits
    gen = model.generate(ids[:1, :6], max_new_tokens=20, do_sample=False, use_cache=True)
print(json.dumps({"cls": type(model).__name__, "logits": logits.tolist(), "gen": gen.tolist()}))
"""
)


def dense_outputs(path: str, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids[:1, :6], max_new_tokens=20, do_sample=False, use_cache=True)
    return logits, gen.tolist()


def load_without_upcycle(folder: str, ids: torch.Tensor) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", LOAD, folder, json.dumps(ids.tolist())],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(folder),  # not the repository root
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["logits"] = torch.tensor(out["logits"])
    return out


@pytest.fixture
def family_model(tmp_path):
    def make(family: str) -> str:
        return save_tiny(str(tmp_path / family), family, **FAMILIES.get(family, {}))

    return make


def ids_past_window() -> torch.Tensor:
    """Two sequences of 24 tokens: three times the window of 8."""
    return torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "family,extra",
    [
        ("gemma2", ()),
        ("gemma3_text", ()),
        ("phi3", ()),
        ("mistral", ("--target", "upcycle_moe")),
    ],
)
def test_copy_into_upcycle_moe_is_exact(cli, family_model, tmp_path, family, extra):
    src, out = family_model(family), str(tmp_path / "moe")
    r = cli("convert", src, out, "-E", "4", "-k", "2", "-q", *extra)
    assert r.code == 0, r.err
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "upcycle_moe" and config["base_model_type"] == family
    assert config["num_experts"] == 4 and config["norm_topk_prob"] is True
    ids = ids_past_window()
    logits, gen = dense_outputs(src, ids)
    got = load_without_upcycle(out, ids)
    assert got["cls"] == "UpcycleMoeForCausalLM"
    assert (got["logits"] - logits).abs().max().item() <= 1e-5
    assert got["gen"] == gen


@pytest.mark.parametrize("family", ["gemma3_text", "phi3"])
def test_granular_with_shared_experts_is_exact_at_full_activation(
    cli, family_model, tmp_path, family
):
    src, out = family_model(family), str(tmp_path / "moe")
    r = cli("convert", src, out, "--method", "granular", "-G", "4", "-S", "1", "-E", "3",
            "-k", "3", "--router-init", "zeros", "-q")  # fmt: skip
    assert r.code == 0, r.err
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["moe_intermediate_size"] == 24 and config["shared_expert_intermediate_size"] == 24
    ids = ids_past_window()
    logits, _ = dense_outputs(src, ids)
    got = load_without_upcycle(out, ids)
    assert (got["logits"] - logits).abs().max().item() <= 1e-5


def test_dense_layers_keep_the_source_ffn(cli, family_model, tmp_path):
    """--moe-layers 0: layer 1 keeps phi3's fused gate_up_proj under its own name."""
    from safetensors import safe_open

    src, out = family_model("phi3"), str(tmp_path / "moe")
    r = cli("convert", src, out, "-E", "4", "--moe-layers", "0", "-q")
    assert r.code == 0, r.err
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.gate_up_proj.weight" in names
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any("shared_expert" in n for n in names)  # no shared expert: no empty tensors
    assert not any(n.startswith("model.layers.0.mlp.gate_up_proj") for n in names)
    ids = ids_past_window()
    logits, _ = dense_outputs(src, ids)
    assert (load_without_upcycle(out, ids)["logits"] - logits).abs().max().item() <= 1e-5


def test_inspect_lists_upcycle_moe(cli, family_model):
    r = cli("inspect", family_model("gemma2"))
    assert r.code == 0 and "upcycle_moe (default)" in r.out
    r = cli("inspect", family_model("mistral"))
    assert r.code == 0 and "upcycle_moe" in r.out and "mixtral (default)" in r.out


def test_code_files_are_the_packaged_ones(cli, family_model, tmp_path):
    out = str(tmp_path / "moe")
    assert cli("convert", family_model("gemma2"), out, "-E", "2", "-q").code == 0
    for name in ("configuration_upcycle_moe.py", "modeling_upcycle_moe.py"):
        packaged = open(os.path.join(ROOT_DIR, "upcycle", "modeling", name)).read()
        assert open(os.path.join(out, name)).read() == packaged


def test_a_layer_the_record_does_not_describe_is_refused(cli, family_model, tmp_path):
    """A Gemma-3 checkpoint without one of its sandwich norms, or with a tensor no record
    names: one line naming it, nothing written."""
    from safetensors.torch import load_file, save_file
    from test_bad_input import assert_one_line_error

    src = family_model("gemma3_text")
    weights = load_file(os.path.join(src, "model.safetensors"))
    missing = "model.layers.1.pre_feedforward_layernorm.weight"
    save_file(
        {k: v for k, v in weights.items() if k != missing},
        os.path.join(src, "model.safetensors"),
        metadata={"format": "pt"},
    )
    out = str(tmp_path / "moe")
    assert_one_line_error(cli("convert", src, out), f"tensor {missing} is missing")
    extra = {**weights, "model.layers.0.mlp.fc_extra.weight": torch.zeros(4, 4)}
    save_file(extra, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(
        cli("convert", src, out), "unexpected tensor model.layers.0.mlp.fc_extra.weight"
    )
    assert not os.path.exists(out)
