"""Activation checkpointing that leaves fused MixLoRA FFNs out of the recomputation.

transformers checkpoints whole decoder layers: backward reruns each layer's forward, FFN
included, and on the default model the FFN's three frozen projections are most of that rerun.
The fused MixLoRA FFN (`upcycle.kernels.fused`) needs little for its own backward: its input,
the positions of the dropped elements and the rank-r LoRA activations; with `recompute_base` it
reruns only the base gate/up projections there. So checkpointing it saves little memory and
costs a whole FFN forward per layer and step.

`checkpoint_attention_only` changes that for pre-norm decoder layers (the architectures whose
record in `upcycle.arch` has ``pre_norm_layers``: llama, mistral, qwen2, qwen3): per layer,
only [input norm, attention, residual add, post-attention norm] is checkpointed, and the FFN
runs once, outside. Per layer this keeps two (tokens, hidden) tensors (the layer input, as
before, and the FFN input) plus the FFN's lean state; on the default model (fp32, 1k tokens)
about 5 MB per layer more than whole-layer checkpointing; with the cheaper dropout of the same
change, the step got 16% shorter on one CPU thread (docs/benchmarks.md). Layers whose FFN is
not on the fused path keep transformers' whole-layer checkpointing.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn as nn

from upcycle.arch import record


def _attention_part(layer, hidden_states, attention_mask, position_ids, embeddings, kwargs):
    """Everything of a pre-norm decoder layer before its FFN: (residual stream, FFN input)."""
    h, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden_states),
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=None,
        use_cache=False,
        position_embeddings=embeddings,
        **kwargs,
    )
    h = hidden_states + h
    return h, layer.post_attention_layernorm(h)


def _forward(
    self,
    hidden_states: torch.Tensor,
    attention_mask=None,
    position_ids=None,
    cache=None,
    use_cache=False,
    position_embeddings=None,
    **kwargs,
):
    """A pre-norm decoder layer's forward with only its attention part checkpointed."""
    cache = kwargs.pop("past_key_values", cache)
    if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
        return type(self).forward(
            self,
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
    run = functools.partial(_attention_part, self)
    h, x = self._gradient_checkpointing_func(
        run, hidden_states, attention_mask, position_ids, position_embeddings, kwargs
    )
    return h + self.mlp(x)


def checkpoint_attention_only(model: nn.Module) -> int:
    """Checkpoint only the attention part of every decoder layer whose FFN is a fused MixLoRA
    FFN; call after `gradient_checkpointing_enable`. Returns how many layers changed (0 for
    architectures whose decoder layers are not the pre-norm sequence `_forward` reproduces
    (`Arch.pre_norm_layers`, transformers 5) or without fused FFNs)."""
    from upcycle.adapters.layers import MixLoraFFN

    config = getattr(model, "config", None)
    if not record(getattr(config, "model_type", None)).pre_norm_layers:
        return 0
    changed = 0
    for layer in model.modules():
        mlp = getattr(layer, "mlp", None)
        if not (
            isinstance(mlp, MixLoraFFN)
            and getattr(layer, "gradient_checkpointing", False)
            and all(hasattr(layer, n) for n in ("input_layernorm", "self_attn"))
            and hasattr(layer, "post_attention_layernorm")
            and all(mlp.uses_fused(name) for name in mlp.active_adapters)
        ):
            continue
        layer.forward = types.MethodType(_forward, layer)
        mlp.recompute_base = True
        changed += 1
    return changed
