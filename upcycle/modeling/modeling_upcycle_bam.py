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
`trust_remote_code=True`; it imports transformers and nothing of upcycle.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
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
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
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


class UpcycleBamDecoderLayer(MixtralDecoderLayer):
    """Attention experts, then (or, with parallel_attention, next to) Mixtral FFN experts."""

    def __init__(self, config: UpcycleBamConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.parallel_attention = config.parallel_attention
        self.self_attn = UpcycleBamAttention(config, layer_idx)
        self.mlp = MixtralSparseMoeBlock(config)
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
