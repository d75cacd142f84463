"""The commands: train, merge."""

from __future__ import annotations

import click

from upcycle.cli import cli, config_option, hub_kernels_option


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@cli.command()
@click.argument("model")
@click.argument("out")
@config_option
@click.option(
    "--data",
    required=True,
    help="Training text: a text or JSONL file, or builtin (builtin:prose, :code, :manual, :all).",
)
@click.option("--eval-data", default=None, help="Held-out text (default: split from --data).")
@click.option(
    "--eval-fraction",
    type=float,
    default=0.05,
    show_default=True,
    help="Share of --data records held out when --eval-data is not given.",
)
@click.option(
    "--adapter",
    default="mixlora",
    show_default=True,
    help="mixlora (LoRA experts + router), lora (plain LoRA), experts-lora (LoRA on MoE "
    "experts), full (every weight), router (only an MoE's routers).",
)
@click.option("--num-experts", "-E", type=int, default=8, show_default=True, help="mixlora.")
@click.option("--top-k", "-k", type=int, default=2, show_default=True, help="mixlora.")
@click.option("--r", "--rank", "r", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, default=32.0, show_default=True, help="LoRA alpha.")
@click.option("--dropout", type=float, default=0.05, show_default=True, help="LoRA dropout.")
@click.option(
    "--target-modules",
    default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    show_default=True,
    help="Comma-separated projections to adapt.",
)
@click.option("--router-aux-loss-coef", type=float, default=0.01, show_default=True)
@click.option("--router-z-loss-coef", type=float, default=0.0, show_default=True)
@click.option("--jitter-noise", type=float, default=0.0, show_default=True)
@click.option("--expert-view", default="copy", show_default=True, help="mixlora: copy or granular.")
@click.option("--granularity", type=int, default=1, show_default=True, help="granular views.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps.")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option(
    "--batch-size",
    type=int,
    default=4,
    show_default=True,
    help="Blocks per process and micro-step.",
)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--packing/--no-packing", default=True, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--schedule", default="cosine", show_default=True, help="cosine, linear, constant.")
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--dtype", default="float32", show_default=True, help="float32 or bfloat16.")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Run the Python code a MODEL folder ships (auto_map) when its architecture is not "
    "one upcycle or transformers knows.",
)
@click.option(
    "--checkpoint-ffn",
    is_flag=True,
    help="With --gradient-checkpointing, keep fused MixLoRA FFNs inside the checkpoints too "
    "(least memory, slower).",
)
@click.option(
    "--trim-memory",
    is_flag=True,
    help="CPU: give freed heap memory back to the system whenever it has grown by 512 MB "
    "(lower peak RSS).",
)
@click.option("--load-in-4bit", is_flag=True, help="4-bit base (CUDA, bitsandbytes).")
@click.option("--load-in-8bit", is_flag=True, help="8-bit base (CUDA, bitsandbytes).")
@click.option("--eval-steps", type=int, default=0, show_default=True, help="0: before and after.")
@click.option("--max-eval-blocks", type=int, default=64, show_default=True)
@click.option("--save-steps", type=int, default=0, show_default=True, help="0: at the end only.")
@click.option("--logging-steps", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--method",
    default="adapter",
    show_default=True,
    help="adapter (train what --adapter says) or readme (a Read-ME model's router and "
    "backbone in alternating rounds; docs/readme-me.md).",
)
@click.option("--rounds", type=int, default=5, show_default=True, help="readme: rounds.")
@click.option(
    "--router-steps", type=int, default=100, show_default=True, help="readme: router steps a round."
)
@click.option(
    "--backbone-steps",
    type=int,
    default=200,
    show_default=True,
    help="readme: backbone steps a round.",
)
@click.option(
    "--router-lr", type=float, default=1e-4, show_default=True, help="readme: router AdamW lr."
)
@click.option(
    "--lr-decay",
    type=float,
    default=0.8,
    show_default=True,
    help="readme: both learning rates are multiplied by this each round.",
)
@click.option(
    "--router-kl-weight",
    type=float,
    default=0.25,
    show_default=True,
    help="readme: router loss = (1-w) CE(hard label) + w KL(soft target || router).",
)
@click.option(
    "--dense",
    default=None,
    help="readme: the dense model whose activations label tokens (default: the one the "
    "model's upcycle.json names).",
)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in OUT.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@hub_kernels_option
def train(model, out, quiet, **options):
    """Fine-tune MODEL (an adapter, every weight or the routers) on --data; write the run to OUT.

    --method readme trains a Read-ME model (`upcycle convert --method readme`): its pre-gating
    router and its backbone in alternating rounds (docs/readme-me.md).

    The final weights land at the root of OUT: an adapter (adapter_config.json,
    adapter_model.safetensors: load it with peft after `import upcycle.adapters`), the whole
    model (--adapter full) or routers.safetensors (--adapter router); `upcycle merge OUT DIR`
    makes any of them a standalone checkpoint. Checkpoints go under OUT/checkpoints/ and
    metrics in OUT/metrics.jsonl. Ctrl-C saves a
    checkpoint; --resume continues it. Several processes: `accelerate launch --multi_gpu
    --num_processes N -m upcycle train ...` (on CPU too); sharded with FSDP2: `accelerate
    launch --config_file examples/configs/accelerate/fsdp2.yaml ...` (docs/mixlora.md).
    """
    from upcycle.train.options import TrainOptions
    from upcycle.train.recipes import train as run_train

    final = run_train(TrainOptions(model=model, out=out, progress=not quiet, **options), log=_log)
    import os

    if int(os.environ.get("RANK", "0")) == 0 and not quiet and options["method"] == "readme":
        click.echo(_readme_summary(out, final))
    elif int(os.environ.get("RANK", "0")) == 0 and not quiet:
        parts = [f"wrote {out}", f"  final loss {final.get('lm_loss', float('nan')):.4f}"]
        if "eval_loss" in final:
            before = final.get("eval_loss_before")
            parts.append(
                f"  held-out loss {final['eval_loss']:.4f}"
                + (f" (before training {before:.4f})" if before is not None else "")
            )
        parts.append(f"  {final.get('tokens_per_s', 0):.0f} tokens/s")
        click.echo("\n".join(parts))


