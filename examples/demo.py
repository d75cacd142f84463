"""The main job on the default model: copy-upcycle SmolLM2-135M-Instruct and prove it exact.

Run with `make demo` (or `python examples/demo.py [OUT]`). Steps:
  1. `upcycle convert default OUT --method copy --num-experts 4 --top-k 2` (fetches the model once)
  2. load the dense model and the MoE with stock transformers (fp32, no remote code)
  3. compare logits on a chat prompt and greedy answers
"""

import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(".demo", "smollm2-moe-4x")
UPCYCLE = [sys.executable, "-m", "upcycle"]


def run(*args: str) -> str:
    print("$ upcycle " + " ".join(args), flush=True)
    proc = subprocess.run(UPCYCLE + list(args), stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    return proc.stdout.strip()


def main() -> None:
    dense_dir = run("fetch-default").splitlines()[-1]
    os.makedirs(os.path.dirname(OUT) or ".", exist_ok=True)
    run(
        "convert",
        "default",
        OUT,
        "--method",
        "copy",
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--force",
    )
    run("inspect", OUT)

    tok = AutoTokenizer.from_pretrained(OUT)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float32).eval()
    print(f"\nloaded {type(dense).__name__} and {type(moe).__name__} with stock transformers")

    questions = [
        "What is the capital of France?",
        "Write a Python function that reverses a string.",
    ]
    worst = 0.0
    for q in questions:
        batch = tok.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            diff = (dense(**batch).logits - moe(**batch).logits).abs().max().item()
        worst = max(worst, diff)
        n = batch["input_ids"].shape[1]
        a = dense.generate(**batch, max_new_tokens=24, do_sample=False)
        b = moe.generate(**batch, max_new_tokens=24, do_sample=False)
        print(f"\nQ: {q}\n  max |dense - moe| logit: {diff:.2e}")
        print(f"  dense: {tok.decode(a[0, n:], skip_special_tokens=True)!r}")
        print(f"  moe:   {tok.decode(b[0, n:], skip_special_tokens=True)!r}")
        if not torch.equal(a, b):
            sys.exit("the MoE's greedy answer differs from the dense model's")
    if worst > 1e-4:
        sys.exit(f"logits differ by {worst:.2e} > 1e-4")
    print(
        f"\nOK: the 4-expert MoE equals the dense model (max |dlogit| {worst:.2e}, same greedy answers)."
    )


if __name__ == "__main__":
    main()
