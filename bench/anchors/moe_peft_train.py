#!/usr/bin/env python3
"""Anchor: MoE-PEFT 2.0.2 MixLoRA (or plain LoRA) training throughput on CPU, fp32.

Run with the MoE-PEFT venv (see setup_moe_peft.sh), from the repository root:

    bench/.venvs/moe-peft/bin/python bench/anchors/moe_peft_train.py PAIRS.jsonl \
        [--adapter mixlora|lora] [--threads N] [--steps 8] [--model DIR]

PAIRS.jsonl holds {"prompt": ..., "response": ...} per line (64 lines: one epoch of
batch 8 = 8 steps). One untimed warm-up step runs first, then --steps timed steps.
The last line on stdout is one JSON object:

    {"tool": "moe-peft", "adapter": ..., "threads": ..., "tokens": ..., "seconds": ...,
     "tokens_per_s": ..., "steps": ...}

"tokens" counts padded tokens (batch rows x padded length) of the timed steps.

Everything below the data plumbing is MoE-PEFT's own code path, as in moe_peft.train():
LLMModel.from_pretrained (its llama rewrite of the HF model), adapter_factory ->
MixLoraConfig / LoraConfig, LLMModel.init_adapter, TrainConfig.prepare (AdamW, constant
schedule), Dispatcher.get_train_data (tokenise with its default prompt template, cut to
256, pad to the batch's longest row, gradient checkpoint "recompute" as its trainer does),
LLMModel.forward (CE loss + MixLoRA router aux loss), trainer._compute_loss, backward,
TrainConfig.step (optimizer step + zero_grad).

Old transformers (<4.47) cannot read the SmolLM2 config/tokenizer_config written by
transformers 5, so a compatible copy is made once in bench/work/smollm2-old/ (see
prepare_model_dir).
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODEL = os.path.expanduser("~/.cache/upcycle/SmolLM2-135M-Instruct")
OLD_MODEL_DIR = os.path.join(REPO, "bench", "work", "smollm2-old")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_model_dir(src: str, dst: str = OLD_MODEL_DIR) -> str:
    """Copy an HF llama dir written by transformers 5 into a form transformers 4.46 reads.

    config.json: rope_parameters{rope_theta, rope_type} -> rope_theta (+ rope_scaling null
    for the default rope type; otherwise old transformers silently uses theta 10000),
    dtype -> torch_dtype. tokenizer_config.json: tokenizer_class "TokenizersBackend" (v5
    only) -> PreTrainedTokenizerFast, which loads tokenizer.json. Weights and tokenizer.json
    are hard-linked (copied if that fails). Idempotent: redone only if the source changed.
    """
    stamp_path = os.path.join(dst, ".source.json")
    stamp = {
        "src": os.path.abspath(src),
        "config_sha256": _sha256(os.path.join(src, "config.json")),
        "weights_size": os.path.getsize(os.path.join(src, "model.safetensors")),
        "version": 1,
    }
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return dst
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)

    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters", None)
    if rope is not None:
        rope = dict(rope)
        if "rope_theta" in rope:
            cfg.setdefault("rope_theta", rope.pop("rope_theta"))
        if rope.get("rope_type", "default") == "default":
            cfg.setdefault("rope_scaling", None)
        else:
            cfg.setdefault("rope_scaling", rope)
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg.pop("dtype"))
    cfg["transformers_version"] = "4.46.3"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    tok_cfg_path = os.path.join(src, "tokenizer_config.json")
    tok_cfg = {}
    if os.path.exists(tok_cfg_path):
        with open(tok_cfg_path) as f:
            tok_cfg = json.load(f)
    if tok_cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for k in ("backend", "is_local", "local_files_only"):
        tok_cfg.pop(k, None)
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)

    gen_path = os.path.join(src, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            gen = json.load(f)
        gen["transformers_version"] = "4.46.3"
        with open(os.path.join(dst, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)

    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja"):
        s = os.path.join(src, name)
        if not os.path.exists(s):
            continue
        d = os.path.join(dst, name)
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    return dst


def _cpu_ticks():
    """Busy jiffies of all CPUs (user+nice+system+irq+softirq+steal) or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    except (OSError, ValueError, IndexError):
        return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="MoE-PEFT CPU training-throughput anchor")
    ap.add_argument("pairs", help='JSONL of {"prompt":..., "response":...}')
    ap.add_argument("--adapter", choices=["mixlora", "lora"], default="mixlora")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps (default: one epoch = len(pairs)/batch)",
    )
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cutoff-len", type=int, default=256)
    ap.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="HF llama dir; a transformers-4.46-readable copy is made",
    )
    ap.add_argument(
        "--grad-checkpoint",
        choices=["recompute", "none", "offload"],
        default="recompute",
        help="MoE-PEFT's trainer always uses 'recompute' (its default)",
    )
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    # Threads and offline mode must be fixed before torch / transformers are imported.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["MOE_PEFT_EXECUTOR_TYPE"] = "CPU"

    import random

    import torch

    torch.set_num_threads(args.threads)

    import moe_peft
    from moe_peft.common import InputData, Prompt
    from moe_peft.dispatcher import Dispatcher
    from moe_peft.tasks import CasualTask
    from moe_peft.trainer import _compute_loss

    moe_peft.setup_logging("INFO" if args.verbose else "WARNING")

    with open(args.pairs, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    if not pairs:
        sys.exit(f"no pairs in {args.pairs}")
    per_epoch = -(-len(pairs) // args.batch_size)
    steps = args.steps if args.steps is not None else per_epoch
    total_steps = args.warmup + steps

    class JsonlCasualTask(CasualTask):
        """MoE-PEFT's causal SFT task, reading our prompt/response JSONL directly
        (instead of through `datasets`): prompt -> instruction, response -> output."""

        def loading_data(self, is_train=True, path=None):
            return [
                InputData(inputs=Prompt(instruction=p["prompt"], input=None, label=p["response"]))
                for p in pairs
            ]

    class AnchorTrainConfig(moe_peft.TrainConfig):
        def prepare(self, train_params):
            super().prepare(train_params)
            self.task_ = JsonlCasualTask()

    random.seed(args.seed)
    torch.manual_seed(args.seed)

    model_dir = prepare_model_dir(args.model)
    tokenizer = moe_peft.Tokenizer(model_dir)
    model = moe_peft.LLMModel.from_pretrained(
        model_dir,
        device="cpu",
        attn_impl="eager",
        load_dtype=torch.float32,
        compute_dtype=torch.float32,
    )

    common = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS)
    if args.adapter == "mixlora":
        lora_config = moe_peft.adapter_factory(
            "MIXLORA",
            "anchor",
            routing_strategy="mixlora",
            num_experts=8,
            top_k=2,
            router_aux_loss_coef=0.01,
            **common,
        )
    else:
        lora_config = moe_peft.adapter_factory("LORA", "anchor", **common)
    model.init_adapter(lora_config)

    train_config = AnchorTrainConfig(
        adapter_name="anchor",
        task_name="casual",
        num_epochs=-(-total_steps // per_epoch),
        batch_size=args.batch_size,
        micro_batch_size=args.batch_size,
        optimizer_type="adamw",
        learning_rate=2e-4,
        scheduler_type="constant",
        group_by_length=False,
        data_path=args.pairs,
    )
    train_config.prepare(model.get_adapter_weight_dict("anchor"))
    dispatcher = Dispatcher(tokenizer, [train_config], None, "optim", args.cutoff_len)
    dispatcher.train_task_in_event_.register(
        lambda task: train_config.prepare_lr_scheduler(len(task.train_token_data_))
    )
    config_dict = {"anchor": train_config}

    def one_step():
        input_args = dispatcher.get_train_data()
        input_args.gradient_checkpoint_ = args.grad_checkpoint
        n_tok = len(input_args.batch_tokens_) * len(input_args.batch_tokens_[0])
        outputs = model.forward(input_args)
        total_loss = _compute_loss(config_dict, outputs)
        total_loss.backward()
        for output in outputs:
            config_dict[output.adapter_name].step()
        return n_tok, float(total_loss.detach())

    for _ in range(args.warmup):
        one_step()  # first call also tokenises the data (Dispatcher lazy load)

    tokens = 0
    per_step = []
    stat0, own0 = _cpu_ticks(), os.times()
    t0 = time.perf_counter()
    for _ in range(steps):
        ts = time.perf_counter()
        n, loss = one_step()
        per_step.append((n, round(time.perf_counter() - ts, 3), round(loss, 4)))
        tokens += n
    seconds = time.perf_counter() - t0
    stat1, own1 = _cpu_ticks(), os.times()

    if stat0 and stat1:
        hz = os.sysconf("SC_CLK_TCK")
        busy = (stat1 - stat0) / hz
        own = (own1.user + own1.system) - (own0.user + own0.system)
        print(
            f"timed region: {seconds:.2f}s wall, own CPU {own:.2f}s, other CPU on "
            f"the machine {max(busy - own, 0.0) / seconds:.2f} cores "
            f"(of {os.cpu_count()})",
            file=sys.stderr,
        )
    print(f"timed steps (padded tokens, seconds, loss): {per_step}", file=sys.stderr)
    print(
        json.dumps(
            {
                "tool": "moe-peft",
                "adapter": args.adapter,
                "threads": args.threads,
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 2),
                "steps": steps,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
