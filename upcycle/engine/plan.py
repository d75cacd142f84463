"""Plan a dense -> MoE conversion: every check that needs no weights, and every output tensor.

    source dir --open_checkpoint--> reader --check_source--> Source (family, inventory, target,
    layers, dtype, shard size) --method.layout--> plan_layout --method.adapt_plan--> Plan

Planning reads headers and configs only: no tensor data, no calibration data, no model run.
`upcycle convert --dry-run` prints the plan; `upcycle.engine.stream` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from upcycle.arch.config import generic_config, source_config, target_config
from upcycle.arch.families import FAMILIES, MOE_FAMILIES, DenseFamily, supported_families
from upcycle.arch.shapes import expected_shapes
from upcycle.arch.targets import CUSTOM_TARGETS, TARGETS, MoETarget
from upcycle.engine.outputs import human_bytes, human_count
from upcycle.errors import InputError, OptionError, UnsupportedError
from upcycle.io.arrays import CONFIG_NAMES, NAMES, nbytes_of
from upcycle.io.checkpoint import Checkpoint
from upcycle.io.writer import parse_size, plan_shards
from upcycle.methods.base import Method, MoELayout
from upcycle.methods.options import ConvertOptions
from upcycle.methods.registry import make_method, resolve_options

IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


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
    options: ConvertOptions  # resolved: the method's options complete, top_k set
    source_params: int
    method: Method = field(repr=False, default=None)
    reader: Checkpoint = field(repr=False, default=None)  # what the conversion reads from
    code_files: list[str] = field(default_factory=list)  # modeling code copied next to the weights
    checked: Source | None = field(repr=False, default=None)  # what replan starts from

    @property
    def total_params(self) -> int:
        return sum(_numel(s) for _, _, s in self.entries)

    @property
    def active_params(self) -> int:
        return active_params(self.entries, self.config)

    @property
    def total_bytes(self) -> int:
        return sum(nbytes_of(d, s) for _, d, s in self.entries)

    @property
    def num_shards(self) -> int:
        return len(plan_shards(self.entries, self.max_shard_bytes))

    def describe(self, out: str | None = None) -> str:
        lay, cfg = self.layout, self.config
        dense = self.num_layers - len(self.moe_layers)
        bound = "" if lay.final else "at most "
        lines = [
            f"method   {self.options.method} — {self.method.info.summary}",
            f"source   {self.source} ({self.family.model_type}, {self.num_layers} layers, "
            f"hidden {cfg['hidden_size']}, {human_count(self.source_params)} params)",
            f"target   {self.target.architecture} ({self.target.model_type})",
            f"experts  {lay.num_experts} routed per MoE layer, top-{lay.top_k}, width {bound}"
            f"{lay.expert_width}"
            + (f", shared width {bound}{lay.shared_width}" if lay.shared_width else "")
            + ("" if lay.final else " (calibration decides)"),
            f"         {self.method.describe()}",
            f"layers   {len(self.moe_layers)} MoE, {dense} dense",
            f"params   {bound}{human_count(self.total_params)} total, {human_count(self.active_params)} active per token",
            f"output   {out + ': ' if out else ''}{bound}{human_bytes(self.total_bytes)} in {self.num_shards} shard(s), "
            f"{CONFIG_NAMES[self.dtype]}",
        ]
        return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


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
        if name.endswith(IGNORED_SUFFIXES):
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
        if ffn.gate and prefix + ffn.gate not in ckpt:  # (fused_glu: gate and up in one tensor)
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
    if target.keeps_source:  # the family's own layers: every tensor but the FFN has its place
        accepted |= present - ffn_rel
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
    if window and not target.keeps_source and target.model_type not in family.window_targets:
        raise UnsupportedError(
            f"{family.model_type}'s sliding-window attention is not reproduced by {target.model_type}; "
            f"use --target {family.target}"
        )
    return [rel for rel in target.zero_fill if rel not in present]


@dataclass(frozen=True)
class Source:
    """The checked source: what every plan of it shares, whatever the layout."""

    reader: Checkpoint
    family: DenseFamily
    config: dict  # the source config, with the family's defaults filled in
    layer_tensors: list[list[str]]
    target: MoETarget
    zero_fill: list[str]
    moe_layers: list[int]
    dtype: str
    max_shard_bytes: int


def output_dtype(spec: str, source_dtype: str) -> str:
    """--dtype (source, float32, bfloat16, float16) -> the safetensors name of the output dtype."""
    if spec == "source":
        return source_dtype
    if spec in NAMES:
        return NAMES[spec]
    raise OptionError(f"unknown --dtype {spec!r}; choose from source, {', '.join(NAMES)}")


def shard_bytes(spec: str | int) -> int:
    """--max-shard-size ('5GB', '500MB', '2GiB' or bytes) -> bytes."""
    try:
        return parse_size(spec)
    except ValueError as e:
        raise OptionError(f"--max-shard-size: {e}") from None


def active_params(entries, config: dict) -> int:
    """Parameters a token uses: all but the routed experts it skips (top-k of E per layer)."""
    total = sum(_numel(s) for _, _, s in entries)
    experts = sum(_numel(s) for n, _, s in entries if ".experts." in n)
    E = config.get("num_local_experts") or config.get("num_experts")
    k = config.get("num_experts_per_tok")
    return total - experts * (E - k) // E if experts and E and k else total


def check_source(reader: Checkpoint, opts: ConvertOptions, method: Method) -> Source:
    """Family, tensor inventory, target and options checked against the source's headers."""
    family = family_of(reader)
    cfg = source_config(family.model_type, reader.config)
    layers = check_inventory(reader, family, cfg)
    target = _target(opts, method, family)
    zero_fill = check_target(family, target, layers, cfg)
    moe_layers = parse_layers(opts.moe_layers, cfg["num_hidden_layers"])
    keeps_dense = target.dense_mlp or target.keeps_source
    if not keeps_dense and len(moe_layers) != cfg["num_hidden_layers"]:
        raise OptionError(
            f"{target.model_type} makes every layer an MoE layer; --moe-layers needs a target that "
            "keeps dense layers (qwen2_moe, qwen3_moe)"
        )
    return Source(
        reader=reader,
        family=family,
        config=cfg,
        layer_tensors=layers,
        target=target,
        zero_fill=zero_fill,
        moe_layers=moe_layers,
        dtype=output_dtype(opts.dtype, reader.dtype),
        max_shard_bytes=shard_bytes(opts.max_shard_size),
    )


