"""upcycle's Read-ME architecture: one pre-gating router decides every layer's expert.

Read-ME (Cai et al., NeurIPS 2024, https://arxiv.org/abs/2410.19123) refactors a dense model
into an MoE whose routing does not depend on the backbone: a small causal transformer over the
token ids (`model.router`) picks each token's expert(s) once, and every MoE layer uses that
choice. Because the choice is known before the backbone runs (`plan_experts`), a server can
batch requests by expert, prefetch experts and cache them.

Each layer's FFN is an always-on residual (shared) expert plus routed experts, all slices of
the dense FFN's neurons; experts narrower than the config's width are padded with zero neurons
(a zero neuron adds nothing: silu(0) * 0 = 0 and its down column is zero).

Generation: the router has its own KV cache, kept on the backbone's cache object, so prefill
and token-by-token decoding route exactly as a full forward pass does. Beam search reorders
the backbone cache only; use greedy or sampled decoding.

Self-contained: copied into every Read-ME checkpoint and loaded by transformers with
`trust_remote_code=True`; it imports transformers and nothing of upcycle. It runs under
transformers 5.x and 4.x: where 4.x lacks a piece (fused Mixtral experts), a stand-in of the
same weights and arithmetic is defined here.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention,
    MixtralDecoderLayer,
    MixtralForCausalLM,
    MixtralModel,
    MixtralPreTrainedModel,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
)

from .configuration_upcycle_readme import UpcycleReadmeConfig

try:
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
except ImportError:  # transformers 4.x: Mixtral's experts are Linears; UpcycleReadmeExperts below
    MixtralExperts = None

_ROUTER_CACHE = "_upcycle_readme_router_cache"  # attribute of the backbone's cache

# transformers 4.x names the KV cache `past_key_values` (with `cache_position`); 5.x `cache`
_CACHE_ARG = (
    "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
)


def causal_mask(config, inputs_embeds, attention_mask, cache, position_ids):
    """create_causal_mask for the tokens after those `cache` holds."""
    if _CACHE_ARG == "cache":
        return create_causal_mask(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
    # transformers 4.x: input_embeds, past_key_values and the new tokens' cache_position
    past = cache.get_seq_length() if cache is not None else 0
    length = inputs_embeds.shape[1]
    return create_causal_mask(
        config=config,
        input_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache_position=torch.arange(past, past + length, device=inputs_embeds.device),
        past_key_values=cache,
        position_ids=position_ids,
    )


class UpcycleReadmePreGate(nn.Module):
    """Token ids -> expert logits (B, T, E): embeddings, causal transformer layers, a head."""

    def __init__(self, config: UpcycleReadmeConfig):
        super().__init__()
        self.config = config.router_config()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(self.config, i) for i in range(config.router_num_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=self.config)
        self.head = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        hidden = self.embed_tokens(input_ids)
        if self.layers:
            mask = causal_mask(self.config, hidden, attention_mask, cache, position_ids)
            position_embeddings = self.rotary_emb(hidden, position_ids)
            for layer in self.layers:
                hidden = layer(
                    hidden,
                    attention_mask=mask,
                    position_ids=position_ids,
                    position_embeddings=position_embeddings,
                    **{_CACHE_ARG: cache},
                )
        return self.head(self.norm(hidden))


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax -> top-k -> renormalize: (indices, weights), each (..., top_k)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    return indices, weights / weights.sum(dim=-1, keepdim=True)


class UpcycleReadmeMLP(nn.Module):
    def __init__(self, config: UpcycleReadmeConfig, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UpcycleReadmeExperts(nn.Module):
    """transformers 4.x's stand-in for 5.x's MixtralExperts: the same fused weights,
    gate_up_proj (E, 2I, H) and down_proj (E, H, I), and the same per-expert loop."""

    def __init__(self, config: UpcycleReadmeConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        hidden, width = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, width))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():  # (E, K, T): which (slot, token) pairs each expert serves
            mask = nn.functional.one_hot(top_k_index, self.num_experts).permute(2, 1, 0)
            hit = mask.sum(dim=(-1, -2)).nonzero().flatten().tolist()
        for expert in hit:
            slot, token = torch.where(mask[expert])
            gate_up = nn.functional.linear(hidden_states[token], self.gate_up_proj[expert])
            gate, up = gate_up.chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class UpcycleReadmeMoE(nn.Module):
    """Residual expert (always on) plus the routed experts the pre-gate chose."""

    def __init__(self, config: UpcycleReadmeConfig):
        super().__init__()
        self.experts = (MixtralExperts or UpcycleReadmeExperts)(config)
        width = config.shared_expert_intermediate_size
        self.shared_expert = UpcycleReadmeMLP(config, width) if width else None

    def forward(self, hidden_states, routing):
        indices, weights = routing
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        out = self.experts(
            flat, indices.reshape(flat.shape[0], -1), weights.reshape(flat.shape[0], -1)
        ).reshape(shape)
        if self.shared_expert is not None:
            out = out + self.shared_expert(hidden_states)
        return out


class UpcycleReadmeDecoderLayer(MixtralDecoderLayer):
    def __init__(self, config: UpcycleReadmeConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = MixtralAttention(config, layer_idx)
        self.mlp = UpcycleReadmeMoE(config)
        self.input_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states,
        position_embeddings=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        expert_routing=None,
        **kwargs,
    ):
        if cache is None:  # transformers 4.x passes the cache as past_key_values
            cache = kwargs.pop("past_key_values", None)
        attn, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_CACHE_ARG: cache},
            **kwargs,
        )
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(
            self.post_attention_layernorm(hidden_states), expert_routing
        )


class UpcycleReadmePreTrainedModel(MixtralPreTrainedModel):
    config_class = UpcycleReadmeConfig
    config: UpcycleReadmeConfig
    _no_split_modules = ["UpcycleReadmeDecoderLayer", "LlamaDecoderLayer"]

    if MixtralExperts is None:  # transformers 4.x: initialise the stand-in experts

        def _init_weights(self, module):
            super()._init_weights(module)
            if isinstance(module, UpcycleReadmeExperts):
                module.gate_up_proj.data.normal_(mean=0.0, std=self.config.initializer_range)
                module.down_proj.data.normal_(mean=0.0, std=self.config.initializer_range)


class UpcycleReadmeModel(UpcycleReadmePreTrainedModel, MixtralModel):
    def __init__(self, config: UpcycleReadmeConfig):
        MixtralPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.router = UpcycleReadmePreGate(config)
        self.layers = nn.ModuleList(
            UpcycleReadmeDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def route(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """(indices, weights), each (B, T, top_k): the experts every layer uses for each token."""
        return route(self.router_logits(input_ids, attention_mask, position_ids, cache),
                     self.config.num_experts_per_tok)  # fmt: skip

    def router_logits(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """The pre-gate's (B, T, E) logits, run with its own KV cache kept on `cache`."""
        router_cache = None
        if cache is not None:
            router_cache = getattr(cache, _ROUTER_CACHE, None)
            if router_cache is None:
                router_cache = DynamicCache()
                setattr(cache, _ROUTER_CACHE, router_cache)
        if position_ids is None:
            past = router_cache.get_seq_length() if router_cache is not None else 0
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device) + past
            position_ids = position_ids.unsqueeze(0)
        return self.router(input_ids, attention_mask, position_ids, router_cache)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        past_key_values=None,
        **kwargs,
    ):
        if input_ids is None:
            raise ValueError("Read-ME routes from token ids: pass input_ids")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        logits = self.router_logits(input_ids, attention_mask, position_ids, cache)
        out = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            expert_routing=route(logits, self.config.num_experts_per_tok),
            **{_CACHE_ARG: cache},
            **kwargs,
        )
        if kwargs.get("output_router_logits"):  # one router for all layers: its balance loss
            out.router_logits = (logits.reshape(-1, logits.shape[-1]),)
        return out


class UpcycleReadmeForCausalLM(UpcycleReadmePreTrainedModel, MixtralForCausalLM):
    def __init__(self, config: UpcycleReadmeConfig):
        MixtralPreTrainedModel.__init__(self, config)
        self.model = UpcycleReadmeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    @torch.no_grad()
    def plan_experts(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Every layer's experts for each token, before any backbone layer runs.

        Returns (num_hidden_layers, batch, seq_len, top_k) expert indices (the pre-gate's one
        choice per token, shared by every layer; an expanded view, no copy).
        """
        indices, _ = self.model.route(input_ids, attention_mask)
        return indices.unsqueeze(0).expand(self.config.num_hidden_layers, *indices.shape)


__all__ = ["UpcycleReadmeForCausalLM", "UpcycleReadmeModel", "UpcycleReadmePreTrainedModel"]
