"""The real Gemma 3 270M (`gemma-3-270m`, built from PyPI once and cached: about 240 MB and a
minute of dequantizing; Gemma-licensed, the Gemma Terms of Use apply) through upcycle_moe (slow:
`make test-slow`).

- copy upcycling E=4 top-2 reproduces the dense model: fp32 logits on real sentences within
  TOL of the logit scale, the same 20 greedy tokens;
- a short MixLoRA run merges into an upcycle_moe checkpoint whose logits are the trained
  adapter model's (within TOL), and which loads and generates where `import upcycle` fails;
- the copies pruned layer by layer to a pyramid of 2..4 experts by merge still reproduce the
  dense model (within TOL, the same 20 greedy tokens).

The upcycle_moe folders are loaded in a subprocess that cannot import upcycle
(trust_remote_code=True: the folder's own code). Timings and differences go to stdout (-s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import NO_UPCYCLE, run_cli, spy_on_final_model

pytestmark = pytest.mark.slow

TOL = 1e-4  # max |logit difference| allowed, relative to max |logit| of the reference
SENTENCES = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Water boils at 100 degrees Celsius at sea level, but on a high mountain it boils at",
]

# Loads a folder in a process where `import upcycle` fails and saves its logits on each prompt
# and 20 greedy tokens after the first one.
LOAD = (
    NO_UPCYCLE
    + r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
folder, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
model.eval()
with torch.no_grad():
    logits = [model(input_ids=torch.tensor([ids])).logits[0] for ids in prompts]
    first = torch.tensor([prompts[0]])
    gen = model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=20,
                         do_sample=False)
from safetensors.torch import save_file
meta = {"cls": type(model).__name__, "gen": json.dumps(gen[0].tolist())}
save_file({f"logits.{i}": t.contiguous() for i, t in enumerate(logits)}, out, metadata=meta)
"""
)