def plan_layout(src: Source, opts: ConvertOptions, method: Method) -> Plan:
    """Every output tensor's name, dtype and shape and the target config, for the method's
    layout as it stands (before calibration it may be an upper bound: `MoELayout.final`)."""
    reader, family, target, dtype = src.reader, src.family, src.target, src.dtype
    hidden, inter = src.config["hidden_size"], src.config["intermediate_size"]
    layout = method.layout(hidden, inter)
    if layout.shared_width and not target.shared:
        raise OptionError(
            f"{target.model_type} has no shared expert; --shared-experts needs --target qwen2_moe"
        )
    config, code = _config(src, target, layout, opts, dtype)
    entries = [(family.embed, dtype, reader.shape(family.embed))]
    ffn = (family.ffn.gate, family.ffn.up, family.ffn.down)
    for i in range(src.config["num_hidden_layers"]):
        prefix = family.layer_prefix.format(i=i)
        shapes = {n: reader.shape(n) for n in src.layer_tensors[i] if n[len(prefix) :] not in ffn}
        for rel in src.zero_fill:
            shapes[prefix + rel] = reader.shape(prefix + rel.replace(".bias", ".weight"))[:1]
        entries += [(name, dtype, shapes[name]) for name in sorted(shapes)]
        if i not in src.moe_layers and target.keeps_source:  # the source's FFN, as it is
            entries += [(prefix + r, dtype, reader.shape(prefix + r)) for r in ffn if r]
            continue
        moe = i in src.moe_layers
        entries += [
            (n, dtype, s) for n, s in moe_shapes(target, prefix, layout, hidden, inter, moe)
        ]
    entries.append((family.final_norm, dtype, reader.shape(family.final_norm)))
    if family.lm_head in reader and not src.config.get("tie_word_embeddings"):
        entries.append((family.lm_head, dtype, reader.shape(family.lm_head)))
    plan = Plan(
        source=reader.path,
        family=family,
        target=target,
        layout=layout,
        moe_layers=src.moe_layers,
        num_layers=src.config["num_hidden_layers"],
        dtype=dtype,
        config=config,
        entries=entries,
        layer_tensors=src.layer_tensors,
        zero_fill=src.zero_fill,
        max_shard_bytes=src.max_shard_bytes,
        options=opts,
        source_params=reader.num_params(),
        method=method,
        reader=reader,
        code_files=code,
        checked=src,
    )
    return method.adapt_plan(plan)


