"""Plan and run a dense -> MoE conversion, streaming one decoder layer at a time.

    source dir --family spec--> plan (every output tensor's name, dtype, shape; target config)
               --one layer--> method.layer(ffn) --> sharded writer (temporary sibling folder)
               --> config, tokenizer files, model card, provenance --> atomic rename to OUT

Peak memory is one layer's tensors: the reader reads tensors on demand, and the writer's shard
headers are computed from the plan so tensors go to disk as soon as they exist.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from upcycle.arch.config import source_config, target_config
from upcycle.arch.families import FAMILIES, MOE_FAMILIES, DenseFamily, supported_families
from upcycle.arch.shapes import expected_shapes
from upcycle.arch.targets import CUSTOM_TARGETS, TARGETS, MoETarget
from upcycle.card import human_count, write_metadata
from upcycle.converters import Method, make_method
from upcycle.converters.base import MoELayer, MoELayout
from upcycle.errors import InputError, OptionError, UnsupportedError
from upcycle.io.arrays import CONFIG_NAMES, NAMES, STORAGE, cast, nbytes_of, to_float32
from upcycle.io.checkpoint import Checkpoint
from upcycle.io.writer import (
    ShardedWriter,
    atomic_output_dir,
    check_output_dir,
    claims_output_dir,
    parse_size,
)

_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class ConvertOptions:
    """Everything a conversion depends on (recorded in OUT/upcycle.json)."""

    method: str = "copy"
    num_experts: int | None = None  # copy: 8; granular: granularity - shared_experts
    top_k: int | None = None  # per method: 2 (readme: 1)
    target: str | None = None
    router_init: str = "random"
    router_std: float = 0.02
    expert_noise: float = 0.0
    expert_prompts: tuple[tuple[str, ...], ...] = ()
    experts_from: tuple[str, ...] = ()  # btx: the models whose FFNs become the experts
    weights: tuple[float, ...] = ()  # btx: averaging weights of those models (default uniform)
    attention_experts: str = "full"  # bam: full or shared-kv
    parallel_attention: bool = False  # bam: attention and FFN read the same input
    keep: float = 0.5  # readme: share of each layer's neurons in a domain's mask
    router_layers: int = 1  # readme: transformer layers of the pre-gating router
    granularity: int | None = None
    shared_experts: int = 0
    partition: str = "contiguous"
    calibration_data: tuple[str, ...] = ()  # granular: one dataset; readme: one per domain
    calibration_tokens: int = 8192
    moe_layers: str = "all"
    router_aux_loss_coef: float = 0.001
    seed: int = 0
    dtype: str = "source"
    max_shard_size: str = "5GB"


@dataclass
class Plan:
    source: str
    family: DenseFamily
    target: MoETarget
    layout: MoELayout
    moe_layers: list[int]
    num_layers: int
    dtype: str  # safetensors name of the output dtype (F32, BF16, F16)
    config: dict
    entries: list[tuple[str, str, tuple[int, ...]]]
    layer_tensors: list[list[str]]  # per layer: source names of the non-FFN tensors
    zero_fill: list[str]  # relative names written as zeros
    max_shard_bytes: int
    options: ConvertOptions
    source_params: int
    method: Method = field(repr=False, default=None)
    reader: Checkpoint = field(repr=False, default=None)  # what the conversion reads from
    code_files: list[str] = field(default_factory=list)  # modeling code copied next to the weights

    @property
    def total_params(self) -> int:
        return sum(_numel(s) for _, _, s in self.entries)

    @property
    def active_params(self) -> int:
        lay = self.layout
        per_expert = 3 * lay.expert_width * self.config["hidden_size"]
        return self.total_params - len(self.moe_layers) * (lay.num_experts - lay.top_k) * per_expert

    @property
    def total_bytes(self) -> int:
        return sum(nbytes_of(d, s) for _, d, s in self.entries)

    @property
    def num_shards(self) -> int:
        from upcycle.io.writer import plan_shards

        return len(plan_shards(self.entries, self.max_shard_bytes))

    def describe(self, out: str | None = None) -> str:
        lay, cfg = self.layout, self.config
        dense = self.num_layers - len(self.moe_layers)
        lines = [
            f"method   {self.options.method} — {self.method.info.summary}",
            f"source   {self.source} ({self.family.model_type}, {self.num_layers} layers, "
            f"hidden {cfg['hidden_size']}, {human_count(self.source_params)} params)",
            f"target   {self.target.architecture} ({self.target.model_type})",
            f"experts  {lay.num_experts} routed per MoE layer, top-{lay.top_k}, width {lay.expert_width}"
            + (f", shared width {lay.shared_width}" if lay.shared_width else ""),
            f"         {self.method.describe()}",
            f"layers   {len(self.moe_layers)} MoE, {dense} dense",
            f"params   {human_count(self.total_params)} total, {human_count(self.active_params)} active per token",
            f"output   {out + ': ' if out else ''}{_bytes(self.total_bytes)} in {self.num_shards} shard(s), "
            f"{CONFIG_NAMES[self.dtype]}",
        ]
        return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'all', '0-11', '0,2,4', '12-' -> sorted layer indices."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(num_layers))
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                layers.update(range(int(lo), int(hi) + 1 if hi else num_layers))
            else:
                layers.add(int(part))
    except ValueError:
        raise OptionError(f"--moe-layers: cannot read {spec!r} (e.g. all, 0-11, 0,2,4)") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise OptionError(
            f"--moe-layers: layer {bad[0]} does not exist (the model has {num_layers})"
        )
    if not layers:
        raise OptionError("--moe-layers selects no layer")
    return sorted(layers)


def family_of(ckpt: Checkpoint) -> DenseFamily:
    mt = ckpt.model_type
    if mt in MOE_FAMILIES:
        raise UnsupportedError(
            f"{ckpt.path} is already an MoE model ({mt}); upcycle converts dense models"
        )
    family = FAMILIES.get(mt)
    if family is None:
        raise UnsupportedError(f"unsupported family {mt}; supported: {supported_families()}")
    if family.target is None:
        raise UnsupportedError(
            f"unsupported family {mt}: {family.why_no_target}; supported: {supported_families()}"
        )
    return family


def check_inventory(ckpt: Checkpoint, family: DenseFamily, cfg: dict) -> list[list[str]]:
    """Every tensor known and shaped as the config says; returns each layer's tensor names."""
    num_layers = cfg["num_hidden_layers"]
    glob, per_layer = expected_shapes(family, cfg)
    known_rel = set(family.layer_tensors())
    layers: list[list[str]] = [[] for _ in range(num_layers)]
    prefix0 = family.layer_prefix.split("{")[0]
    for name in ckpt.keys():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name in glob:
            want = glob[name]
        elif name.startswith(prefix0):
            idx, _, rel = name[len(prefix0) :].partition(".")
            if not idx.isdigit() or rel not in known_rel:
                raise InputError(
                    f"{ckpt.path}: unexpected tensor {name} for a {family.model_type} model"
                )
            i = int(idx)
            if i >= num_layers:
                raise InputError(
                    f"{ckpt.path}: config says {num_layers} layers but the weights have layer {i}"
                )
            layers[i].append(name)
            want = per_layer[rel]
        else:
            raise InputError(
                f"{ckpt.path}: unexpected tensor {name} for a {family.model_type} model"
            )
        if ckpt.shape(name) != tuple(want):
            raise InputError(
                f"{ckpt.path}: {name} has shape {list(ckpt.shape(name))} but the config implies {list(want)}"
            )
    for required in (family.embed, family.final_norm):
        if required not in ckpt:
            raise InputError(f"{ckpt.path}: tensor {required} is missing")
    if not cfg.get("tie_word_embeddings") and family.lm_head not in ckpt:
        raise InputError(
            f"{ckpt.path}: tensor {family.lm_head} is missing (embeddings are not tied)"
        )
    ffn = family.ffn
    for i in range(num_layers):
        prefix = family.layer_prefix.format(i=i)
        if prefix + ffn.gate not in ckpt:
            if prefix + ffn.up in ckpt:
                raise UnsupportedError(
                    f"layer {i}'s FFN has no gate projection ({prefix + ffn.gate}); "
                    "upcycle's MoE targets need gated (SwiGLU) FFNs"
                )
            raise InputError(
                f"{ckpt.path}: layer {i} has no FFN weights ({prefix + ffn.up} is missing)"
            )
        for rel in family.attention + family.norms + (ffn.up, ffn.down):
            if prefix + rel not in ckpt:
                raise InputError(f"{ckpt.path}: tensor {prefix + rel} is missing")
    return layers


