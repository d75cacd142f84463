"""MixLoraModel: the peft tuner that injects MixLoRA layers into a transformers model."""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner
from upcycle.adapters.config import ATTENTION_MODULES
from upcycle.adapters.layers import LoraLinear, MixLoraFFN, is_gated_ffn

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe")


class MixLoraModel(BaseTuner):
    """Wraps every gated FFN in `MixLoraFFN` and every targeted attention linear in `LoraLinear`.

    Training adds the routers' balance (and z-) losses, averaged over layers, to the model's
    loss; the sum is also returned as `outputs.aux_loss`.
    """

    prefix = "mixlora_"
    tuner_layer_cls = (MixLoraFFN, LoraLinear)
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
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type in _MOE_MODEL_TYPES:
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
        if any(isinstance(m, self.tuner_layer_cls) for m in model.modules()):
            raise ValueError("the model already has a MixLoRA adapter (one per model)")
        layers = set(config.layers_to_transform) if config.layers_to_transform else None
        attention = [m for m in config.target_modules if m in ATTENTION_MODULES]
        ffns, linears = [], []
        for name, module in model.named_modules():
            found = _LAYER_INDEX.search(name + ".")
            if found is None or (layers is not None and int(found.group(1)) not in layers):
                continue
            if is_gated_ffn(module):
                ffns.append(name)
            elif isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in attention:
                linears.append(name)
        if not ffns:
            raise ValueError(
                "found no gated FFN (gate_proj, up_proj, down_proj) in the model to turn into "
                "LoRA experts"
            )
        for name in ffns:
            self._replace(model, name, lambda m: MixLoraFFN(m, adapter_name, config))
        for name in linears:
            self._replace(model, name, lambda m: LoraLinear(m, adapter_name, config))
        self.targeted_module_names = ffns + linears
        for module in model.modules():
            if isinstance(module, self.tuner_layer_cls):
                module.to(
                    module.base_layer.weight.device
                    if isinstance(module, LoraLinear)
                    else module.base_layer.gate_proj.weight.device
                )
        trainable = not config.inference_mode
        for name, param in model.named_parameters():
            param.requires_grad = trainable and f".{adapter_name}." in name and self.prefix in name

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

    def mixlora_layers(self) -> list[MixLoraFFN]:
        return [m for m in self.model.modules() if isinstance(m, MixLoraFFN)]

    def forward(self, *args, **kwargs):
        layers = self.mixlora_layers()
        for layer in layers:
            layer.aux_loss = None
        out = self.model(*args, **kwargs)
        aux = [layer.aux_loss for layer in layers if layer.aux_loss is not None]
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
