"""mixlora, lora, experts-lora: a peft adapter on the frozen base.

A run folder (and each checkpoint) holds adapter_config.json and adapter_model.safetensors, as
peft saves them. Each strategy builds its peft config in `peft_config`; the rest is shared.
"""

from __future__ import annotations

import os
import warnings
from types import MappingProxyType

from upcycle.errors import InputError, OptionError
from upcycle.train.strategies.base import Strategy

# Options of the LoRA adapters (and their quantized bases): name -> how the command line spells
# it. The strategies that train the model's own weights refuse them when changed.
PEFT_OPTIONS = MappingProxyType(
    {
        "num_experts": "--num-experts/-E",
        "top_k": "--top-k/-k",
        "r": "--r",
        "alpha": "--alpha",
        "dropout": "--dropout",
        "target_modules": "--target-modules",
        "expert_view": "--expert-view",
        "granularity": "--granularity",
        "router_z_loss_coef": "--router-z-loss-coef",
        "jitter_noise": "--jitter-noise",
        "load_in_4bit": "--load-in-4bit",
        "load_in_8bit": "--load-in-8bit",
    }
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def attach_adapter(model, config):
    """The peft model: `config` attached to `model` (one-line errors for mismatches).

    A plain LoRA's target modules name the model's own linears; where the model fuses some
    (Phi-3: qkv_proj, gate_up_proj), the parts' names (q/k/v_proj, gate/up_proj, as in the
    default --target-modules) target the fused linear instead."""
    from peft import LoraConfig, get_peft_model

    if isinstance(config, LoraConfig):
        from upcycle.adapters.config import fused_targets

        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets = fused_targets(sorted(config.target_modules), present)
        if set(targets) != set(config.target_modules):
            config.target_modules = set(targets)
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


class PeftStrategy(Strategy):
    """A peft adapter on the frozen base; subclasses say which (`peft_config`)."""

    options = PEFT_OPTIONS
    files = ADAPTER_FILES

    def __init__(self, opts):
        super().__init__(opts)  # aux_scale 1: MixLoRA returns its router losses weighted
        try:
            self.config = self.peft_config(opts)  # validated before any model is loaded
        except ValueError as e:
            raise OptionError(str(e).splitlines()[0]) from None

    def peft_config(self, opts):
        """The peft config for these options (ValueError for a bad value)."""
        raise NotImplementedError

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


class MixLoraStrategy(PeftStrategy):
    """mixlora: LoRA experts and a top-k router on each FFN (`upcycle.adapters`)."""

    own_options = ("expert_view", "granularity")

    def peft_config(self, opts):
        import upcycle.adapters as adapters

        return adapters.MixLoraConfig(
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


class LoraStrategy(PeftStrategy):
    """lora: plain LoRA (peft's), with upcycle's dropout."""

    def peft_config(self, opts):
        from peft import LoraConfig

        return LoraConfig(
            r=opts.r,
            lora_alpha=opts.alpha,
            lora_dropout=opts.dropout,
            target_modules=opts.modules,
            task_type="CAUSAL_LM",
        )


class ExpertsLoraStrategy(PeftStrategy):
    """experts-lora: LoRA on an MoE model's own experts (MixLoRA's "experts" mode)."""

    def peft_config(self, opts):
        import upcycle.adapters as adapters

        return adapters.MixLoraConfig(
            mode="experts",
            r=opts.r,
            lora_alpha=opts.alpha,
            lora_dropout=opts.dropout,
            target_modules=opts.modules,
            router_aux_loss_coef=opts.router_aux_loss_coef,
            router_z_loss_coef=opts.router_z_loss_coef,
        )
