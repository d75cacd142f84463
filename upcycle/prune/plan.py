"""What a prune does, decided from the options, the config and the safetensors headers alone.

`read_layout` finds where an MoE checkpoint keeps its routers and experts (the names come from
its architecture record's `MoETarget`), `plan_schedule` turns the options into the experts kept
per layer, the top-k and the expert width, refusing anything the output could not hold. Nothing
here reads tensor data, calibration data or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from upcycle.arch import record
from upcycle.arch.spec import MoETarget
from upcycle.errors import InputError, OptionError, UnsupportedError
from upcycle.io.checkpoint import Checkpoint

CRITERIA = ("frequency", "uncurl", "merge", "random")
WIDTH_MULTIPLE = 8  # expert widths are rounded up to a multiple of this
TOKENS_PER_EXPERT = 8  # calibration tokens needed per routed expert of the source


@dataclass(frozen=True)
class PruneOptions:
    experts: int | None = None  # N: experts kept per pruned layer (None: experts stay)
    by: str = "frequency"  # frequency, uncurl, merge or random
    layers: str | None = None  # "0-3,7": the layers pruned (None: every MoE layer)
    pyramid: bool = False  # N in the first pruned layer, linearly up to E in the last
    top_k: int | None = None  # a new top-k (None: the model's)
    width: float | None = None  # fraction of each expert's neurons kept (None: all)
    max_tokens: int = 32768
    seq_len: int = 256
    seed: int = 0


@dataclass(frozen=True)
class Layout:
    """Where an MoE checkpoint keeps its experts: every name relative to `prefix`."""

    model_type: str
    target: MoETarget
    prefix: str  # the layer prefix, formatted with i
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int  # E: the most experts of any MoE layer
    top_k: int  # k
    width: int  # I, each routed expert's width
    hidden: int
    fused: bool  # experts in two (E, 2I, H) / (E, H, I) tensors, else one tensor per projection
    layer_experts: dict[int, int]  # MoE layer -> its experts (E in each, unless the config lists)

    def router(self, i: int) -> str:
        return self.prefix.format(i=i) + self.target.router

    def fused_names(self, i: int) -> tuple[str, str]:
        gate_up, down = self.target.fused
        return self.prefix.format(i=i) + gate_up, self.prefix.format(i=i) + down

    def expert(self, i: int, e: int, role: str) -> str:
        return self.prefix.format(i=i) + self.target.expert_name(e, role)


@dataclass(frozen=True)
class Schedule:
    """The prune decided from the options: experts kept per MoE layer, top-k, expert width."""

    counts: dict[int, int]  # MoE layer -> experts kept (E: the layer's experts stay)
    top_k: int
    width: int  # new expert width (the layout's when --width is not given)
    fraction: float | None  # --width

    @property
    def num_experts(self) -> int:
        """The most experts any MoE layer keeps."""
        return max(self.counts.values())

    @property
    def uniform(self) -> bool:
        return len(set(self.counts.values())) == 1


def read_layout(ckpt: Checkpoint) -> Layout:
    """The layout of an MoE checkpoint upcycle can prune; InputError for any other model."""
    arch = record(ckpt.model_type)
    target = arch.target_spec
    if target is None or target.router is None:
        raise InputError(
            f"{ckpt.path} is not an MoE checkpoint upcycle can prune ({ckpt.model_type}); "
            f"supported: {', '.join(supported())}"
        )
    cfg = ckpt.config
    num_layers = int(cfg.get("num_hidden_layers") or 0)
    prefix = arch.layer_prefix
    moe = tuple(i for i in range(num_layers) if prefix.format(i=i) + target.router in ckpt)
    if not moe:
        raise InputError(f"{ckpt.path}: no router tensor ({target.router}) in any layer")
    counts = {i: ckpt.shape(prefix.format(i=i) + target.router)[0] for i in moe}
    hidden = ckpt.shape(prefix.format(i=moe[0]) + target.router)[1]
    if len(set(counts.values())) > 1 and target.layer_experts_key is None:
        raise InputError(
            f"{ckpt.path}: the routers of its MoE layers have different expert counts "
            f"({min(counts.values())} to {max(counts.values())}), which {ckpt.model_type} "
            "cannot hold"
        )
    fused = bool(target.fused) and prefix.format(i=moe[0]) + target.fused[1] in ckpt
    if not fused and not target.expert:
        raise InputError(
            f"{ckpt.path}: layer {moe[0]} has no {target.fused[1]}; "
            f"{ckpt.model_type} checkpoints with other expert layouts are not supported"
        )
    first = prefix.format(i=moe[0])
    down = first + (target.fused[1] if fused else target.expert_name(0, "down"))
    if down not in ckpt:
        raise InputError(f"{ckpt.path}: tensor {down} is missing")
    width = ckpt.shape(down)[-1]
    top_k = int(cfg.get(arch.moe.top_k_key) or 0)
    layout = Layout(
        ckpt.model_type,
        target,
        prefix,
        num_layers,
        moe,
        max(counts.values()),
        top_k,
        width,
        hidden,
        fused,
        counts,
    )
    check_layout(ckpt, layout)
    return layout


def check_layout(ckpt: Checkpoint, layout: Layout) -> None:
    """Every MoE layer has E router rows and every expert tensor, of one width."""
    if not 1 <= layout.top_k <= min(layout.layer_experts.values()):
        raise InputError(f"{ckpt.path}: num_experts_per_tok {layout.top_k} is not in 1..E")
    h, w = layout.hidden, layout.width
    for i in layout.moe_layers:
        e = layout.layer_experts[i]
        want = {layout.router(i): (e, h)}
        if layout.fused:
            gate_up, down = layout.fused_names(i)
            want.update({gate_up: (e, 2 * w, h), down: (e, h, w)})
        else:
            for x in range(e):
                want[layout.expert(i, x, "gate")] = (w, h)
                want[layout.expert(i, x, "up")] = (w, h)
                want[layout.expert(i, x, "down")] = (h, w)
        for name, shape in want.items():
            if name not in ckpt:
                raise InputError(f"{ckpt.path}: tensor {name} is missing")
            if tuple(ckpt.shape(name)) != shape:
                raise InputError(
                    f"{ckpt.path}: {name} has shape {tuple(ckpt.shape(name))}, expected {shape}"
                )


def supported() -> list[str]:
    """The model types prune reads: MoE records with a router per layer."""
    from upcycle.arch.records import RECORDS

    return [t for t, r in RECORDS.items() if r.target_spec and r.target_spec.router]


def parse_layers(spec: str, layout: Layout) -> list[int]:
    """'0-3,7' -> sorted layer indices, each an MoE layer of the model."""
    layers: set[int] = set()
    try:
        for part in str(spec).split(","):
            lo, dash, hi = part.strip().partition("-")
            last = (int(hi) if hi.strip() else layout.num_layers - 1) if dash else int(lo)
            layers.update(range(int(lo), last + 1))
    except ValueError:
        raise OptionError(f"--layers: cannot read {spec!r} (e.g. 0-3,7)") from None
    for i in sorted(layers):
        if not 0 <= i < layout.num_layers:
            raise OptionError(
                f"--layers: layer {i} does not exist (the model has {layout.num_layers})"
            )
        if i not in layout.moe_layers:
            raise OptionError(f"--layers: layer {i} is not an MoE layer")
    if not layers:
        raise OptionError("--layers selects no layer")
    return sorted(layers)


def pyramid(n: int, e: int, layers: int) -> list[int]:
    """Experts kept in each of `layers` pruned layers: n in the first, e in the last, linear
    in between, rounded half up (one layer: n)."""
    if layers == 1:
        return [n]
    return [n + math.floor((e - n) * j / (layers - 1) + 0.5) for j in range(layers)]


def expert_width(width: int, fraction: float) -> int:
    """The kept width: the top `fraction` of `width` neurons, rounded up to WIDTH_MULTIPLE."""
    need = math.ceil(fraction * width - 1e-9)
    return min(width, WIDTH_MULTIPLE * math.ceil(need / WIDTH_MULTIPLE))


def plan_schedule(layout: Layout, opts: PruneOptions) -> Schedule:
    """The experts each MoE layer keeps, the top-k and the width; OptionError or
    UnsupportedError (one line) for any request the output cannot hold."""
    if opts.experts is None and opts.width is None:
        raise OptionError("nothing to prune: give --experts N and/or --width F")
    if opts.by not in CRITERIA:
        raise OptionError(f"--by must be one of {', '.join(CRITERIA)}, got {opts.by!r}")
    if opts.width is not None and not 0 < opts.width <= 1:
        raise OptionError(f"--width must be in (0, 1], got {opts.width}")
    counts = dict(layout.layer_experts)
    if opts.experts is None:
        if opts.layers is not None or opts.pyramid:
            raise OptionError("--layers and --pyramid choose layers for --experts; give --experts")
    else:
        chosen = parse_layers(opts.layers, layout) if opts.layers else list(layout.moe_layers)
        fewest_source = min(layout.layer_experts[i] for i in chosen)
        if not 1 <= opts.experts < fewest_source:
            raise OptionError(
                f"--experts must be between 1 and {fewest_source - 1} "
                f"(the model has {fewest_source} experts per MoE layer)"
            )
        e = max(layout.layer_experts[i] for i in chosen)
        kept = (
            pyramid(opts.experts, e, len(chosen)) if opts.pyramid else [opts.experts] * len(chosen)
        )
        counts.update(
            {i: min(n, layout.layer_experts[i]) for i, n in zip(chosen, kept, strict=True)}
        )
    fewest = min(counts.values())
    top_k = _top_k(layout, opts, fewest)
    _check_counts(layout, counts)
    width = layout.width if opts.width is None else expert_width(layout.width, opts.width)
    return Schedule(counts, top_k, width, opts.width)


def _top_k(layout: Layout, opts: PruneOptions, fewest: int) -> int:
    if opts.top_k is None:
        if layout.top_k > fewest:
            raise OptionError(
                f"--experts {fewest} is below the model's top-k {layout.top_k}; "
                f"pass --top-k K (K <= {fewest}) to lower it"
            )
        return layout.top_k
    if not 1 <= opts.top_k <= fewest:
        raise OptionError(
            f"--top-k must be between 1 and the {fewest} experts kept, got {opts.top_k}"
        )
    return opts.top_k


def _check_counts(layout: Layout, counts: dict[int, int]) -> None:
    """A schedule whose layers keep different numbers of experts needs an architecture that
    lists them per layer (upcycle_moe's `layer_experts`); the others hold one count."""
    if len(set(counts.values())) == 1 or layout.target.layer_experts_key:
        return
    low, high = min(counts.values()), max(counts.values())
    raise UnsupportedError(
        f"{layout.model_type} holds one expert count for all MoE layers, but this prune keeps "
        f"{low} to {high} per layer; prune every MoE layer to the same --experts, or convert "
        "with --target upcycle_moe, which holds a count per layer"
    )


def check_tokens(tokens: int, layout: Layout) -> None:
    """Routing statistics need TOKENS_PER_EXPERT calibration tokens per source expert."""
    need = TOKENS_PER_EXPERT * layout.num_experts
    if tokens < need:
        raise InputError(
            f"the data gives {tokens} calibration tokens; pruning {layout.num_experts} experts "
            f"needs at least {need} ({TOKENS_PER_EXPERT} per expert)"
        )


def new_config(config: dict, layout: Layout, schedule: Schedule) -> dict:
    """The source config with the new expert count, top-k and expert width."""
    out = dict(config)
    arch = record(layout.model_type)
    keys = set(layout.target.experts_keys) | {arch.moe.experts_key}
    for key in sorted(keys):
        if key in out or key == layout.target.experts_keys[0]:
            out[key] = schedule.num_experts
    per_layer = layout.target.layer_experts_key
    if per_layer:
        out.pop(per_layer, None)
        if not schedule.uniform:
            out[per_layer] = [schedule.counts[i] for i in layout.moe_layers]
    out[arch.moe.top_k_key] = schedule.top_k
    out[layout.target.expert_width_key] = schedule.width
    return out
