"""upcycle's BAM architecture: Mixtral FFN experts plus soft-routed attention experts.

Branch-Attend-Mix (Zhang et al., NeurIPS 2024, https://arxiv.org/abs/2408.08274) builds an MoE
from N dense models: FFN experts as in Branch-Train-MiX, and attention experts too. Every token
uses every attention expert; a per-layer router (`self_attn.router`, softmax over A experts)
weighs their outputs:

    attn(x) = sum_a w_a(x) * o_a(attention(q_a x, k_a x, v_a x))

The A experts run as one attention with A times the heads: the q, k, v projections of all
experts are stacked row-wise (expert-major) into one `q_proj`/`k_proj`/`v_proj`, and o_proj
takes the experts' weighted outputs side by side, so `o_proj.weight` is the experts' o weights
concatenated along the input dimension. Any attention backend (eager, sdpa, flash) and the
standard KV cache serve it unchanged. With `attention_experts="shared_kv"` the experts keep
their own q and o only; k and v are one shared projection, and the query heads are reordered
(kv group, expert, head in group) so that grouped-query attention pairs each with its KV head.

Self-contained: copied into every BAM checkpoint and loaded by transformers with
`trust_remote_code=True`; it imports transformers and nothing of upcycle. It runs under
transformers 5.x and 4.x: where 4.x lacks a piece (fused Mixtral experts), a stand-in of the
same weights and arithmetic is defined here.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mixtral import modeling_mixtral
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention,
    MixtralDecoderLayer,
    MixtralForCausalLM,
    MixtralModel,
    MixtralPreTrainedModel,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
    MixtralSparseMoeBlock,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_upcycle_bam import UpcycleBamConfig

# transformers 4.x keeps Mixtral's experts as Linears (w1, w2, w3); 5.x fuses them (MixtralExperts)
_FUSED_EXPERTS = hasattr(modeling_mixtral, "MixtralExperts")
if not _FUSED_EXPERTS:  # transformers 4.x: OutputRecorder lives in transformers.utils.generic
    from transformers.utils.generic import OutputRecorder

# transformers 4.x names the KV cache `past_key_values` (with `cache_position`); 5.x `cache`
_CACHE_ARG = (
    "cache" if "cache" in inspect.signature(MixtralModel.forward).parameters else "past_key_values"
)


def attention_function(implementation: str):
    """The attention backend `implementation` names (eager_attention_forward for "eager")."""
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    # transformers 4.x: no get_interface, and "eager" is not in the registry
    if implementation == "eager":
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


class UpcycleBamAttention(MixtralAttention):
    """A attention experts run as one attention with A times the query heads (see module doc)."""

    def __init__(self, config: UpcycleBamConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        hidden = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        self.num_experts = config.num_attention_experts
        self.shared_kv = config.attention_experts == "shared_kv"
        self.heads = config.num_attention_heads  # per expert
        self.kv_heads = config.num_key_value_heads  # per expert (or shared)
        kv_experts = 1 if self.shared_kv else self.num_experts
        self.num_key_value_groups = (self.num_experts * self.heads) // (kv_experts * self.kv_heads)
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_width = self.num_experts * self.heads * self.head_dim
        kv_width = kv_experts * self.kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_width, hidden, bias=False)
        self.router = nn.Linear(hidden, self.num_experts, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        A, d = self.num_experts, self.head_dim
        weights = torch.softmax(self.router(hidden_states).float(), dim=-1)  # (B, T, A)

        query = self.q_proj(hidden_states)
        if self.shared_kv:  # (expert, kv head, group) -> (kv head, expert, group)
            group = self.heads // self.kv_heads
            query = query.view(batch, length, A, self.kv_heads, group * d).transpose(2, 3)
        query = query.reshape(batch, length, -1, d).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, length, -1, d).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, -1, d).transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None and _CACHE_ARG == "cache":
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        elif cache is not None:  # transformers 4.x: update takes a dict (cache_position: static)
            extra = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
            key, value = cache.update(key, value, self.layer_idx, extra)

        attention = attention_function(self.config._attn_implementation)
        out, attn_weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=getattr(self.config, "sliding_window", None),
            **kwargs,
        )  # (B, T, heads, d)
        if self.shared_kv:
            out = out.reshape(batch, length, self.kv_heads, A, -1).transpose(2, 3)
        out = out.reshape(batch, length, A, -1) * weights.to(out.dtype).unsqueeze(-1)
        return self.o_proj(out.reshape(batch, length, -1)), attn_weights


class UpcycleBamExperts(nn.Module):
    """transformers 4.x's stand-in for 5.x's MixtralExperts: the same fused weights,
    gate_up_proj (E, 2I, H) and down_proj (E, H, I), and the same per-expert loop."""

    def __init__(self, config: UpcycleBamConfig):
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


class UpcycleBamTopKRouter(nn.Module):
    """transformers 4.x's stand-in for 5.x's MixtralTopKRouter: weight (E, H); returns the
    logits, the renormalised top-k softmax weights and their expert indices."""

    def __init__(self, config: UpcycleBamConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))

    def forward(self, hidden_states):
        logits = nn.functional.linear(hidden_states, self.weight)
        weights, indices = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        return logits, weights / weights.sum(dim=-1, keepdim=True), indices


class UpcycleBamSparseMoeBlock(nn.Module):
    """transformers 4.x's stand-in for 5.x's MixtralSparseMoeBlock (4.x's own block keeps
    per-expert Linears and returns a tuple): `gate` and fused `experts`, as in 5.x."""

    def __init__(self, config: UpcycleBamConfig):
        super().__init__()
        self.jitter_noise = config.router_jitter_noise
        self.gate = UpcycleBamTopKRouter(config)
        self.experts = UpcycleBamExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
            hidden_states = hidden_states * noise
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, indices = self.gate(flat)
        return self.experts(flat, indices, weights).reshape(shape)


class UpcycleBamDecoderLayer(MixtralDecoderLayer):
    """Attention experts, then (or, with parallel_attention, next to) Mixtral FFN experts."""

    def __init__(self, config: UpcycleBamConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.parallel_attention = config.parallel_attention
        self.self_attn = UpcycleBamAttention(config, layer_idx)
        moe = MixtralSparseMoeBlock if _FUSED_EXPERTS else UpcycleBamSparseMoeBlock
        self.mlp = moe(config)
        self.input_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        if cache is None:  # transformers 4.x passes the cache as past_key_values
            cache = kwargs.pop("past_key_values", None)
        attn, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        if self.parallel_attention:
            return hidden_states + attn + self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class UpcycleBamPreTrainedModel(MixtralPreTrainedModel):
    config_class = UpcycleBamConfig
    config: UpcycleBamConfig
    _no_split_modules = ["UpcycleBamDecoderLayer"]

    if not _FUSED_EXPERTS:  # transformers 4.x: record and initialise the stand-in MoE modules
        _can_record_outputs = {
            **MixtralPreTrainedModel._can_record_outputs,
            "router_logits": OutputRecorder(UpcycleBamTopKRouter, index=0),
        }

        def _init_weights(self, module):
            super()._init_weights(module)
            std = self.config.initializer_range
            if isinstance(module, UpcycleBamExperts):
                module.gate_up_proj.data.normal_(mean=0.0, std=std)
                module.down_proj.data.normal_(mean=0.0, std=std)
            elif isinstance(module, UpcycleBamTopKRouter):
                module.weight.data.normal_(mean=0.0, std=std)


class UpcycleBamModel(UpcycleBamPreTrainedModel, MixtralModel):
    def __init__(self, config: UpcycleBamConfig):
        MixtralPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            UpcycleBamDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class UpcycleBamForCausalLM(UpcycleBamPreTrainedModel, MixtralForCausalLM):
    def __init__(self, config: UpcycleBamConfig):
        MixtralPreTrainedModel.__init__(self, config)
        self.model = UpcycleBamModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()


__all__ = ["UpcycleBamForCausalLM", "UpcycleBamModel", "UpcycleBamPreTrainedModel"]
