"""upcycle's generic MoE architecture: a dense family's own decoder with MoE FFNs in chosen layers.

`UpcycleMoeForCausalLM` builds the base family's transformers model (`config.base_config()`,
its `*ForCausalLM` class from transformers' causal-LM auto mapping) and adopts its `model` and
`lm_head`, so attention, norms (Gemma's sandwich norms included), embedding scale, rotary
embeddings, the sliding/global layer pattern, masks and the KV cache are the family's own code,
and parameter names are exactly the family's. Only `mlp` of the layers in `config.moe_layers`
is replaced, by an `UpcycleMoeBlock`:

    logits = gate(x);  p = softmax(logits) in fp32;  (w, e) = top-k(p)
    w = w / sum(w)                                   (when norm_topk_prob)
    out = sum_k w_k * down_e(act(gate_e x) * up_e x)  + g(x) * shared_expert(x)
    g(x) = sigmoid(shared_expert_gate(x))            (when config.shared_expert_gate, else 1)

By default (`fused_experts`) the experts are stored fused, as transformers 5 holds them:
`experts.gate_up_proj` (E, 2I, H), gate rows first, and `experts.down_proj` (E, H, I). That
experts module is decorated with transformers' `use_experts_implementation`, so
`experts_implementation` ("eager", "grouped_mm", "batched_mm", ...) selects how they run;
"eager" is the loop over active experts below. With `fused_experts=False` the experts are one
gated FFN module each, `experts.{e}.{gate,up,down}_proj.weight`, run by the same loop. With
identical experts and `norm_topk_prob` a layer equals the dense FFN.

The forward pass is the family's `ForCausalLM.forward` (final logit soft-capping, logits_to_keep,
loss), run on this model, plus the router logits and the load-balancing loss when
`output_router_logits` is on (`aux_loss`, added to `loss` times `router_aux_loss_coef`).

Self-contained: copied into every upcycle_moe checkpoint and loaded by transformers with
`trust_remote_code=True`; it imports transformers and nothing of upcycle. It needs
transformers 5 (the `cache` keyword, fused-experts interface, dataclass configs); transformers
4.x is not supported.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_upcycle_moe import UpcycleMoeConfig

# Families whose ForCausalLM drops the KV cache once the prompt passes
# `original_max_position_embeddings` (long-RoPE switches its scaling there, so the cached keys
# were rotated with the other factors); generation here does the same for them.
_RESET_CACHE_PAST_ORIGINAL_CONTEXT = frozenset({"phi3"})
# What a model class says about attention backends; this model takes its family's answers.
_ATTENTION_FLAGS = (
    "_supports_flash_attn",
    "_supports_sdpa",
    "_supports_flex_attn",
    "_supports_attention_backend",
)


def weighted_expert_sum(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    expert_fn,
) -> torch.Tensor:
    """sum_k w_k * expert_fn(e_k, x) per token, looping over the experts some token chose.

    hidden_states (N, H); top_k_index, top_k_weights (N, k); expert_fn(e, x (n, H)) -> (n, H).
    """
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        counts = torch.bincount(top_k_index.flatten(), minlength=num_experts)
        active = counts.nonzero().flatten().tolist()
    for expert in active:
        token, slot = torch.where(top_k_index == expert)
        y = expert_fn(expert, hidden_states[token])
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


class WeightedExperts:
    """The experts' forward for both layouts: each token's top-k experts, weighted; a subclass
    gives `num_experts` and `expert(index, hidden_states)`."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """hidden_states (N, H); top_k_index, top_k_weights (N, k) -> weighted expert sum (N, H)."""
        return weighted_expert_sum(
            hidden_states, top_k_index, top_k_weights, self.num_experts, self.expert
        )


@use_experts_implementation
class UpcycleMoeExperts(WeightedExperts, nn.Module):
    """E gated FFN experts in two fused tensors: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""

    def __init__(self, config: UpcycleMoeConfig, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim)
        )
        self.down_proj = nn.Parameter(
            torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim)
        )
        self.act_fn = ACT2FN[config.expert_activation()]

    def expert(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Expert `index` on hidden_states (n, H) -> (n, H)."""
        gate, up = nn.functional.linear(hidden_states, self.gate_up_proj[index]).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, self.down_proj[index])


class UpcycleMoeMLP(nn.Module):
    """A gated FFN down(act(gate x) * up x) of width `width`, with the family's activation."""

    def __init__(self, config: UpcycleMoeConfig, width: int):
        super().__init__()
        hidden = config.hidden_size
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = ACT2FN[config.expert_activation()]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(
            self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)
        )