def check_target(
    family: DenseFamily, target: MoETarget, layers: list[list[str]], cfg: dict
) -> list[str]:
    """Raise unless the target reproduces the source's attention exactly; return zero-filled names."""
    accepted = set(target.attention + target.attention_optional + target.zero_fill)
    ffn_rel = {family.ffn.gate, family.ffn.up, family.ffn.down}
    prefix = family.layer_prefix.format(i=0)
    present = {n[len(prefix) :] for n in layers[0]}
    for rel in sorted(present - ffn_rel):
        if rel.startswith("mlp."):
            raise UnsupportedError(
                f"{family.model_type} with {rel} cannot be upcycled: no target has FFN biases"
            )
        if rel not in accepted:
            raise UnsupportedError(
                f"{family.model_type} -> {target.model_type} would not be exact: "
                f"{target.model_type} has no place for {rel}"
            )
    for rel in target.attention:
        if rel not in present:
            raise UnsupportedError(
                f"{family.model_type} -> {target.model_type} would not be exact: "
                f"{target.model_type} needs {rel}, which {family.model_type} lacks"
            )
    window = cfg.get("sliding_window") and cfg.get("use_sliding_window", True)
    if window and family.model_type not in target.same_sliding_window:
        raise UnsupportedError(
            f"{family.model_type}'s sliding-window attention is not reproduced by {target.model_type}; "
            f"use --target {family.target}"
        )
    return [rel for rel in target.zero_fill if rel not in present]


