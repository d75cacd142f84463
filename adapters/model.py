"""MixLoraModel: the peft tuner that injects MixLoRA layers into a transformers model."""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner
from upcycle.adapters.config import ATTENTION_MODULES, FUSED_MODULES
from upcycle.adapters.layers import (
    ExpertsLora,
    LoraLinear,
    MixLoraFFN,
    TrainableRouter,
    is_fused_experts,
    is_gated_ffn,
)

from upcycle.arch import record

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class MixLoraModel(BaseTuner):
    """Wraps every gated FFN in `MixLoraFFN` and every targeted attention linear in `LoraLinear`.

    Training adds the routers' balance (and z-) losses, averaged over layers, to the model's
    loss; the sum is also returned as `outputs.aux_loss`.
    """

    prefix = "mixlora_"
    tuner_layer_cls = (MixLoraFFN, LoraLinear, ExpertsLora, TrainableRouter)
    target_module_mapping: dict = {}

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict=None,
    ) -> None:
        config = self.peft_config[adapter_name]
        config.validate()
        _check_base(model, config)
        if any(isinstance(m, self.tuner_layer_cls) for m in model.modules()):
            raise ValueError("the model already has a MixLoRA adapter (one per model)")
        ffns, linears, experts, routers = _find_targets(model, config)
        for name in ffns:
            self._replace(model, name, lambda m: MixLoraFFN(m, adapter_name, config))
        for name in experts:
            self._replace(model, name, lambda m: ExpertsLora(m, adapter_name, config))
        for name in routers:
            self._replace(model, name, lambda m: TrainableRouter(m, adapter_name, config))
        for name in linears:
            self._replace(model, name, lambda m: LoraLinear(m, adapter_name, config))
        self.targeted_module_names = ffns + experts + routers + linears
        for module in model.modules():
            if isinstance(module, self.tuner_layer_cls):
                device = next(module.base_layer.parameters()).device
                for attr in module.adapter_layer_names:
                    getattr(module, attr).to(device)
        trainable = not config.inference_mode
        for name, param in model.named_parameters():
            ours = f".{adapter_name}." in name or name.endswith(f".{adapter_name}")
            param.requires_grad = trainable and ours and self.prefix in name

    @staticmethod
    def _replace(model: nn.Module, name: str, make) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))

    def _create_and_replace(self, *args, **kwargs) -> None:  # injection is done above
        raise NotImplementedError

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            param.requires_grad = self.prefix in name and "base_layer" not in name

    def mixlora_layers(self) -> list[nn.Module]:
        """The layers that compute a router loss."""
        return [m for m in self.model.modules() if isinstance(m, (MixLoraFFN, TrainableRouter))]

    def forward(self, *args, **kwargs):
        # Layers keep their router loss only while this call runs. Activation checkpointing
        # reruns layer forwards during backward; a loss kept from such a rerun would hold the
        # layer's whole recomputed graph until the next step (about 30 MB per layer at 1k
        # tokens on the default model).
        layers = self.mixlora_layers()
        for layer in layers:
            layer.aux_loss, layer.collect_aux = None, True
        try:
            out = self.model(*args, **kwargs)
            aux = [layer.aux_loss for layer in layers if layer.aux_loss is not None]
        finally:
            for layer in layers:
                layer.aux_loss, layer.collect_aux = None, False
        if aux:
            total = torch.stack(aux).mean()
            out.aux_loss = total
            if getattr(out, "loss", None) is not None:
                out.loss = out.loss + total.to(out.loss.dtype)
        return out

    def merge_and_unload(self, *args, **kwargs):
        raise ValueError(
            "MixLoRA experts do not fold into a dense model; export a stock MoE checkpoint "
            "with `upcycle merge RUN OUT` (or upcycle.merge.merge)"
        )


