"""The commands: train, merge."""

from __future__ import annotations

import click

from upcycle.cli import cli, config_option


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@cli.command()
@click.argument("run")
@click.argument("out")
@config_option
@click.option(
    "--base", default=None, help="Base model folder (default: the one the adapter names)."
)
@click.option(
    "--target", default=None, help="MoE architecture for MixLoRA runs (default: per family)."
)
@click.option(
    "--dtype", default="source", show_default=True, help="source, float32, bfloat16 or float16."
)
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--quiet", "-q", is_flag=True)
def merge(run, out, base, target, dtype, max_shard_size, force, quiet):
    """Fold the adapter in RUN into a standalone checkpoint OUT that transformers loads.

    MixLoRA runs become a stock MoE (mixtral, qwen2_moe or qwen3_moe); LoRA runs become the
    merged dense model. RUN is a folder with adapter_config.json (the root of `upcycle train`'s
    output, or one of its checkpoints).
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