def _readme_summary(out: str, final: dict) -> str:
    parts = [f"wrote {out}"]
    for key, label in (
        ("eval_router_accuracy", "held-out router accuracy"),
        ("eval_router_ce", "held-out router CE"),
        ("eval_loss", "held-out loss"),
        ("eval_ppl", "held-out perplexity"),
    ):
        if key in final:
            before = final.get(f"{key}_before")
            parts.append(
                f"  {label} {final[key]:.4f}"
                + (f" (before training {before:.4f})" if before is not None else "")
            )
    return "\n".join(parts)


@cli.command()
@click.argument("run")
@click.argument("out")
@config_option
@click.option("--base", default=None, help="Base model folder (default: the one the run names).")
@click.option(
    "--target", default=None, help="MoE architecture for MixLoRA runs (default: per family)."
)
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    help="float32, bfloat16, float16 or source. bfloat16 rounds away much of each LoRA delta.",
)
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--quiet", "-q", is_flag=True)
def merge(run, out, base, target, dtype, max_shard_size, force, quiet):
    """Fold the training run in RUN into a standalone checkpoint OUT that transformers loads.

    MixLoRA runs become a stock MoE (mixtral, qwen2_moe or qwen3_moe); LoRA runs become the
    merged dense model; full runs are written as the trained model; router runs replace the
    routers in a copy of the base. RUN is the root of `upcycle train`'s output, or one of its
    checkpoints.
    """
    from upcycle.merge import merge as run_merge

    summary = run_merge(
        run,
        out,
        base=base,
        target=target,
        dtype=dtype,
        max_shard_size=max_shard_size,
        force=force,
        progress=not quiet,
        log=_log,
    )
    if not quiet:
        click.echo(str(summary))
