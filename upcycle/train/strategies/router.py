"""router: only an MoE model's router parameters train; everything else stays frozen.

A run folder (and each checkpoint) holds ROUTER_WEIGHTS: the routers under the names the base
checkpoint stores them (Mixtral's in-memory mlp.gate.weight is block_sparse_moe.gate.weight on
disk), which `upcycle merge` puts into a copy of the base.
"""

from __future__ import annotations

import os

from upcycle.errors import InputError, OptionError
from upcycle.run_format import ROUTER_WEIGHTS
from upcycle.train.strategies.base import Strategy, use_router_loss

ROUTER_MODULES = frozenset({"gate", "router", "shared_expert_gate"})


def router_parameters(model) -> list[str]:
    """Names of the parameters of modules named gate (not gate_proj), router or
    shared_expert_gate: Mixtral's and Qwen-MoE's `mlp.gate`, Qwen-MoE's `mlp.shared_expert_gate`,
    BAM's attention `self_attn.router`; and every parameter inside a module named router
    (Read-ME's pre-gating transformer `model.router`)."""
    return [
        name
        for name, _ in model.named_parameters()
        if "." in name
        and (name.rsplit(".", 2)[-2] in ROUTER_MODULES or "router" in name.split(".")[:-2])
    ]


def on_disk_names(model, names: list[str], base: str) -> dict[str, str]:
    """In-memory parameter name -> the name the base checkpoint stores it under.

    transformers 5 renames some tensors when it loads (Mixtral's `block_sparse_moe.` becomes
    `mlp.`) and reverts that when it saves; its own reversal gives the on-disk name, checked
    against the base's headers (a checkpoint already in the in-memory layout keeps the name).
    """
    from upcycle.io.checkpoint import Checkpoint

    stored = set(Checkpoint(base).keys())
    params = dict(model.named_parameters())
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without load-time conversions
        revert_weight_conversion = None
    out = {}
    for name in names:
        candidates = [name]
        if revert_weight_conversion is not None:
            try:
                reverted = revert_weight_conversion(model, {name: params[name].detach()})
            except (ValueError, KeyError, RuntimeError, TypeError):
                reverted = {}  # no reversal for this tensor: the base's headers decide
            candidates = [*reverted, name]
        found = next((c for c in candidates if c in stored), None)
        if found is None:
            raise InputError(f"{base}: the checkpoint stores no tensor for router {name}")
        out[name] = found
    return out


class RouterStrategy(Strategy):
    """router: only router parameters train; the model's router aux loss at
    --router-aux-loss-coef."""

    trains_weights = True
    files = (ROUTER_WEIGHTS,)

    def __init__(self, opts):
        super().__init__(opts)
        self.base = None
        self.names: dict[str, str] = {}  # in-memory name -> on-disk name

    def prepare(self, model, base: str):
        names = router_parameters(model)
        if not names:
            raise OptionError(
                f"--adapter router: {self.opts.model} has no routers (not an MoE model)"
            )
        self.base = base
        self.names = on_disk_names(model, names, base)
        trainable = set(names)
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
        self.aux_scale = self.opts.router_aux_loss_coef
        use_router_loss(model, self.opts.router_aux_loss_coef)
        return model

    def save(self, model, folder: str, weights: dict | None = None) -> None:
        from safetensors.torch import save_file

        params = weights if weights is not None else dict(model.named_parameters())
        tensors = {
            disk: params[name].detach().to("cpu").contiguous() for name, disk in self.names.items()
        }
        save_file(tensors, os.path.join(folder, ROUTER_WEIGHTS), metadata={"format": "pt"})

    def load(self, model, folder: str) -> None:
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = os.path.join(folder, ROUTER_WEIGHTS)
        try:
            tensors = load_file(path)
        except (OSError, SafetensorError) as e:
            raise InputError(f"{folder}: not a complete checkpoint ({e})") from None
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, disk in self.names.items():
                if disk not in tensors or tensors[disk].shape != params[name].shape:
                    raise InputError(f"{path}: no router tensor {disk} of the model's shape")
                params[name].copy_(tensors[disk])