def load_without_upcycle(folder: str, prompts: list[list[int]]) -> dict:
    out = os.path.join(os.path.dirname(folder), "loaded.safetensors")
    r = subprocess.run(
        [sys.executable, "-c", LOAD, folder, json.dumps(prompts), out],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(folder),  # not the repository root
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        meta = f.metadata()
        logits = [f.get_tensor(f"logits.{i}") for i in range(len(prompts))]
    return {"cls": meta["cls"], "logits": logits, "gen": json.loads(meta["gen"])}


def relative_gap(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max |got - want| over every prompt, relative to max |want| (at least 1)."""
    gap = max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
    return gap / max(1.0, max(w.abs().max().item() for w in want))


@pytest.fixture(scope="module")
def gemma() -> str:
    from upcycle.io.default_model import resolve_model

    start = time.perf_counter()
    folder = resolve_model("gemma-3-270m")
    print(f"\ngemma-3-270m ready in {time.perf_counter() - start:.1f} s: {folder}")
    return folder


@pytest.fixture
def prompts(gemma) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma)
    ids = [tok(s).input_ids for s in SENTENCES]
    assert all(p[0] == tok.bos_token_id for p in ids)
    return ids


def dense_outputs(folder: str, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([p])).logits[0] for p in prompts]
        first = torch.tensor([prompts[0]])
        gen = model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=20,
                             do_sample=False)  # fmt: skip
    return logits, gen[0].tolist()


def test_copy_upcycling_gemma_is_exact(gemma, prompts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `gemma-3-270m` is the alias, not a folder here
    start = time.perf_counter()
    out = str(tmp_path / "moe")
    r = run_cli("convert", "gemma-3-270m", out, "-E", "4", "-k", "2", "-q")
    assert r.code == 0, r.err
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "upcycle_moe" and config["base_model_type"] == "gemma3_text"
    converted = time.perf_counter()
    logits, gen = dense_outputs(gemma, prompts)
    got = load_without_upcycle(out, prompts)
    assert got["cls"] == "UpcycleMoeForCausalLM"
    gap = relative_gap(got["logits"], logits)
    scale = max(w.abs().max().item() for w in logits)
    print(f"\nconvert {converted - start:.1f} s, compare {time.perf_counter() - converted:.1f} s; "
          f"max |dlogit| {gap * max(1.0, scale):.3g} (logit scale {scale:.1f}, relative {gap:.3g})")  # fmt: skip
    assert gap <= TOL
    assert got["gen"] == gen
    assert len(gen) == len(prompts[0]) + 20


def test_mixlora_on_gemma_merges_into_upcycle_moe(gemma, prompts, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.chdir(tmp_path)
    ids = torch.tensor([prompts[2]])
    seen = spy_on_final_model(monkeypatch, ids)
    start = time.perf_counter()
    run, merged = tmp_path / "run", tmp_path / "merged"
    r = run_cli("train", "gemma-3-270m", run, "--data", "builtin", "--max-steps", "3",
                "--batch-size", "2", "--seq-len", "64", "-E", "4", "-k", "2", "--r", "8",
                "--lr", "1e-3", "--max-eval-blocks", "2", "-q")  # fmt: skip
    assert r.code == 0, r.err
    trained = time.perf_counter()
    assert run_cli("merge", run, merged, "-q").code == 0
    merged_at = time.perf_counter()
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "upcycle_moe" and config["base_model_type"] == "gemma3_text"
    got = load_without_upcycle(str(merged), [prompts[2]])
    assert got["cls"] == "UpcycleMoeForCausalLM"
    want = seen["logits"][0]
    dense, _ = dense_outputs(gemma, [prompts[2]])
    moved = relative_gap([want], dense)  # training changed the model
    gap = relative_gap(got["logits"], [want])
    text = AutoTokenizer.from_pretrained(str(merged)).decode(got["gen"][len(prompts[2]) :])
    print(f"\ntrain {trained - start:.1f} s, merge {merged_at - trained:.1f} s, load and "
          f"generate {time.perf_counter() - merged_at:.1f} s; merged vs adapter relative "
          f"{gap:.3g}, adapter vs dense relative {moved:.3g}; generated {text!r}")  # fmt: skip
    assert moved > 100 * TOL
    assert gap <= TOL
    assert len(got["gen"]) == len(prompts[2]) + 20 and text.strip()


def test_pyramid_prune_of_gemma_copies_is_exact(gemma, prompts, tmp_path, monkeypatch):
    """Copies of Gemma 3's FFN (E=4), pruned layer by layer to a pyramid of 2..4 experts by
    merge: averaging identical copies loses nothing, so the upcycle_moe folder, with its count
    per layer, still computes the dense model where upcycle cannot be imported. This runs the
    real model's scaled embedding (read row by row), padding id and sliding-window layers
    through the prune's layer runner."""
    monkeypatch.chdir(tmp_path)
    moe, out = str(tmp_path / "moe"), str(tmp_path / "pruned")
    assert run_cli("convert", "gemma-3-270m", moe, "-E", "4", "-k", "2", "-q").code == 0
    start = time.perf_counter()
    args = ("--experts", "2", "--pyramid", "--by", "merge", "--data", "builtin")
    r = run_cli("prune", moe, out, *args, "--max-tokens", "2048", "-q")
    assert r.code == 0, r.err
    pruned = time.perf_counter()
    config = json.load(open(os.path.join(out, "config.json")))
    counts = config["layer_experts"]
    assert counts[0] == 2 and counts[-1] == 4 and counts == sorted(counts)
    logits, gen = dense_outputs(gemma, prompts)
    got = load_without_upcycle(out, prompts)
    gap = relative_gap(got["logits"], logits)
    print(f"\nprune {pruned - start:.1f} s; relative max |dlogit| {gap:.3g}")
    assert got["cls"] == "UpcycleMoeForCausalLM"
    assert gap <= TOL
    assert got["gen"] == gen
