"""The whole story on the default model (SmolLM2-135M-Instruct), on a CPU, in a few minutes.

Run with `make demo` (or `python examples/demo.py [OUT]`). Steps:
  1. `upcycle convert default OUT/moe-4x` copies each FFN into 4 experts (top-2) and the MoE
     is checked against the dense model: same logits (fp32) and the same greedy answers.
  2. `upcycle train default OUT/run --adapter mixlora` attaches MixLoRA (8 LoRA experts,
     top-2, r=16, router per FFN, LoRA on attention) to the frozen model and fine-tunes it
     briefly on the built-in corpus (Python standard-library docstrings and code); the held-out
     loss is measured before and after.
  3. `upcycle merge OUT/run OUT/merged` folds the adapter into a stock Mixtral checkpoint,
     which transformers loads without remote code; its logits equal the adapter model's and
     it answers a question.
"""

import json
import os
import subprocess
import sys
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = sys.argv[1] if len(sys.argv) > 1 else ".demo"
UPCYCLE = [sys.executable, "-m", "upcycle"]
TRAIN = [
    "--data", "builtin", "--adapter", "mixlora", "--num-experts", "8", "--top-k", "2",
    "--max-steps", "24", "--batch-size", "4", "--seq-len", "128", "--lr", "3e-4",
    "--warmup-steps", "2", "--max-eval-blocks", "24", "--seed", "0",
]  # fmt: skip


def run(*args: str) -> str:
    print("$ upcycle " + " ".join(args), flush=True)
    proc = subprocess.run(UPCYCLE + list(args), stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    return proc.stdout.strip()


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
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    question = "What is the capital of France?"
    batch, a, answer = chat(tok, dense, question, 16)
    _, b, _ = chat(tok, moe, question, 16)
    with torch.no_grad():
        diff = (dense(**batch).logits - moe(**batch).logits).abs().max().item()
    print(f"  {type(moe).__name__}: max |dense - moe| logit {diff:.2e}; answer {answer!r}")
    if diff > 1e-4 or not torch.equal(a, b):
        sys.exit("the copy-upcycled MoE does not reproduce the dense model")


def train_merge_and_check(dense_dir: str) -> None:
    import upcycle.adapters  # noqa: F401  (registers MixLoRA with peft)
    from peft import PeftModel

    run_dir, merged_dir = os.path.join(OUT, "run"), os.path.join(OUT, "merged")
    run("train", "default", run_dir, *TRAIN, "--force")
    record = json.load(open(os.path.join(run_dir, "upcycle_train.json")))["final"]
    before, after = record["eval_loss_before"], record["eval_loss"]
    run("merge", run_dir, merged_dir, "--force", "-q")

    tok = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    with warnings.catch_warnings():  # peft asks the model a property transformers 5 renamed
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        adapted = PeftModel.from_pretrained(base, run_dir).eval()
    question = "What does the Python function os.path.join do?"
    batch, _, answer = chat(tok, merged, question)
    with torch.no_grad():
        diff = (adapted(**batch).logits - merged(**batch).logits).abs().max().item()
    print(f"\n  held-out loss (built-in corpus): {before:.4f} before, {after:.4f} after training")
    print(
        f"  {type(merged).__name__} loaded by stock transformers; max |adapter - merged| logit {diff:.2e}"
    )
    print(f"  Q: {question}\n  A: {answer!r}")
    if diff > 1e-4:
        sys.exit(f"the merged model differs from the adapter model by {diff:.2e} > 1e-4")
    if not after < before:
        sys.exit("training did not lower the held-out loss")


def main() -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dense_dir = run("fetch-default").splitlines()[-1]
    print("\n== 1. copy upcycling: an exact 4-expert MoE")
    convert_and_check(dense_dir)
    print("\n== 2. MixLoRA: LoRA experts on the frozen model, trained briefly, merged")
    train_merge_and_check(dense_dir)
    print(
        "\nOK: converted exactly; trained, merged and loaded a stock MoE with lower held-out loss."
    )


if __name__ == "__main__":
    main()
