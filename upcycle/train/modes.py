"""What `upcycle train --adapter X` trains, and how a run folder stores it.

    mixlora, lora, experts-lora   a peft adapter on the frozen model:
                                  adapter_config.json + adapter_model.safetensors
    full                          every parameter: the model as `save_pretrained` writes it
                                  (config.json = the base's, model*.safetensors in the on-disk
                                  layout transformers writes, e.g. Mixtral's per-expert
                                  block_sparse_moe.experts.E.w1/w2/w3; custom *.py copied)
    router                        only the routers: routers.safetensors holds them under the
                                  names the base checkpoint stores them (Mixtral's in-memory
                                  mlp.gate.weight is block_sparse_moe.gate.weight on disk)

The root of a run and each `checkpoints/step-N/` hold the same weight files, so `upcycle merge`
reads either. A mode is a small strategy object: `load_from` (where the weights come from: a
full run resumes from its checkpoint folder, the others load the base), `prepare` (attach the
adapter or choose the trainable parameters), `save`/`load` (the weight files of a checkpoint).
`save` takes the full tensors of a sharded (FSDP) model, gathered by every process
(`upcycle.train.sharding.full_weights`: the trainable parameters and the buffers), or None to
save from the model itself; `load` runs on the model before it is sharded.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import torch

from upcycle.errors import InputError, OptionError
from upcycle.merge import ROUTER_WEIGHTS
from upcycle.train.options import TrainOptions

ROUTER_MODULES = frozenset({"gate", "router", "shared_expert_gate"})
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
# files any mode may have written at a run's root (replaced when a resumed run finishes)
WEIGHT_FILES = (*ADAPTER_FILES, ROUTER_WEIGHTS, "model.safetensors", "model.safetensors.index.json")


def adapter_config(opts: TrainOptions):
    """The peft config for --adapter, validated (before any model is loaded)."""
    from peft import LoraConfig

    import upcycle.adapters as adapters

    try:
        if opts.adapter == "mixlora":
            config = adapters.MixLoraConfig(
                num_experts=opts.num_experts,
                top_k=opts.top_k,
                r=opts.r,
                lora_alpha=opts.alpha,
                lora_dropout=opts.dropout,
                target_modules=opts.modules,
                router_aux_loss_coef=opts.router_aux_loss_coef,
                router_z_loss_coef=opts.router_z_loss_coef,
                jitter_noise=opts.jitter_noise,
                expert_view=opts.expert_view,
                granularity=opts.granularity,
            )
        elif opts.adapter == "lora":
            config = LoraConfig(
                r=opts.r,
                lora_alpha=opts.alpha,
                lora_dropout=opts.dropout,
                target_modules=opts.modules,
                task_type="CAUSAL_LM",
            )
        else:
            config = adapters.MixLoraConfig(
                mode="experts",
                r=opts.r,
                lora_alpha=opts.alpha,
                lora_dropout=opts.dropout,
                target_modules=opts.modules,
                router_aux_loss_coef=opts.router_aux_loss_coef,
                router_z_loss_coef=opts.router_z_loss_coef,
            )
    except ValueError as e:
        raise OptionError(str(e).splitlines()[0]) from None
    return config


def attach_adapter(model, config):
    """The peft model: `config` attached to `model` (one-line errors for mismatches)."""
    from peft import LoraConfig, get_peft_model

    if isinstance(config, LoraConfig):
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        unknown = [m for m in config.target_modules if m not in present]
        if unknown:
            raise OptionError(f"unknown target module {unknown[0]!r}: the model has none")
    try:
        with warnings.catch_warnings():  # peft asks a quantized base the pre-5.x property name
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            model = get_peft_model(model, config)
    except ValueError as e:
        raise OptionError(str(e).splitlines()[0]) from None
    if isinstance(config, LoraConfig):
        from upcycle.adapters.layers import use_fast_dropout

        use_fast_dropout(model)
    return model


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


def use_router_loss(model, coef: float) -> bool:
    """Make an MoE model return its router balance loss (transformers' `aux_loss`) with weight
    `coef` (the model's `router_aux_loss_coef`); False for models without one."""
    config = model.config
    if not hasattr(config, "output_router_logits"):
        return False
    config.output_router_logits = coef > 0
    config.router_aux_loss_coef = coef
    if hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = coef
    return coef > 0


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


def write_config(base: str, folder: str, dtype: str) -> None:
    """The base's config.json (auto_map and all) with the dtype the weights are stored in,
    and the custom code files it names."""
    from upcycle.io.models import code_files, read_config

    config = read_config(base)
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    for src in code_files(base):
        shutil.copyfile(src, os.path.join(folder, os.path.basename(src)))


class PeftMode:
    """mixlora, lora, experts-lora: a peft adapter on the frozen base."""

    aux_scale = 1.0  # MixLoRA adapters return their router losses already weighted

    def __init__(self, opts: TrainOptions):
        self.opts = opts
        self.config = adapter_config(opts)

    def load_from(self, base: str, resume_from: str | None) -> str:
        return base

    def prepare(self, model, base: str):
        return attach_adapter(model, self.config)

    def save(self, model, folder: str, weights: dict | None = None) -> None:
        model.save_pretrained(folder, state_dict=weights)

    def load(self, model, folder: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        try:
            weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
        except OSError as e:
            raise InputError(f"{folder}: not a complete checkpoint ({e})") from None
        result = set_peft_model_state_dict(model, weights)
        missing = [k for k in result.missing_keys if "lora" in k]
        if missing:
            raise InputError(f"{folder}: checkpoint lacks adapter tensor {missing[0]}")


class FullMode:
    """full: every parameter trains (tied input/output embeddings stay one parameter)."""

    def __init__(self, opts: TrainOptions):
        self.opts = opts
        self.aux_scale = 1.0
        self.base = None

    def load_from(self, base: str, resume_from: str | None) -> str:
        # a checkpoint is a whole model: resuming loads it instead of the base
        return resume_from or base

    def prepare(self, model, base: str):
        self.base = base
        for p in model.parameters():
            p.requires_grad_(True)
        self.aux_scale = self.opts.router_aux_loss_coef
        use_router_loss(model, self.opts.router_aux_loss_coef)
        return model

    def save(self, model, folder: str, weights: dict | None = None) -> None:
        model.save_pretrained(folder, state_dict=weights)
        write_config(self.base, folder, self.opts.dtype)

    def load(self, model, folder: str) -> None:
        pass  # `load_from` gave the checkpoint's weights to from_pretrained


class RouterMode:
    """router: only router parameters train; everything else stays frozen."""

    def __init__(self, opts: TrainOptions):
        self.opts = opts
        self.aux_scale = 1.0
        self.base = None
        self.names: dict[str, str] = {}  # in-memory name -> on-disk name

    def load_from(self, base: str, resume_from: str | None) -> str:
        return base

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


MODES = {
    "mixlora": PeftMode,
    "lora": PeftMode,
    "experts-lora": PeftMode,
    "full": FullMode,
    "router": RouterMode,
}


def mode_for(opts: TrainOptions):
    """The strategy for opts.adapter (its options validated before any model is loaded)."""
    return MODES[opts.adapter](opts)
