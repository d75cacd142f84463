"""Configuration of upcycle's Read-ME architecture (experts chosen by one pre-gating router).

Self-contained: this file is copied next to the weights of every Read-ME checkpoint and loaded
by transformers with `trust_remote_code=True`, so it imports transformers and nothing of upcycle.
It runs under transformers 5.x (dataclass configs) and 4.x (configs with an `__init__`).
"""

from __future__ import annotations

from dataclasses import is_dataclass

from transformers import LlamaConfig
from transformers.models.mixtral.configuration_mixtral import MixtralConfig

if is_dataclass(MixtralConfig):
    from huggingface_hub.dataclasses import strict
else:  # transformers 4.x: configs are plain classes, which huggingface_hub's @strict rejects

    def strict(cls):
        return cls


_FIELDS = ("shared_expert_intermediate_size", "router_num_layers", "router_intermediate_size")


@strict
class UpcycleReadmeConfig(MixtralConfig):
    """A Mixtral config whose routing comes from one router that runs before the backbone.

    num_local_experts / intermediate_size: routed experts per layer and their width (experts of
        a layer narrower than this are padded with zero neurons, which add nothing).
    num_experts_per_tok: experts each token uses (Read-ME: 1), the same expert in every layer.
    shared_expert_intermediate_size: width of the always-on residual expert (0: none).
    router_num_layers, router_intermediate_size: the pre-gating router, a small causal
        transformer over token ids with the backbone's width, heads and RoPE.
    """

    model_type = "upcycle_readme"

    shared_expert_intermediate_size: int = 0
    router_num_layers: int = 1
    router_intermediate_size: int = 1024

    def __post_init__(self, **kwargs):
        self._check_router()
        super().__post_init__(**kwargs)

    if not is_dataclass(MixtralConfig):  # transformers 4.x: fields come through __init__

        def __init__(self, **kwargs):
            for name in _FIELDS:  # the class attributes above are the defaults
                setattr(self, name, kwargs.pop(name, getattr(type(self), name)))
            self._check_router()
            super().__init__(**kwargs)

    def _check_router(self) -> None:
        if self.router_num_layers < 0:
            raise ValueError("router_num_layers must not be negative")

    def router_config(self) -> LlamaConfig:
        """The pre-gating router's own transformer config."""
        if is_dataclass(LlamaConfig):
            rope = dict(rope_parameters=dict(self.rope_parameters))
        else:  # transformers 4.x: RoPE comes as rope_theta and rope_scaling
            rope = dict(
                rope_theta=self.rope_theta, rope_scaling=getattr(self, "rope_scaling", None)
            )
        config = LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.router_intermediate_size,
            num_hidden_layers=max(self.router_num_layers, 1),
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim or self.hidden_size // self.num_attention_heads,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            attention_dropout=0.0,
            **rope,
        )
        config._attn_implementation = "sdpa"
        return config


__all__ = ["UpcycleReadmeConfig"]
