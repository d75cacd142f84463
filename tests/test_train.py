"""`upcycle train`: end to end on tiny models, exact resume, Ctrl-C, two processes, bad input."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import PY, logits, python_env, save_tiny
from test_bad_input import assert_one_line_error

from upcycle.train.data import IGNORE

WORDS = "the cat sat on mat code python def return import".split()


def write_data(tmp_path, n=120, seed=0):
    """Text records plus prompt/response and chat records over the tiny tokenizer's words."""
    g = torch.Generator().manual_seed(seed)

    def sentence(k):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())

    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            if i % 3 == 0:
                rec = {"text": sentence(24)}
            elif i % 3 == 1:
                rec = {"prompt": sentence(6), "response": sentence(10)}
            else:
                rec = {
                    "messages": [
                        {"role": "user", "content": sentence(5)},
                        {"role": "assistant", "content": sentence(8)},
                    ]
                }
            f.write(json.dumps(rec) + "\n")
    return str(path)


@pytest.fixture
def setup(tmp_path):
    base = save_tiny(str(tmp_path / "base"), "llama", tokenizer=True)
    return base, write_data(tmp_path)


TRAIN = ["--seq-len", "16", "--batch-size", "2", "--r", "4", "--num-experts", "4", "-q"]


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in metrics(out) if "loss" in m]


def test_train_then_merge_end_to_end(tmp_path, cli, setup):
    import upcycle.adapters  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, data = setup
    out = tmp_path / "run"
    r = cli("train", base, out, "--data", data, "--max-steps", "6", "--lr", "1e-2", *TRAIN)
    assert r.code == 0, r.err
    for name in ("adapter_config.json", "adapter_model.safetensors", "upcycle_train.json"):
        assert (out / name).is_file()
    assert (out / "checkpoints" / "step-6" / "optimizer.safetensors").is_file()
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.rglob("*"))
    record = json.loads((out / "upcycle_train.json").read_text())
    assert record["final"]["eval_loss"] < record["final"]["eval_loss_before"]
    m = metrics(out)
    assert [e["step"] for e in m if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert all(e["tokens_per_s"] > 0 and e["aux_loss"] > 0 for e in m if "loss" in e)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))
    model.eval()
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    r = cli("merge", out, tmp_path / "merged", "-q")
    assert r.code == 0, r.err
    assert (logits(str(tmp_path / "merged"), ids) - want).abs().max() <= 1e-4


