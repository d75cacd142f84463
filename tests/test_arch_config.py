"""Config normalization agrees with transformers' own classes, for full, minimal and legacy configs."""

import json
import os

import pytest
import torch
from conftest import logits, save_tiny
from transformers import AutoConfig

from upcycle.arch import RECORDS
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


def test_architecture_records_agree_with_each_other():
    """One record per model_type; what a record names (targets, sliding-window targets, MoE
    keys of what it writes) is there, and an unknown type gets a blank record."""
    from upcycle.arch import RECORDS, record
    from upcycle.arch.targets import TARGETS

    for model_type, rec in RECORDS.items():
        assert rec.model_type == model_type
        assert not (rec.is_dense and rec.is_moe), model_type
        if rec.target:  # the default target also reproduces the family's sliding window
            assert rec.target in TARGETS, model_type
            keeps = TARGETS[rec.target].keeps_source  # the family's own layers: any window
            assert keeps or rec.target in rec.window_targets, model_type
        for name in rec.window_targets:
            assert record(name).target_spec is not None, (model_type, name)
        if rec.target_spec:
            assert rec.is_moe and rec.target_spec.model_type == model_type
            assert rec.moe.experts_key in rec.target_spec.experts_keys
        if rec.readme:
            assert rec.is_dense and rec.target, model_type
    blank = record("gpt2")
    assert blank.model_type == "gpt2" and not (blank.is_dense or blank.is_moe)
    assert not (blank.plain_head or blank.pre_norm_layers or blank.readme or blank.target)
    assert record(None).model_type == ""


@pytest.mark.parametrize(
    "model_type",
    [t for t, rec in RECORDS.items() if rec.is_moe and not rec.custom and t != "upcycle_moe"],
)
def test_moe_records_name_keys_transformers_has(model_type):
    """inspect reads an MoE's expert count and widths under its record's keys."""
    keys = RECORDS[model_type].moe
    config = AutoConfig.for_model(model_type)
    for key in (keys.experts_key, keys.top_k_key, keys.expert_width_key, keys.shared_width_key):
        assert key is None or isinstance(getattr(config, key), int), key
