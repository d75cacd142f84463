"""Configuration of upcycle's BAM architecture (FFN experts and soft-routed attention experts).

Self-contained: this file is copied next to the weights of every BAM checkpoint and loaded by
transformers with `trust_remote_code=True`, so it imports transformers and nothing of upcycle.
It runs under transformers 5.x (dataclass configs) and 4.x (configs with an `__init__`).
"""

from __future__ import annotations

from dataclasses import is_dataclass

from transformers.models.mixtral.configuration_mixtral import MixtralConfig

if is_dataclass(MixtralConfig):
    from huggingface_hub.dataclasses import strict
else:  # transformers 4.x: configs are plain classes, which huggingface_hub's @strict rejects

    def strict(cls):
        return cls


ATTENTION_EXPERT_KINDS = ("full", "shared_kv")
_FIELDS = ("num_attention_experts", "attention_experts", "parallel_attention", "qkv_bias")


@strict
class UpcycleBamConfig(MixtralConfig):
    """A Mixtral config plus the attention experts of Branch-Attend-Mix.

    num_attention_experts: attention experts per layer (A), all active for every token and
        mixed with softmax weights from `self_attn.router`.
    attention_experts: "full" (each expert has its own q, k, v and o projections) or
        "shared_kv" (each expert has q and o; k and v are shared, so the KV cache is the
        dense model's size).
    parallel_attention: attention and FFN both read the layer's input (x + attn(ln1 x) +
        moe(ln2 x)) instead of the FFN reading the attention's output.
    qkv_bias: q, k and v projections have biases (Qwen2-style attention).
    """

    model_type = "upcycle_bam"

    num_attention_experts: int = 2
    attention_experts: str = "full"
    parallel_attention: bool = False
    qkv_bias: bool = False

    def __post_init__(self, **kwargs):
        self._check_attention_experts()
        super().__post_init__(**kwargs)

    if not is_dataclass(MixtralConfig):  # transformers 4.x: fields come through __init__

        def __init__(self, **kwargs):
            for name in _FIELDS:  # the class attributes above are the defaults
                setattr(self, name, kwargs.pop(name, getattr(type(self), name)))
            self._check_attention_experts()
            super().__init__(**kwargs)

    def _check_attention_experts(self) -> None:
        if self.attention_experts not in ATTENTION_EXPERT_KINDS:
            raise ValueError(
                f"attention_experts must be one of {ATTENTION_EXPERT_KINDS}, "
                f"got {self.attention_experts!r}"
            )
        if self.num_attention_experts < 1:
            raise ValueError("num_attention_experts must be at least 1")


__all__ = ["UpcycleBamConfig"]