def plan_conversion(
    source: str,
    opts: ConvertOptions,
    *,
    method: Method | None = None,
    ckpt: Checkpoint | None = None,
) -> Plan:
    """Validate everything that can be checked without reading weights, and plan the output.

    `method` and `ckpt` replace the method named in opts and the plain reader of `source`
    (`upcycle merge` passes its adapter-folding method and a reader that adds LoRA deltas).
    Without `ckpt`, a method with an `open_checkpoint(source)` supplies the reader (btx: SEED's
    headers, tensors averaged over its models); the plan keeps it as `plan.reader`.
    """
    method = method or make_method(opts)
    ckpt = ckpt or _open_reader(source, method)
    family = family_of(ckpt)
    src_cfg = source_config(family.model_type, ckpt.config)
    num_layers = src_cfg["num_hidden_layers"]
    layers = check_inventory(ckpt, family, src_cfg)
    target = _target(opts, method, family)
    zero_fill = check_target(family, target, layers, src_cfg)
    moe_layers = parse_layers(opts.moe_layers, num_layers)
    if target.dense_mlp is None and len(moe_layers) != num_layers:
        raise OptionError(
            f"{target.model_type} makes every layer an MoE layer; --moe-layers needs a target that "
            "keeps dense layers (qwen2_moe, qwen3_moe)"
        )
    if opts.dtype == "source":
        dtype = ckpt.dtype
    elif opts.dtype in NAMES:
        dtype = NAMES[opts.dtype]
    else:
        raise OptionError(f"unknown --dtype {opts.dtype!r}; choose from source, {', '.join(NAMES)}")
    try:
        max_shard = parse_size(opts.max_shard_size)
    except ValueError as e:
        raise OptionError(f"--max-shard-size: {e}") from None

    hidden, inter = src_cfg["hidden_size"], src_cfg["intermediate_size"]
    layout = method.layout(hidden, inter)
    if layout.shared_width and not target.shared:
        raise OptionError(
            f"{target.model_type} has no shared expert; --shared-experts needs --target qwen2_moe"
        )
    config = target_config(
        src_cfg,
        target,
        num_experts=layout.num_experts,
        top_k=layout.top_k,
        expert_width=layout.expert_width,
        shared_width=layout.shared_width,
        normalize_top_k=layout.needs_top_k_normalization,
        moe_layers=moe_layers,
        router_aux_loss_coef=opts.router_aux_loss_coef,
        dtype=CONFIG_NAMES[dtype],
    )

    entries: list[tuple[str, str, tuple[int, ...]]] = [
        (family.embed, dtype, ckpt.shape(family.embed))
    ]
    for i in range(num_layers):
        prefix = family.layer_prefix.format(i=i)
        names = [
            n
            for n in layers[i]
            if n[len(prefix) :] not in (family.ffn.gate, family.ffn.up, family.ffn.down)
        ]
        names += [prefix + rel for rel in zero_fill]
        shapes = {n: ckpt.shape(n) for n in layers[i]}
        for rel in zero_fill:
            shapes[prefix + rel] = ckpt.shape(prefix + rel.replace(".bias", ".weight"))[:1]
        for name in sorted(names):
            entries.append((name, dtype, shapes[name]))
        entries += [
            (n, dtype, s)
            for n, s in _moe_shapes(target, prefix, layout, hidden, inter, i in moe_layers)
        ]
    entries.append((family.final_norm, dtype, ckpt.shape(family.final_norm)))
    if family.lm_head in ckpt and not src_cfg.get("tie_word_embeddings"):
        entries.append((family.lm_head, dtype, ckpt.shape(family.lm_head)))
    plan = Plan(
        source=ckpt.path,
        family=family,
        target=target,
        layout=layout,
        moe_layers=moe_layers,
        num_layers=num_layers,
        dtype=dtype,
        config=config,
        entries=entries,
        layer_tensors=layers,
        zero_fill=zero_fill,
        max_shard_bytes=max_shard,
        options=opts,
        source_params=ckpt.num_params(),
        method=method,
        reader=ckpt,
    )
    adapt_plan = getattr(method, "adapt_plan", None)  # bam: attention experts, its own config
    if adapt_plan:
        adapt_plan(plan)
    return plan


