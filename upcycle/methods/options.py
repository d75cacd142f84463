"""Options of `upcycle convert`: the ones every method reads, and declarations of the others.

A method lists the options it reads in `Method.options` (declarations below or in its own
module); the command line (`upcycle.cli.commands`) makes one flag of each declaration, and the
engine refuses a method option given to a method that does not read it. A declaration read by
several methods (router init, expert prompts, calibration data) is written once, here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from upcycle.errors import OptionError


@dataclass(frozen=True)
class Option:
    """One method option: its name (flag `--name-with-dashes`), default and help.

    `type` is the value's type on the command line (int, float, str); `multiple` makes the
    flag repeatable (the value is then a tuple); `flag` makes it a switch. `short` is a one-letter
    alias such as "-G". `parse` turns what the command line or a YAML config gave into the
    option's value (e.g. "0.5,0.5" into floats); it raises OptionError on bad input.
    """

    name: str
    default: Any
    help: str
    type: type = str
    multiple: bool = False
    flag: bool = False
    short: str | None = None
    parse: Callable[[Any], Any] | None = None

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass
class ConvertOptions:
    """Everything a conversion depends on (recorded in OUT/upcycle.json).

    The fields are what every method reads; `method_options` holds the options of the chosen
    method by name (its `Method.options`; missing ones take their declared default).
    """

    method: str = "copy"
    num_experts: int | None = None  # default per method (copy: 8; granular: granularity - shared)
    top_k: int | None = None  # default per method (`Method.default_top_k`)
    target: str | None = None
    moe_layers: str = "all"
    router_aux_loss_coef: float = 0.001
    seed: int = 0
    dtype: str = "source"
    max_shard_size: str = "5GB"
    method_options: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict:
        """The options as upcycle.json records them: one flat mapping."""
        common = asdict(self)
        del common["method_options"]
        return {**common, **self.method_options}


def expert_prompts(values) -> tuple[tuple[str, ...], ...]:
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


ROUTER_INIT = Option(
    "router_init",
    "random",
    "copy, btx, bam: random, zeros, hidden; granular: random, zeros, virtual-group, centroid, "
    "activation.",
)
ROUTER_STD = Option("router_std", 0.02, "Std of random router weights.", type=float)
EXPERT_PROMPTS = Option(
    "expert_prompts",
    (),
    "One per expert, for --router-init hidden: a prompt, or @FILE with one prompt per line.",
    multiple=True,
    parse=expert_prompts,
)
CALIBRATION_DATA = Option(
    "calibration_data",
    (),
    "Text or JSONL file (or builtin, builtin:code, ...): granular's --partition coactivation "
    "/ --router-init activation; readme: one per domain (repeat), or one to cluster.",
    multiple=True,
)
CALIBRATION_TOKENS = Option(
    "calibration_tokens",
    8192,
    "Calibration tokens per layer kept in memory (readme: per dataset).",
    type=int,
)
