"""A conversion method: the `Method` base class, and what a method produces.

A method is small: given one dense FFN (arrays by role: gate, up, down) it returns an MoE layer
(router, experts, optional shared expert). It never sees file names or shards; the engine in
`upcycle.engine` plans, streams and writes. Every hook the engine calls is declared on
`Method` with a default that does nothing, in the order the engine calls them; a method
overrides the ones it needs. Methods are listed in `upcycle.methods.registry`.

Tensors are numpy arrays (see `upcycle.io.arrays`): FFN and expert weights are stored in the
output dtype (BF16 as uint16), routers and shared-expert gates are float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from upcycle.io.checkpoint import Checkpoint
from upcycle.methods.options import ConvertOptions, Option


@dataclass(frozen=True)
class MoELayout:
    """The shape of every MoE layer a method will produce (known before any weight is read)."""

    num_experts: int
    top_k: int
    expert_width: int
    shared_width: int = 0
    needs_top_k_normalization: bool = True  # exactness relies on renormalized top-k weights
    final: bool = True  # False: the widths are upper bounds that calibration fixes (readme)


@dataclass
class MoELayer:
    router: np.ndarray  # (E, H) float32
    experts: list[dict[str, np.ndarray]]  # E x {"gate": (I_e, H), "up": (I_e, H), "down": (H, I_e)}
    shared: dict[str, np.ndarray] | None = None  # {"gate","up","down"}: always on, weight 1


@dataclass
class MethodInfo:
    name: str
    paper: str
    summary: str
    exact: str
    aliases: tuple[str, ...] = field(default_factory=tuple)


def layer_rng(seed: int, layer: int, salt: int) -> np.random.Generator:
    """A generator whose stream depends only on (seed, layer, salt): order-independent output."""
    return np.random.default_rng([seed, layer, salt])


class Method:
    """The base of every conversion method; the engine calls its hooks in this order:

    1. `from_options(opts)`: the method, from ConvertOptions whose `method_options` hold its
       own `options` (all present, parsed); then `validate()`. Nothing is read yet.
    2. `open_checkpoint(source)`: the reader every tensor comes from (btx: SEED, averaged).
    3. `layout(hidden, intermediate)`: the shape of every MoE layer. A method whose widths
       depend on data returns upper bounds marked `final=False` until `calibrate` ran.
    4. `adapt_plan(plan)`: a new plan with the method's own tensors, config keys, code files.
    5. `calibrate(reader, moe_layers, log)`: everything that reads data or runs the dense
       model; `--dry-run` stops before it. The engine then plans again if the layout changed.
    6. `layer(i, ffn, dtype)` for each MoE layer, then `finish_layer(i, prefix, tensors, dtype)`
       for every layer; `extra_tensors(plan, reader)` after the last one.
    7. `write_files(folder)`, `report()` and `inexact()` when the model folder is written.
    """

    info: ClassVar[MethodInfo]
    options: ClassVar[tuple[Option, ...]] = ()  # the method options it reads (options.py)
    default_top_k: ClassVar[int] = 2
    target: ClassVar[str | None] = None  # the architecture it always writes (its own)

    @classmethod
    def from_options(cls, opts: ConvertOptions) -> Method:
        raise NotImplementedError

    def validate(self) -> None:
        """Raise OptionError for options that cannot work together."""

    def describe(self) -> str:
        return ""

    def open_checkpoint(self, source: str) -> Checkpoint:
        return Checkpoint(source)

    def layout(self, hidden: int, intermediate: int) -> MoELayout:
        raise NotImplementedError

    def adapt_plan(self, plan):
        """The plan (`upcycle.engine.plan.Plan`) with the method's own tensors and config keys:
        a new one (`dataclasses.replace`), never the same object edited."""
        return plan

    def calibrate(self, reader: Checkpoint, moe_layers: list[int], log) -> None:
        """Read calibration data or run the dense model at `reader.path`."""

    def layer(self, i: int, ffn: dict[str, np.ndarray], dtype: str) -> MoELayer:
        raise NotImplementedError

    def finish_layer(self, i: int, prefix: str, out: dict, dtype: str) -> dict:
        """All of decoder layer i's output tensors, by name; return them (changed or not)."""
        return out

    def extra_tensors(self, plan, reader: Checkpoint) -> dict[str, np.ndarray]:
        """Tensors written after the last layer (plan.entries' tail that adapt_plan added)."""
        return {}

    def write_files(self, folder: str) -> None:
        """Files of the method's own in the output folder."""

    def report(self) -> dict | None:
        """What the method found (recorded in upcycle.json), or None."""
        return None

    def inexact(self) -> str | None:
        """Why these options make the output differ from the dense model on purpose (the
        card says so), or None."""
        return None
