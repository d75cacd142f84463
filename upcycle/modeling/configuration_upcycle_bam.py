"""Configuration of upcycle's BAM architecture (FFN experts and soft-routed attention experts).

Self-contained: this file is copied next to the weights of every BAM checkpoint and loaded by
transformers with `trust_remote_code=True`, so it imports transformers and nothing of upcycle.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.mixtral.configuration_mixtral import MixtralConfig

ATTENTION_EXPERT_KINDS = ("full", "shared_kv")


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
        if self.attention_experts not in ATTENTION_EXPERT_KINDS:
            raise ValueError(
                f"attention_experts must be one of {ATTENTION_EXPERT_KINDS}, "
                f"got {self.attention_experts!r}"
            )
        if self.num_attention_experts < 1:
            raise ValueError("num_attention_experts must be at least 1")
        super().__post_init__(**kwargs)


__all__ = ["UpcycleBamConfig"]