def test_plain_lora_run_merges_to_dense(tmp_path, cli, setup):
    base, data = setup
    out = tmp_path / "run"
    r = cli(
        "train",
        base,
        out,
        "--data",
        data,
        "--max-steps",
        "2",
        "--adapter",
        "lora",
        *TRAIN[:-3],
        "-q",
    )
    assert r.code == 0, r.err
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    r = cli("merge", out, tmp_path / "merged", "-q")
    assert r.code == 0, r.err
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_resume_continues_the_same_curve(tmp_path, cli, setup):
    """A run resumed from its step-4 checkpoint (dropout on, so RNG matters) matches the
    uninterrupted run step for step, with gradient accumulation, a cosine schedule, activation
    checkpointing (attention only, the fused FFN outside) and heap trimming."""
    base, data = setup
    args = [
        "--gradient-checkpointing",
        "--trim-memory",
        "--data",
        data,
        "--max-steps",
        "8",
        "--save-steps",
        "4",
        "--grad-accum",
        "2",
        "--dropout",
        "0.2",
        "--warmup-steps",
        "2",
        *TRAIN,
    ]
    full = tmp_path / "full"
    assert cli("train", base, full, *args).code == 0
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-8")
    for name in ("adapter_config.json", "adapter_model.safetensors", "upcycle_train.json"):
        (part / name).unlink()
    with open(part / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "loss": 123.0}) + "\n")  # a stale line past step 4
    r = cli("train", base, part, *args, "--resume")
    assert r.code == 0, r.err
    assert losses(part) == losses(full)
    a = json.loads((full / "upcycle_train.json").read_text())["final"]
    b = json.loads((part / "upcycle_train.json").read_text())["final"]
    assert a["eval_loss"] == b["eval_loss"]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, setup):
    base, data = setup
    out = tmp_path / "run"
    cmd = [
        PY,
        "-m",
        "upcycle",
        "train",
        base,
        str(out),
        "--data",
        data,
        "--max-steps",
        "5000",
        *TRAIN,
    ]
    proc = subprocess.Popen(cmd, env=python_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len(losses(out)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted at step") and "--resume" in last, err
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{step}" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()  # no finished-looking adapter
    r = subprocess.run(
        cmd[: -len(TRAIN)] + ["--resume"] + TRAIN[:-1] + ["--max-steps", str(step + 2), "-q"],
        env=python_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert [s for s, _ in losses(out)][-3:] == [step, step + 1, step + 2]


def test_two_processes_match_one(tmp_path, setup):
    """DDP over gloo: 2 processes x batch 1 take the same steps as 1 process x batch 2.

    The balance loss is computed per micro-batch (as in every MoE trainer), so it is not
    additive over processes; it is off here to compare the rest exactly."""
    base, data = setup
    common = [
        "--data",
        data,
        "--max-steps",
        "3",
        "--dropout",
        "0",
        "--seq-len",
        "16",
        "--r",
        "4",
        "--num-experts",
        "4",
        "--lr",
        "1e-2",
        "--router-aux-loss-coef",
        "0",
        "-q",
    ]
    one = tmp_path / "one"
    r = subprocess.run(
        [PY, "-m", "upcycle", "train", base, str(one), "--batch-size", "2", *common],
        env=python_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    two = tmp_path / "two"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        "29517",
        "-m",
        "upcycle",
        "train",
    ]
    r = subprocess.run(
        launch + [base, str(two), "--batch-size", "1", *common],
        env={**python_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((two / "upcycle_train.json").read_text())
    assert record["world_size"] == 2
    for (s1, l1), (s2, l2) in zip(losses(one), losses(two), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    from safetensors.torch import load_file

    a = load_file(one / "adapter_model.safetensors")
    b = load_file(two / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_train_bad_input(tmp_path, cli, setup):
    base, data = setup
    out = tmp_path / "out"
    assert_one_line_error(
        cli("train", base, out, "--data", str(tmp_path / "none.txt")), "no such file"
    )
    assert_one_line_error(
        cli("train", base, out, "--data", data, "--top-k", "9"),
        "top_k must be between 1 and num_experts",
    )
    assert_one_line_error(
        cli("train", base, out, "--data", data, "--target-modules", "q_proj,zz"),
        "unknown target module 'zz'",
    )
    assert_one_line_error(cli("train", base, out, "--data", data, "--adapter", "dora"), "--adapter")
    assert_one_line_error(cli("train", base, out, "--data", data, "--resume"), "no checkpoint")
    assert_one_line_error(
        cli("train", base, out, "--data", data, "--seq-len", "4096"), "fewer than one block"
    )
    with pytest.MonkeyPatch.context() as mp:  # as on a machine without bitsandbytes
        mp.setitem(sys.modules, "bitsandbytes", None)
        r = cli("train", base, out, "--data", data, "--load-in-4bit")
    assert_one_line_error(r, "need bitsandbytes")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert_one_line_error(cli("train", base, tmp_path / "busy", "--data", data), "not empty")
    assert not out.exists() or not any(out.iterdir())


def test_experts_lora_run_on_a_converted_moe(tmp_path, cli, setup):
    base, data = setup
    moe = tmp_path / "moe"
    assert cli("convert", base, moe, "-E", "4", "-k", "2", "-q").code == 0
    out = tmp_path / "run"
    args = [
        "--data",
        data,
        "--max-steps",
        "2",
        "--adapter",
        "experts-lora",
        "--seq-len",
        "16",
        "-q",
    ]
    r = cli("train", moe, out, *args)
    assert r.code == 0, r.err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["mode"] == "experts" and cfg["num_experts"] == 4
    assert all(e["aux_loss"] > 0 for e in metrics(out) if "loss" in e)
    assert cli("merge", out, tmp_path / "merged", "-q").code == 0
    r = cli("train", base, tmp_path / "bad", "--data", data, "--adapter", "experts-lora", "-q")
    assert_one_line_error(r, "found no MoE experts")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_trains_and_merges_onto_the_full_precision_base(
    tmp_path, cli, setup, monkeypatch, bits
):
    """QLoRA-style: bitsandbytes quantizes the frozen base (its CPU backend here, CUDA alike);
    the MixLoRA layers run on the quantized projections (the unfused path); `upcycle merge`
    folds the adapter into the full-precision base."""
    import bitsandbytes as bnb
    import upcycle.adapters  # noqa: F401
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import upcycle.train.recipes.adapter as loop

    _, data = setup
    # bitsandbytes' CPU inference path (AVX512-BF16 CPUs, no grad) needs in_features that are
    # multiples of its 64-value blocks, as real models have; the tiny default width is 96
    base = save_tiny(str(tmp_path / "base128"), "llama", tokenizer=True, intermediate_size=128)
    quantized = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    seen = {}
    real = loop.save_final

    def spy(model, out, record, mode, *rest):
        ffn = model.base_model.model.model.layers[0].mlp
        seen["ffn"] = [type(getattr(ffn.base_layer, n)) for n in ("gate_proj", "up_proj")]
        seen["fused"] = ffn.uses_fused("default")
        seen["frozen"] = all(
            not p.requires_grad for n, p in model.named_parameters() if "mixlora" not in n
        )
        real(model, out, record, mode, *rest)

    monkeypatch.setattr(loop, "save_final", spy)
    out = tmp_path / "run"
    args = ["--data", data, "--max-steps", "3", "--lr", "1e-2", "--gradient-checkpointing"]
    r = cli("train", base, out, *args, f"--load-in-{bits}bit", *TRAIN)
    assert r.code == 0, r.err
    assert seen == {"ffn": [quantized, quantized], "fused": False, "frozen": True}
    record = json.loads((out / "upcycle_train.json").read_text())
    assert record["final"]["eval_loss"] < record["final"]["eval_loss_before"]
    with safe_open(out / "adapter_model.safetensors", "pt") as f:  # no quantization state
        assert all(".mixlora_" in k for k in f.keys())

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))
    model.eval()
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert cli("merge", out, tmp_path / "merged", "-q").code == 0
    assert (logits(str(tmp_path / "merged"), ids) - want).abs().max() <= 1e-4


def test_loss_on_kept_logits_equals_the_full_loss(tmp_path):
    """Computing logits only where a trained token is predicted changes nothing but speed."""
    import upcycle.adapters as A
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.train.components import batch_loss, micro_batch
    from upcycle.train.data import build_blocks
    from upcycle.train.loss import chunked_head

    base = save_tiny(str(tmp_path / "base"), "llama", tokenizer=True)
    tok = AutoTokenizer.from_pretrained(base)
    records = [{"prompt": " ".join(WORDS[: 3 + i]), "response": "cat sat"} for i in range(4)]
    blocks = build_blocks(records, tok, seq_len=32, packing=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), A.MixLoraConfig(r=2))
    model.train()
    batch = micro_batch(blocks, torch.arange(4), "cpu")
    assert batch["input_ids"].shape[1] < 32  # trailing padding trimmed
    assert chunked_head(model) is not None  # the chunked loss runs here
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    kept, aux_kept = batch_loss(model, batch, 5.0)
    grads_kept = torch.autograd.grad(kept + aux_kept, params)
    assert type(model.get_base_model().lm_head) is torch.nn.Linear  # head put back
    torch.manual_seed(0)
    out = model(**batch, num_items_in_batch=5.0)
    torch.testing.assert_close(kept, out.loss - out.aux_loss)
    torch.testing.assert_close(aux_kept, out.aux_loss)
    for a, b in zip(grads_kept, torch.autograd.grad(out.loss, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_equals_cross_entropy_on_logits(dtype):
    """Chunked loss and its hidden-state gradient match F.cross_entropy on fp32-cast logits."""
    from upcycle.train.loss import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(50, 16, generator=g).to(dtype)
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[::5] = IGNORE
    loss = linear_cross_entropy(hidden, weight, targets, chunk=8)
    (grad,) = torch.autograd.grad(loss * 0.5, hidden)
    ref = torch.nn.functional.cross_entropy(
        (hidden @ weight.t()).float(), targets, ignore_index=IGNORE, reduction="sum"
    )
    (ref_grad,) = torch.autograd.grad(ref * 0.5, hidden)
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    empty = linear_cross_entropy(hidden[:0], weight, targets[:0])
    assert float(empty.detach()) == 0.0
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(hidden, weight.clone().requires_grad_(), targets)


def test_example_configs_are_valid_train_options():
    """Every YAML under examples/configs opens with its command and uses only known options."""
    import glob

    import yaml

    from upcycle.cli.train import train as train_command
    from upcycle.train.options import TrainOptions

    known = {p.name for p in train_command.params}
    paths = sorted(
        glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "*.yaml"))
    )
    assert len(paths) >= 3
    for path in paths:
        with open(path) as f:
            text = f.read()
        assert text.startswith("# upcycle ") or text.startswith("# python "), path
        config = yaml.safe_load(text)
        assert set(config) <= known, (path, set(config) - known)
        TrainOptions(model="m", out="o", **{"data": "builtin", **config}).validate()


def test_heap_trimmer_trims_after_growth_until_detached():
    """On glibc, --trim-memory's trimmer hooks attention modules and calls malloc_trim once
    resident memory has grown past its limit since the last trim, and not again before."""
    from upcycle.train.memory import HeapTrimmer

    gc.collect()  # earlier tests' garbage, freed later, would hide this test's growth
    trimmer = HeapTrimmer(limit_bytes=16 << 20)
    if not trimmer.available:
        pytest.skip("not glibc")
    trimmer.libc.malloc_trim(0)
    trimmer.baseline = trimmer.resident_bytes()
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
    for layer in model.layers:
        layer.self_attn = torch.nn.Identity()
    assert trimmer.attach(model) == 2
    grown = torch.ones(16 << 20)  # 64 MB, resident
    model.layers[0].self_attn(torch.zeros(1))
    assert trimmer.trims == 1
    model.layers[1].self_attn(torch.zeros(1))
    assert trimmer.trims == 1  # no growth since the trim
    more = torch.ones(16 << 20)
    trimmer.detach()
    model.layers[1].self_attn(torch.zeros(1))
    assert trimmer.trims == 1 and grown.sum() + more.sum() > 0
