"""Bad input: one line on stderr, a non-zero exit, no traceback, nothing written."""

import json
import os

import pytest


def assert_one_line_error(r, *words):
    assert r.code != 0, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("error: ") and "Traceback" not in r.err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_missing_path(cli, tmp_path):
    r = cli("convert", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert_one_line_error(r, "no such file or directory")
    assert not (tmp_path / "out").exists()


def test_not_a_model_directory(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(
        cli("convert", str(tmp_path / "empty"), str(tmp_path / "o")), "no config.json"
    )
    (tmp_path / "f.txt").write_text("x")
    assert_one_line_error(cli("inspect", str(tmp_path / "f.txt")), "not a model directory")


def test_unsupported_family(cli, tiny, tmp_path):
    src = tiny("gpt_neox")  # a layer layout no record describes
    assert_one_line_error(
        cli("convert", src, str(tmp_path / "o")),
        "unsupported family gpt_neox",
        "supported: gemma2, gemma3_text, llama",
    )
    assert not os.path.exists(tmp_path / "o")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    import torch
    from safetensors.torch import save_file

    save_file({"wte.weight": torch.zeros(4, 4)}, str(gpt2 / "model.safetensors"))
    assert_one_line_error(cli("convert", str(gpt2), str(tmp_path / "o")), "unsupported family gpt2")
    assert not (tmp_path / "o").exists()


def test_already_moe(cli, tiny, tmp_path):
    moe = str(tmp_path / "moe")
    assert cli("convert", tiny("llama"), moe, "-q").code == 0
    assert_one_line_error(cli("convert", moe, str(tmp_path / "o")), "already an MoE model")


def test_ffn_without_gate(cli, tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny("llama")
    path = os.path.join(src, "model.safetensors")
    state = {k: v for k, v in load_file(path).items() if "gate_proj" not in k}
    save_file(state, path, metadata={"format": "pt"})
    assert_one_line_error(cli("convert", src, str(tmp_path / "o")), "no gate projection")


@pytest.mark.parametrize(
    "args,words",
    [
        (["-E", "4", "-k", "5"], ["--top-k must be between 1 and --num-experts"]),
        (["-E", "1", "-k", "1"], ["--num-experts must be at least 2"]),
        (["-k", "0"], ["--top-k"]),
        (["--router-init", "magic"], ["unknown --router-init"]),
        (["--method", "nope"], ["unknown --method"]),
        (["--target", "nope"], ["unknown --target"]),
        (["--target", "qwen3_moe"], ["would not be exact", "q_norm"]),
        (["--moe-layers", "0"], ["mixtral makes every layer an MoE layer"]),
        (["--moe-layers", "7", "--target", "qwen2_moe"], ["layer 7 does not exist"]),
        (["--dtype", "int3"], ["unknown --dtype"]),
        (["--max-shard-size", "lots"], ["--max-shard-size"]),
        (["--router-init", "hidden"], ["one --expert-prompts per expert"]),
        (["--num-experts", "x"], ["'x' is not a valid integer"]),
        (["--no-such-option"], ["--no-such-option"]),
    ],
)
def test_bad_options(cli, tiny, tmp_path, args, words):
    out = tmp_path / "o"
    assert_one_line_error(cli("convert", tiny("llama"), str(out), *args), *words)
    assert not out.exists()


def test_qwen2_to_mixtral_is_refused(cli, tiny, tmp_path):
    assert_one_line_error(
        cli("convert", tiny("qwen2"), str(tmp_path / "o"), "--target", "mixtral"),
        "would not be exact",
        "bias",
    )


def test_out_exists_and_not_empty(cli, tiny, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    src = tiny("llama")
    assert_one_line_error(cli("convert", src, str(out)), "exists and is not empty", "--force")
    assert (out / "keep.txt").read_text() == "precious"
    assert cli("convert", src, str(out), "--force", "-q").code == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("convert", src, str(empty), "-q").code == 0


def test_truncated_safetensors(cli, tiny, tmp_path):
    src = tiny("llama")
    path = os.path.join(src, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    assert_one_line_error(cli("convert", src, str(tmp_path / "o")), "truncated")
    assert_one_line_error(cli("inspect", src), "truncated")
    assert not (tmp_path / "o").exists()


def test_corrupted_safetensors(cli, tiny, tmp_path):
    src = tiny("llama")
    path = os.path.join(src, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    assert_one_line_error(cli("convert", src, str(tmp_path / "o")), "corrupted")
    with open(path, "r+b") as f:
        f.write(b"\xff" * 8)
    assert_one_line_error(cli("convert", src, str(tmp_path / "o")), "corrupted")


def test_missing_shard(cli, tiny, tmp_path):
    src = tiny("llama")
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump(
            {
                "metadata": {},
                "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"},
            },
            f,
        )
    assert_one_line_error(cli("convert", src, str(tmp_path / "o")), "missing")


def test_config_disagrees_with_weights(cli, tiny, tmp_path):
    src = tiny("llama")
    cfg_path = os.path.join(src, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] = 80
    json.dump(cfg, open(cfg_path, "w"))
    assert_one_line_error(cli("convert", src, str(tmp_path / "o")), "shape", "config implies")
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 96, 1
    json.dump(cfg, open(cfg_path, "w"))
    assert_one_line_error(cli("convert", src, str(tmp_path / "o")), "config says 1 layers")


def test_bad_yaml_config(cli, tiny, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_experts: 4\nbogus: 1\n")
    assert_one_line_error(
        cli("convert", tiny("llama"), str(tmp_path / "o"), "--config", str(cfg)),
        "unknown option 'bogus'",
    )
    cfg.write_text("num_experts: [4\n")
    assert_one_line_error(
        cli("convert", tiny("llama"), str(tmp_path / "o"), "--config", str(cfg)), "not valid YAML"
    )


def test_missing_parents_are_created_but_files_block(cli, tiny, tmp_path):
    src = tiny("llama")
    assert cli("convert", src, str(tmp_path / "a" / "b" / "moe"), "-q").code == 0
    (tmp_path / "file").write_text("x")
    assert_one_line_error(
        cli("convert", src, str(tmp_path / "file" / "moe")), "exists and is a file"
    )
