"""Describe a checkpoint from its config and safetensors headers (no weights are read)."""

from __future__ import annotations

import re

from upcycle.arch import record
from upcycle.arch.targets import TARGETS
from upcycle.errors import UpcycleError
from upcycle.io.checkpoint import Checkpoint
from upcycle.methods.registry import METHODS

_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.")
_FUSED = re.compile(
    r"^(.*)\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)$"
)  # (E, ., .) tensors


def inspect_model(path: str) -> dict:
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    info: dict = {
        "path": ckpt.path,
        "family": ckpt.model_type,
        "architecture": (cfg.get("architectures") or [None])[0],
        "layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "intermediate_size": cfg.get("intermediate_size"),
        "dtype": str(ckpt.dtype).removeprefix("torch."),
        "tensors": len(ckpt.keys()),
        "params_total": ckpt.num_params(),
    }
    if record(ckpt.model_type).is_moe or any(
        _EXPERT.match(k) or _FUSED.match(k) for k in ckpt.keys()
    ):
        info.update(_moe_info(ckpt))
    else:
        info["params_active"] = info["params_total"]
        info.update(_dense_options(ckpt))
    return info


def _moe_info(ckpt: Checkpoint) -> dict:
    cfg = ckpt.config
    fam = record(ckpt.model_type).moe
    top_k = cfg.get("num_experts_per_tok") or cfg.get("moe_top_k") or 1
    per_layer: dict[str, dict[int, int]] = {}  # block prefix -> expert -> params
    for name, info in ckpt.infos.items():
        n = 1
        for s in info.shape:
            n *= s
        m = _EXPERT.match(name)
        if m:
            experts = per_layer.setdefault(m.group(1), {})
            experts[int(m.group(2))] = experts.get(int(m.group(2)), 0) + n
        elif (m := _FUSED.match(name)) and len(info.shape) == 3:  # transformers 5's fused layout
            experts = per_layer.setdefault(m.group(1), {})
            for e in range(info.shape[0]):
                experts[e] = experts.get(e, 0) + n // info.shape[0]
    inactive = 0
    for experts in per_layer.values():
        sizes = sorted(experts.values(), reverse=True)
        inactive += sum(sizes[top_k:])  # upper bound on active: the k largest experts
    shared = cfg.get(fam.shared_width_key) if fam and fam.shared_width_key else None
    out = {
        "moe": True,
        "moe_layers": len(per_layer),
        "experts": cfg.get(fam.experts_key)
        if fam
        else max((len(e) for e in per_layer.values()), default=0),
        "top_k": top_k,
        "expert_width": cfg.get(fam.expert_width_key) if fam else None,
        "shared_expert_width": shared or 0,
        "params_active": ckpt.num_params() - inactive,
        "methods": [],
        "targets": [],
    }
    if cfg.get("layer_experts"):  # upcycle_moe with per-layer counts (a pruned pyramid)
        out["layer_experts"] = list(cfg["layer_experts"])
    if cfg.get("num_attention_experts"):  # bam: soft-routed, all active
        out["attention_experts"] = (
            f"{cfg['num_attention_experts']} per layer ({cfg.get('attention_experts', 'full')}), "
            "soft-routed" + (", parallel with the FFN" if cfg.get("parallel_attention") else "")
        )
    if (
        "num_experts" in cfg
        and "num_local_experts" in cfg
        and cfg["num_experts"] != cfg["num_local_experts"]
    ):
        out["warning"] = "config disagrees with itself: num_experts != num_local_experts"
    return out


def _dense_options(ckpt: Checkpoint) -> dict:
    from upcycle.engine.plan import check_inventory, check_target

    family = record(ckpt.model_type)
    out: dict = {"moe": False, "methods": [], "targets": []}
    if not family.is_dense:
        out["note"] = f"unsupported family {ckpt.model_type}"
        return out
    if family.target is None:
        out["note"] = family.why_no_target
        return out
    try:
        layers = check_inventory(ckpt, family, ckpt.config)
    except UpcycleError as e:
        out["note"] = str(e)
        return out
    out["methods"] = sorted(METHODS)
    for name, target in TARGETS.items():
        try:
            check_target(family, target, layers, ckpt.config)
            out["targets"].append(name + (" (default)" if name == family.target else ""))
        except UpcycleError:
            continue
    return out


def format_info(info: dict) -> str:
    def human(n):
        return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"

    lines = [
        f"{info['path']}",
        f"  family        {info['family']} ({info['architecture']})",
        f"  layers        {info['layers']}, hidden {info['hidden_size']}, FFN {info['intermediate_size']}",
        f"  params        {human(info['params_total'])} total, {human(info['params_active'])} active per token",
        f"  dtype         {info['dtype']}",
    ]
    if info.get("moe"):
        lines.append(
            f"  experts       {info['experts']} per MoE layer ({info['moe_layers']} MoE layers), "
            f"top-{info['top_k']}, width {info['expert_width']}, shared width {info['shared_expert_width']}"
        )
        if info.get("attention_experts"):
            lines.append(f"  attention     {info['attention_experts']}")
    else:
        lines.append(f"  methods       {', '.join(info['methods']) or '-'}")
        lines.append(f"  targets       {', '.join(info['targets']) or '-'}")
    for key in ("note", "warning"):
        if info.get(key):
            lines.append(f"  {key:<13} {info[key]}")
    return "\n".join(lines)
