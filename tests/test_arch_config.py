"""Config normalization agrees with transformers' own classes, for full, minimal and legacy configs."""

import json
import os

import pytest
import torch
from conftest import logits
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