def _config(
    src: Source, target: MoETarget, layout: MoELayout, opts: ConvertOptions, dtype: str
) -> tuple[dict, list[str]]:
    """The target's config.json, and the modeling code files that go with it (remote_code)."""
    make = generic_config if target.keeps_source else target_config
    config = make(
        src.reader.config if target.keeps_source else src.config,
        target,
        num_experts=layout.num_experts,
        top_k=layout.top_k,
        expert_width=layout.expert_width,
        shared_width=layout.shared_width,
        normalize_top_k=layout.needs_top_k_normalization,
        moe_layers=src.moe_layers,
        router_aux_loss_coef=opts.router_aux_loss_coef,
        dtype=CONFIG_NAMES[dtype],
    )
    if not target.remote_code:
        return config, []
    from upcycle.modeling import auto_map, code_files

    config = dict(sorted({**config, "auto_map": auto_map(target.model_type)}.items()))
    return config, code_files(target.model_type)


def plan_conversion(
    source: str,
    opts: ConvertOptions,
    *,
    method: Method | None = None,
    ckpt: Checkpoint | None = None,
) -> Plan:
    """Validate everything that can be checked without reading weights or data, and plan.

    `method` and `ckpt` replace the method named in opts and its reader of `source`
    (`upcycle merge` passes its adapter-folding method and a reader that adds LoRA deltas).
    Without `ckpt` the method's `open_checkpoint(source)` gives the reader (btx: SEED's
    headers, tensors averaged over its models); the plan keeps it as `plan.reader`.
    """
    if method is None:
        opts = resolve_options(opts)
        method = make_method(opts)
    reader = ckpt or method.open_checkpoint(source)
    return plan_layout(check_source(reader, opts, method), opts, method)


def replan(plan: Plan) -> Plan:
    """The plan again after calibration, if it changed the method's layout."""
    src = plan.checked
    hidden, inter = src.config["hidden_size"], src.config["intermediate_size"]
    if plan.method.layout(hidden, inter) == plan.layout:
        return plan
    return plan_layout(src, plan.options, plan.method)


def _target(opts: ConvertOptions, method: Method, family: DenseFamily) -> MoETarget:
    """--target, the family's default, or the architecture a method always writes (bam)."""
    if method.target:  # make_method refused a --target that differs
        return CUSTOM_TARGETS[method.target]
    name = opts.target or family.target
    if name not in TARGETS:
        raise OptionError(f"unknown --target {name!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[name]


def moe_shapes(
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
    if target.shared and (layout.shared_width or not target.shared_optional):
        out += ffn(target.shared, layout.shared_width)
        if target.shared_gate:
            out.append((prefix + target.shared_gate, (1, hidden)))
    return out
