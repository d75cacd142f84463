"""Config normalization agrees with transformers' own classes, for full, minimal and legacy configs."""

import json
import os

import pytest
import torch
from conftest import logits, save_tiny
from transformers import AutoConfig

from upcycle.arch.config import COMMON, source_config

IDS = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
KEEP = {
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "architectures",
}


def _strip(path, keep=KEEP, extra=None):
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg = {k: v for k, v in cfg.items() if k in keep}
    cfg.update(extra or {})
    json.dump(cfg, open(cfg_path, "w"))
    return cfg


def _effective(path):
    d = AutoConfig.from_pretrained(path).to_dict()
    if d.get("head_dim") is None:
        d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    return d


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("minimal", [False, True], ids=["full", "minimal"])
def test_source_config_matches_transformers(tiny, family, minimal):
    path = tiny(family)
    raw = _strip(path) if minimal else json.load(open(os.path.join(path, "config.json")))
    ours = source_config(family, raw)
    theirs = _effective(path)
    for key in COMMON + ("sliding_window", "use_sliding_window", "max_window_layers"):
        if key in theirs:
            assert ours.get(key) == theirs[key], key


def test_legacy_rope_keys(tiny):
    path = tiny("llama")
    cfg = _strip(
        path, extra={"rope_theta": 50000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    ours = source_config("llama", cfg)
    assert ours["rope_parameters"] == _effective(path)["rope_parameters"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_minimal_and_legacy_configs_convert_exactly(tiny, cli, tmp_path, family):
    src = tiny(family)
    _strip(src, extra={"rope_theta": 30000.0, "rms_norm_eps": 1e-5})
    out = str(tmp_path / "moe")
    assert cli("convert", src, out, "-E", "3", "-q").code == 0
    torch.testing.assert_close(logits(out, IDS), logits(src, IDS), atol=1e-5, rtol=0)
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["rope_theta"] == 30000.0  # read by transformers 4.x and vLLM
    assert written["rope_parameters"]["rope_theta"] == 30000.0


def test_legacy_keys_follow_rope_parameters_and_dtype():
    """What transformers 4.x reads (rope_theta, rope_scaling, torch_dtype) next to what 5.x
    writes; values already there are kept."""
    from upcycle.arch.config import with_legacy_keys

    plain = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}, "dtype": "bfloat16"}
    assert with_legacy_keys(plain) == {
        **plain,
        "rope_theta": 1e5,
        "torch_dtype": "bfloat16",
    }
    scaled = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}
    got = with_legacy_keys(scaled)
    assert got["rope_theta"] == 5e5
    assert got["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    assert (
        with_legacy_keys({"rope_theta": 7.0, "rope_parameters": {"rope_theta": 9.0}})["rope_theta"]
        == 7.0
    )


def test_a_lora_merge_carries_rope_theta_for_transformers_4(tmp_path, cli):
    """The dense export of a LoRA run: its config.json names rope_theta as the source's
    rope_parameters do (transformers 4.x would otherwise take 10000)."""
    from test_train import TRAIN, write_data

    base = save_tiny(str(tmp_path / "base"), "llama", tokenizer=True, rope_theta=12345.0)
    run, merged = tmp_path / "run", tmp_path / "merged"
    args = ("--adapter", "lora", "--data", write_data(tmp_path), "--max-steps", "1", *TRAIN)
    assert cli("train", base, run, *args).code == 0
    assert cli("merge", run, merged, "-q").code == 0
    config = json.loads((merged / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 12345.0
    assert config["torch_dtype"] == config["dtype"]