def _target(opts: ConvertOptions, method: Method, family: DenseFamily) -> MoETarget:
    """--target, the family's default, or the architecture a method always writes (bam)."""
    own = getattr(method, "target", None)
    if own:  # make_method refused a --target that differs
        return CUSTOM_TARGETS[own]
    name = opts.target or family.target
    if name not in TARGETS:
        raise OptionError(f"unknown --target {name!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[name]


def _open_reader(source: str, method: Method) -> Checkpoint:
    """The method's own reader where it has one (btx averages several models), else SEED's."""
    open_checkpoint = getattr(method, "open_checkpoint", None)
    return open_checkpoint(source) if open_checkpoint else Checkpoint(source)


def _moe_shapes(
    target: MoETarget, prefix: str, layout: MoELayout, hidden: int, inter: int, moe: bool
):
    """Names and shapes of one layer's FFN part in the target layout, in write order."""

    def ffn(fmt, width):
        return [
            (prefix + fmt.format(p=target.proj["gate"]), (width, hidden)),
            (prefix + fmt.format(p=target.proj["up"]), (width, hidden)),
            (prefix + fmt.format(p=target.proj["down"]), (hidden, width)),
        ]

    if not moe:
        return ffn(target.dense_mlp, inter)
    out = [(prefix + target.router, (layout.num_experts, hidden))] if target.router else []
    E, width = layout.num_experts, layout.expert_width
    if target.fused:
        gate_up, down = target.fused
        out += [(prefix + gate_up, (E, 2 * width, hidden)), (prefix + down, (E, hidden, width))]
    else:
        for e in range(E):
            out += ffn(target.expert.replace("{e}", str(e)), width)
    if target.shared:
        out += ffn(target.shared, layout.shared_width)
        if target.shared_gate:
            out.append((prefix + target.shared_gate, (1, hidden)))
    return out


def _layer_outputs(plan: Plan, ckpt: Checkpoint, i: int) -> dict[str, np.ndarray]:
    fam, tgt, dtype = plan.family, plan.target, plan.dtype
    prefix = fam.layer_prefix.format(i=i)
    roles = {"gate": fam.ffn.gate, "up": fam.ffn.up, "down": fam.ffn.down}
    out: dict[str, np.ndarray] = {}
    for name in plan.layer_tensors[i]:
        if name[len(prefix) :] not in roles.values():
            out[name] = ckpt.get(name, dtype)
    for rel in plan.zero_fill:
        out[prefix + rel] = np.zeros(
            ckpt.shape(prefix + rel.replace(".bias", ".weight"))[:1], dtype=STORAGE[dtype]
        )
    ffn = {role: ckpt.get(prefix + rel, dtype) for role, rel in roles.items()}
    if i not in plan.moe_layers:
        for role, t in ffn.items():
            out[prefix + tgt.dense_mlp.format(p=tgt.proj[role])] = t
        return out
    layer: MoELayer = plan.method.layer(i, ffn, dtype)
    if tgt.router:
        out[prefix + tgt.router] = cast(layer.router, "F32", dtype)
    if tgt.fused:
        gate_up, down = tgt.fused
        out[prefix + gate_up] = np.stack(
            [np.concatenate([x["gate"], x["up"]]) for x in layer.experts]
        )
        out[prefix + down] = np.stack([x["down"] for x in layer.experts])
    else:
        for e, expert in enumerate(layer.experts):
            for role, t in expert.items():
                out[prefix + tgt.expert_name(e, role)] = t
    if tgt.shared:
        hidden = ffn["down"].shape[0]
        empty = np.zeros((0, hidden), STORAGE[dtype])
        shared = layer.shared or {"gate": empty, "up": empty, "down": empty.T}
        if layer.shared and tgt.shared_gate_at_zero != 1.0:  # undo the gate's value at zero weights
            down = to_float32(shared["down"], dtype) / np.float32(tgt.shared_gate_at_zero)
            shared = {**shared, "down": cast(down, "F32", dtype)}
        for role, t in shared.items():
            out[prefix + tgt.shared.format(p=tgt.proj[role])] = t
        if tgt.shared_gate:
            out[prefix + tgt.shared_gate] = np.zeros((1, hidden), STORAGE[dtype])
    finish_layer = getattr(plan.method, "finish_layer", None)  # bam: attention experts
    return finish_layer(i, prefix, out, dtype) if finish_layer else out


@dataclass
class Summary:
    out: str
    architecture: str
    total_params: int
    active_params: int
    bytes_on_disk: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"wrote {self.out}\n"
            f"  {self.architecture}: {human_count(self.total_params)} params, "
            f"{human_count(self.active_params)} active per token\n"
            f"  {_bytes(self.bytes_on_disk)} on disk, {self.seconds:.1f} s"
        )


