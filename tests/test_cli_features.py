"""inspect, --dry-run, --config YAML, progress and summary."""

import json
import os


def test_inspect_dense_and_moe(cli, tiny, tmp_path):
    src = tiny("llama")
    r = cli("inspect", src, "--json")
    info = json.loads(r.out)
    assert info["family"] == "llama" and info["moe"] is False
    assert info["params_total"] == info["params_active"]
    assert info["targets"] == ["mixtral (default)", "qwen2_moe", "upcycle_moe"]
    assert info["methods"] == ["bam", "btx", "copy", "granular", "readme"]
    out = str(tmp_path / "moe")
    assert cli("convert", src, out, "-E", "4", "-k", "1", "-q").code == 0
    moe = json.loads(cli("inspect", out, "--json").out)
    assert moe["moe"] and moe["experts"] == 4 and moe["top_k"] == 1 and moe["moe_layers"] == 2
    per_expert = 3 * 64 * 96
    assert moe["params_total"] - info["params_total"] == 2 * (3 * per_expert + 4 * 64)
    assert moe["params_total"] - moe["params_active"] == 2 * 3 * per_expert
    text = cli("inspect", out).out
    assert "4 per MoE layer" in text and "top-1" in text


def test_inspect_unsupported_family_still_describes(cli, tiny, tmp_path):
    src = tiny("gpt_neox")
    r = cli("inspect", src)
    assert r.code == 0 and "gpt_neox" in r.out and "unsupported family gpt_neox" in r.out


def test_dry_run_writes_nothing(cli, tiny, tmp_path):
    out = tmp_path / "o"
    r = cli("convert", tiny("llama"), str(out), "-E", "4", "--dry-run")
    assert r.code == 0, r
    assert "MixtralForCausalLM" in r.out and "4 routed per MoE layer" in r.out and "shard" in r.out
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if "upcycle-tmp" in n]


def test_yaml_config_and_override(cli, tiny, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num-experts: 6\ntop_k: 3\nrouter_init: zeros\nseed: 3\n")
    out = str(tmp_path / "o")
    assert cli("convert", tiny("llama"), out, "--config", str(cfg), "--top-k", "2", "-q").code == 0
    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["num_local_experts"] == 6 and conf["num_experts_per_tok"] == 2
    assert json.load(open(os.path.join(out, "upcycle.json")))["options"]["router_init"] == "zeros"


def test_yaml_gives_a_repeatable_option_once_or_as_a_list(cli, tiny, tmp_path):
    """calibration-data (repeatable since readme) may be one value or a list in YAML."""
    src = tiny("llama")
    for i, value in enumerate(("builtin", "[builtin]")):
        cfg = tmp_path / f"c{i}.yaml"
        cfg.write_text(f"method: granular\ngranularity: 4\ncalibration-data: {value}\n")
        r = cli("convert", src, str(tmp_path / f"o{i}"), "--config", str(cfg), "--dry-run")
        assert r.code == 0, r.err


def test_summary_and_quiet(cli, tiny, tmp_path):
    src = tiny("llama")
    r = cli("convert", src, str(tmp_path / "a"))
    assert r.code == 0 and "MixtralForCausalLM" in r.out and "active per token" in r.out
    assert "converting" in r.err
    r = cli("convert", src, str(tmp_path / "b"), "--quiet")
    assert r.code == 0 and r.out == "" and r.err == ""


def test_version_and_help(cli):
    assert cli("--version").out.startswith("upcycle, version")
    r = cli("convert", "--help")
    assert r.code == 0 and "--num-experts" in r.out


def test_conversion_needs_neither_torch_nor_transformers(tiny, tmp_path):
    """Copy upcycling is I/O: it must not pay torch's and transformers' import time."""
    import subprocess

    from conftest import PY, python_env

    src, out = tiny("llama"), str(tmp_path / "o")
    code = (
        "import sys; from upcycle.cli import main\n"
        "try:\n    main(['convert', sys.argv[1], sys.argv[2], '-q', '--expert-noise', '0.01'])\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [PY, "-c", code, src, out], env=python_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_inspect_reads_the_fused_expert_layout(tmp_path, cli):
    """transformers 5 can write experts fused ((E, 2I, H) tensors); inspect counts them too."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "fused"
    folder.mkdir()
    cfg = {
        "model_type": "mixtral",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 1,
        "hidden_size": 8,
        "intermediate_size": 6,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(
        {
            "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 12, 8),
            "model.layers.0.mlp.experts.down_proj": torch.zeros(4, 8, 6),
            "model.layers.0.mlp.gate.weight": torch.zeros(4, 8),
        },
        str(folder / "model.safetensors"),
    )
    info = json.loads(cli("inspect", str(folder), "--json").out)
    assert info["moe_layers"] == 1 and info["experts"] == 4
    assert info["params_total"] - info["params_active"] == 2 * (12 * 8 + 8 * 6)
