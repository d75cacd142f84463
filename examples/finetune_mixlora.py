"""Fine-tune MixLoRA experts from Python and export a stock MoE checkpoint.

    python examples/finetune_mixlora.py [--config examples/configs/mixlora-default.yaml] [--out runs/example]

The same steps as `upcycle train` + `upcycle merge`, through the library: the YAML config
gives TrainOptions (any field; `model` defaults to the default model), the run is written to
OUT/run, the merged Mixtral/Qwen-MoE checkpoint to OUT/merged, and the script prints the
held-out loss before and after and one answer of the merged model (loaded by stock
transformers, no remote code). With several processes:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 examples/finetune_mixlora.py
"""

import argparse
import os

import yaml

from upcycle.io.hub import stay_offline
from upcycle.merge import merge
from upcycle.train.options import TrainOptions
from upcycle.train.recipes import train


def main() -> None:
    stay_offline()  # as upcycle's commands: no Hub access, no warnings about Hub kernels
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(here, "configs", "mixlora-default.yaml"))
    ap.add_argument("--out", default=os.path.join("runs", "example"))
    ap.add_argument("--max-steps", type=int, default=None, help="Override the config's steps.")
    args = ap.parse_args()
    with open(args.config) as f:
        config = yaml.safe_load(f) or {}
    config.setdefault("model", "default")
    if args.max_steps:
        config["max_steps"] = args.max_steps
    run_dir, merged_dir = os.path.join(args.out, "run"), os.path.join(args.out, "merged")
    final = train(TrainOptions(out=run_dir, force=True, **config))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(
        f"held-out loss {final.get('eval_loss_before', float('nan')):.4f} -> {final['eval_loss']:.4f}"
    )
    print(merge(run_dir, merged_dir, force=True))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, use_kernels=False)  # no Hub kernels
    batch = tok.apply_chat_template(
        [{"role": "user", "content": "What does functools.partial do?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**batch, max_new_tokens=40, do_sample=False)
    print(tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