@claims_output_dir  # OUT is claimed before the work: a concurrent writer stops here
def convert(
    source: str,
    out: str,
    opts: ConvertOptions,
    *,
    force: bool = False,
    progress: bool = True,
    fsync: bool = False,
    log=None,
    method: Method | None = None,
    ckpt: Checkpoint | None = None,
) -> Summary:
    """Convert the dense checkpoint at `source` into an MoE checkpoint at `out`.

    `fsync` flushes every file to disk before the final rename; without it the result is still
    atomic against errors, Ctrl-C and full disks, but not against a power cut.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    check_output_dir(out, force)
    plan = plan_conversion(source, opts, method=method, ckpt=ckpt)
    ckpt = plan.reader
    plan.method.prepare(plan.source, plan.moe_layers, log)
    from tqdm.auto import tqdm

    with atomic_output_dir(out, force=force, fsync=fsync) as tmp:
        writer = ShardedWriter(tmp, plan.entries, plan.max_shard_bytes, fsync=fsync)
        order = iter(plan.entries)
        try:

            def emit(tensors: dict[str, np.ndarray]) -> None:
                for _ in range(len(tensors)):
                    name = next(order)[0]
                    writer.write(name, tensors[name])

            emit({plan.family.embed: ckpt.get(plan.family.embed, plan.dtype)})
            for i in tqdm(
                range(plan.num_layers),
                desc="converting",
                unit="layer",
                disable=not progress,
                file=sys.stderr,
            ):
                emit(_layer_outputs(plan, ckpt, i))
            tail = {plan.family.final_norm: ckpt.get(plan.family.final_norm, plan.dtype)}
            if plan.entries[-1][0] == plan.family.lm_head:
                tail[plan.family.lm_head] = ckpt.get(plan.family.lm_head, plan.dtype)
            emit(tail)
            extra_tensors = getattr(plan.method, "extra_tensors", None)  # readme: its pre-gate
            if extra_tensors:
                emit(extra_tensors(plan, ckpt))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        write_metadata(plan, tmp)
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    return Summary(
        os.path.abspath(out),
        plan.target.architecture,
        plan.total_params,
        plan.active_params,
        size,
        time.perf_counter() - start,
    )
