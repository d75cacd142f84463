"""The eval command: perplexity on text data, and routing statistics for MoE models."""

from __future__ import annotations

import json
import os
import time

import click

from upcycle.cli import cli, config_option, hub_kernels_option
from upcycle.errors import InputError, OptionError

DTYPES = ("float32", "bfloat16", "float16", "auto")
DEVICES = ("auto", "cpu", "cuda")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
MAX_EXPERT_COLUMNS = 8  # more experts: the routing table shows min and max instead


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@cli.command("eval")
@click.argument("model")
@config_option
@click.option(
    "--data",
    required=True,
    help="Text/JSONL file, or builtin (builtin:prose, :code, :manual, :all) for the stdlib corpus.",
)
@click.option(
    "--split",
    default="heldout",
    show_default=True,
    help="Split of the builtin corpus: heldout, calibration or all (files are used whole).",
)
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per block.")
@click.option(
    "--max-tokens",
    type=int,
    default=8192,
    show_default=True,
    help="Evaluate at most this many tokens (0: all the data).",
)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Blocks per forward.")
@click.option("--dtype", default="float32", show_default=True, help=f"{', '.join(DTYPES)}.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if any), cpu, cuda.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a layer x expert heatmap PNG.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@hub_kernels_option
def eval_command(
    model, data, split, seq_len, max_tokens, batch_size, dtype, device, as_json, plot, quiet
):
    """Perplexity of MODEL on text data and, for MoE models, how tokens are routed."""
    from upcycle.data import SPLITS, resolve_texts, token_blocks
    from upcycle.io.default_model import resolve_model

    if split not in SPLITS:
        raise OptionError(f"--split {split!r}: choose from {', '.join(SPLITS)}")
    if seq_len < 2:
        raise OptionError(f"--seq-len must be at least 2, got {seq_len}")
    if max_tokens < 0 or 0 < max_tokens < seq_len:
        raise OptionError(f"--max-tokens {max_tokens}: use 0 (all) or at least --seq-len {seq_len}")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {batch_size}")
    if dtype not in DTYPES:
        raise OptionError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise OptionError(f"--device {device!r}: choose from {', '.join(DEVICES)}")

    texts = resolve_texts(data, split)
    path = resolve_model(model, log=_log)
    config = _check_model_dir(path, seq_len)
    start = time.perf_counter()
    tokenizer = _load_tokenizer(path)
    blocks = token_blocks(texts, tokenizer, seq_len, max_tokens or None)
    lm = _load_model(path, dtype, device, quiet)
    loaded = time.perf_counter()

    from upcycle.evaluate.perplexity import evaluate

    result = evaluate(lm, blocks, batch_size, progress=not quiet)
    done = time.perf_counter()
    report = {
        "model": path,
        "model_type": config.get("model_type"),
        "data": data,
        "split": split if data.startswith("builtin") else None,
        "seq_len": seq_len,
        "blocks": int(blocks.shape[0]),
        "loss": result["loss"],
        "perplexity": result["perplexity"],
        "tokens": result["tokens"],
        "load_seconds": round(loaded - start, 2),
        "eval_seconds": round(done - loaded, 2),
        "routing": result["routing"],
    }
    if plot:
        if result["routing"] is None:
            _log(f"note: {model} is dense (no MoE layers); no heatmap written")
        else:
            from upcycle.evaluate.plot import plot_load_heatmap

            plot_load_heatmap(result["routing"], plot, title=f"Expert load: {model} on {data}")
            report["plot"] = plot
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


def _check_model_dir(path: str, seq_len: int) -> dict:
    """Validate the folder like every command does; refuse blocks longer than the model's context."""
    from upcycle.io.checkpoint import Checkpoint

    config = Checkpoint(path).config
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise OptionError(
            f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit}"
        )
    return config


def _load_tokenizer(path: str):
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise InputError(f"{path}: no tokenizer files (tokenizer.json or tokenizer.model)")
    from upcycle.io.models import load_tokenizer

    return load_tokenizer(path)


def _load_model(path: str, dtype: str, device: str, quiet: bool):
    import torch
    from transformers.utils import logging as hf_logging

    from upcycle.io.models import load_causal_lm

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device available")
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        model = load_causal_lm(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    return model.to(device)


def format_report(r: dict) -> str:
    """The human-readable report: perplexity lines, then a per-layer routing table if MoE."""
    routing = r["routing"]
    kind = "dense"
    if routing:
        kind = f"{routing['num_experts']} experts, top-{routing['top_k']}"
        if routing["shared_expert"]:
            kind += ", shared expert"
    split = f", split {r['split']}" if r["split"] else ""
    lines = [
        f"model       {r['model']}  ({r['model_type']}, {kind})",
        f"data        {r['data']}{split}: {r['blocks']} blocks x {r['seq_len']} tokens",
        f"loss        {r['loss']:.4f}",
        f"perplexity  {r['perplexity']:.3f}  ({r['tokens']} predicted tokens)",
        f"time        {r['load_seconds']} s to load, {r['eval_seconds']} s to evaluate",
    ]
    if routing:
        lines += ["", *format_routing(routing)]
    if r.get("plot"):
        lines.append(f"heatmap     {r['plot']}")
    return "\n".join(lines)


def format_routing(routing: dict) -> list[str]:
    """One row per MoE layer: router entropy, load entropy, busiest/balanced, fractions."""
    n, k = routing["num_experts"], routing["top_k"]
    lines = [
        f"routing     fraction of tokens per expert (balanced {k / n:.3f}); "
        f"entropies in nats (max {routing['max_entropy']:.3f})"
    ]
    per_expert = n <= MAX_EXPERT_COLUMNS
    cols = [f"{'e' + str(e):>6}" for e in range(n)] if per_expert else ["   min", "   max"]
    lines.append(f"{'layer':>5}  {'router-H':>8}  {'load-H':>6}  {'max/bal':>7} " + "".join(cols))
    for layer in routing["layers"]:
        f = layer["fraction"]
        values = f if per_expert else [min(f), max(f)]
        lines.append(
            f"{layer['layer']:>5}  {layer['router_entropy']:>8.3f}  {layer['load_entropy']:>6.3f}"
            f"  {layer['max_load_ratio']:>7.2f} " + "".join(f"{v:>6.3f}" for v in values)
        )
    return lines