def _check_base(model: nn.Module, config) -> None:
    """Refuse a base the adapter does not fit: an MoE for MixLoRA (its record in upcycle.arch
    says so), or another base than the one the adapter was trained on. A new adapter takes
    the base's fingerprint."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.mode == "mixlora" and record(model_type).is_moe:
        raise ValueError(
            f"the base is already an MoE model ({model_type}); put LoRA on its experts "
            "with the experts-lora adapter instead"
        )
    from upcycle.adapters.fingerprint import model_fingerprint

    fingerprint = model_fingerprint(model)
    if config.base_fingerprint is None:
        config.base_fingerprint = fingerprint
    elif config.base_fingerprint != fingerprint:
        raise ValueError(
            "this MixLoRA adapter was trained on another base model "
            f"(fingerprint {config.base_fingerprint}, this model's is {fingerprint})"
        )


def _attention_names(config) -> set[str]:
    """The attention linears' names the adapter targets: those named in target_modules, and a
    fused projection (Phi-3's qkv_proj) where target_modules names any of its parts."""
    names = {m for m in config.target_modules if m in ATTENTION_MODULES}
    for fused, parts in FUSED_MODULES.items():
        if fused in ATTENTION_MODULES and names & set(parts):
            names.add(fused)
    return names


def _fused_gate_up(model: nn.Module) -> bool:
    """Whether the model's record (upcycle.arch) says its FFN is one gate_up tensor with the
    gate rows first (Phi-3): the row order is a convention the module itself does not show."""
    ffn = record(getattr(getattr(model, "config", None), "model_type", None)).ffn
    return ffn is not None and ffn.kind == "fused_glu"


def _find_targets(model: nn.Module, config):
    """The modules the adapter replaces, by kind: (gated FFNs, attention linears, fused
    experts, routers). For experts-lora, also sets config.num_experts and config.top_k from
    the model."""
    layers = set(config.layers_to_transform) if config.layers_to_transform else None
    attention = _attention_names(config)
    fused_gate_up = _fused_gate_up(model)
    ffns, linears, experts, routers = [], [], [], []
    for name, module in model.named_modules():
        found = _LAYER_INDEX.search(name + ".")
        if found is None or (layers is not None and int(found.group(1)) not in layers):
            continue
        if config.mode == "experts" and is_fused_experts(module):
            experts.append(name)
            routers.append(_router_of(model, name, module))
        elif config.mode == "experts" and _is_attention_router(name, module):
            routers.append(name)  # bam's soft attention routers train with the FFN routers
        elif config.mode == "mixlora" and is_gated_ffn(module, fused_gate_up):
            ffns.append(name)
        elif isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in attention:
            linears.append(name)
    if config.mode == "experts":
        if not experts:
            raise ValueError(
                "found no MoE experts (fused gate_up_proj/down_proj) in the model; "
                "for a dense base use the mixlora adapter"
            )
        first = model.get_submodule(experts[0]).gate_up_proj
        config.num_experts = int(first.shape[0])
        config.top_k = int(getattr(model.config, "num_experts_per_tok", config.top_k))
    elif not ffns:
        raise ValueError(
            "found no gated FFN (gate_proj, up_proj, down_proj, or Phi-3's gate_up_proj and "
            "down_proj) in the model to turn into LoRA experts"
        )
    return ffns, linears, experts, routers


def _router_of(model: nn.Module, name: str, experts: nn.Module) -> str:
    """The name of the router `gate` next to the fused experts `name`, checked for shape."""
    router = name.rsplit(".", 1)[0] + ".gate"
    weight = getattr(model.get_submodule(router), "weight", None) if _has(model, router) else None
    if weight is None or weight.shape != (
        experts.gate_up_proj.shape[0],
        experts.gate_up_proj.shape[2],
    ):
        raise ValueError(f"{name}: no router `gate` with an (experts, hidden) weight next to it")
    return router


def _is_attention_router(name: str, module: nn.Module) -> bool:
    return name.endswith("self_attn.router") and isinstance(module, nn.Linear)


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