class UpcycleMoeExpertList(WeightedExperts, nn.ModuleList):
    """E gated FFN experts stored apart (`fused_experts=False`): `{e}.gate_proj.weight` (I, H),
    `{e}.up_proj.weight` (I, H), `{e}.down_proj.weight` (H, I)."""

    def __init__(self, config: UpcycleMoeConfig, num_experts: int):
        width = config.moe_intermediate_size
        super().__init__(UpcycleMoeMLP(config, width) for _ in range(num_experts))
        self.num_experts = num_experts

    def expert(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        return self[index](hidden_states)


class UpcycleMoeSharedExpert(UpcycleMoeMLP):
    """The always-on expert: a gated FFN of width shared_expert_intermediate_size."""

    def __init__(self, config: UpcycleMoeConfig):
        super().__init__(config, config.shared_expert_intermediate_size)


class UpcycleMoeBlock(nn.Module):
    """The FFN of an MoE layer: router `gate`, `num_experts` routed `experts` (fused or one
    module each), optional `shared_expert` and its optional `shared_expert_gate` (Linear(H, 1))."""

    def __init__(self, config: UpcycleMoeConfig, num_experts: int | None = None):
        super().__init__()
        num_experts = config.num_experts if num_experts is None else num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False)
        if config.fused_experts:
            self.experts = UpcycleMoeExperts(config, num_experts)
        else:
            self.experts = UpcycleMoeExpertList(config, num_experts)
        shared = config.shared_expert_intermediate_size > 0
        self.shared_expert = UpcycleMoeSharedExpert(config) if shared else None
        self.shared_expert_gate = None
        if shared and config.shared_expert_gate:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) -> the top-k weights (fp32) and expert indices, each (N, k)."""
        probs = torch.softmax(self.gate(hidden_states), dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, index

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        weights, index = self.route(flat)
        out = self.experts(flat, index, weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.reshape(shape)


class UpcycleMoePreTrainedModel(PreTrainedModel):
    """Attention backends are the family's: its model checks the one requested (the flags
    below let the request through to it) and this model then takes the family's flags."""

    config_class = UpcycleMoeConfig
    config: UpcycleMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def initialize_weights(self):
        # The MoE blocks sit inside the family's model, whose own `_init_weights` covers their
        # Linears (router, shared expert and its gate, per-expert FFNs) but not the fused
        # expert tensors.
        super().initialize_weights()
        std = getattr(self.config, "initializer_range", None) or 0.02
        for module in self.modules():
            if isinstance(module, UpcycleMoeExperts):
                init.normal_(module.gate_up_proj, mean=0.0, std=std)
                init.normal_(module.down_proj, mean=0.0, std=std)


@contextmanager
def recording_router_logits(blocks: list[UpcycleMoeBlock]):
    """Collects the router logits (N, E) of `blocks` while the context is open, in call order."""
    logits: list[torch.Tensor] = []
    hooks = [
        block.gate.register_forward_hook(lambda _module, _args, out: logits.append(out))
        for block in blocks
    ]
    try:
        yield logits
    finally:
        for hook in hooks:
            hook.remove()


def family_class(base_config) -> type:
    """The family's *ForCausalLM class for its config object."""
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)]
    except KeyError:
        raise ValueError(
            f"transformers has no causal LM class for base_model_type {base_config.model_type!r}"
        ) from None


class UpcycleMoeForCausalLM(UpcycleMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: UpcycleMoeConfig):
        requested = config._attn_implementation  # None: the family's default
        super().__init__(config)
        base_config = config.base_config()
        base_config._attn_implementation = requested
        self.family_cls = family_class(base_config)
        dense = self.family_cls(base_config)
        # The family's model checked the attention backend; this model reports its answer and
        # its abilities (masks made for generation read this config).
        config._attn_implementation_internal = base_config._attn_implementation
        for flag in _ATTENTION_FLAGS:
            setattr(self, flag, getattr(self.family_cls, flag))
        if set(dict(dense.named_children())) != {"model", "lm_head"}:
            raise ValueError(
                f"{self.family_cls.__name__} is not a decoder `model` and an `lm_head`; "
                "upcycle_moe cannot keep it"
            )
        self.model = dense.model
        self.lm_head = dense.lm_head
        self.vocab_size = config.vocab_size
        for i in config.moe_layers:
            self.model.layers[i].mlp = UpcycleMoeBlock(config, config.experts_in(i))
        self.post_init()

    def moe_blocks(self) -> list[UpcycleMoeBlock]:
        return [self.model.layers[i].mlp for i in self.config.moe_layers]

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        # The family's model takes its defaults from its own config object; this model's config
        # is the one users and trainers change, so its settings are passed on explicitly.
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", None)
        for name in ("output_attentions", "output_hidden_states"):
            if getattr(self.config, name, False):
                kwargs.setdefault(name, True)
        with recording_router_logits(self.moe_blocks() if output_router_logits else []) as logits:
            out = self.family_cls.forward(
                self,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                return_dict=True,
                **kwargs,
            )
        loss, aux_loss = out.loss, None
        if output_router_logits and logits:
            aux_loss = self.load_balancing_loss(logits, attention_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=out.logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            router_logits=tuple(logits) if output_router_logits else None,
        )

    def load_balancing_loss(self, router_logits, attention_mask) -> torch.Tensor:
        """Switch-Transformer load-balancing loss over the MoE layers' router logits (each (N, E))."""
        rows = router_logits[0].shape[0]
        mask = attention_mask
        if mask is not None and (mask.dim() != 2 or mask.numel() != rows):
            mask = None  # a 4D mask, or a cache's longer mask: weigh every token
        k = self.config.num_experts_per_tok
        if self.config.layer_experts is None:
            return load_balancing_loss_func(tuple(router_logits), self.config.num_experts, k, mask)
        # Layers with different expert counts: each layer's loss with its own E, averaged.
        losses = [
            load_balancing_loss_func((logits,), logits.shape[-1], k, mask)
            for logits in router_logits
        ]
        return torch.stack(losses).mean()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache=None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        original = getattr(self.config, "original_max_position_embeddings", None)
        if (
            self.config.base_model_type in _RESET_CACHE_PAST_ORIGINAL_CONTEXT
            and cache is not None
            and original is not None
            and input_ids.shape[1] > original
            and cache.get_seq_length() <= original
        ):  # recompute the whole prefix with the long-context RoPE factors, as the family does
            cache, next_sequence_length = None, None
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )


__all__ = [
    "UpcycleMoeBlock",
    "UpcycleMoeExpertList",
    "UpcycleMoeExperts",
    "UpcycleMoeForCausalLM",
    "UpcycleMoeMLP",
    "UpcycleMoePreTrainedModel",
    "UpcycleMoeSharedExpert",
]
