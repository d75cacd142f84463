"""Dense model families as data: tensor names, FFN layout and the MoE target each maps to.

Adding a family is adding a `DenseFamily` entry below; converters never spell tensor names.
Names inside a decoder layer are relative to ``layer_prefix`` (formatted with the layer index).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FFNSpec:
    """Where a dense FFN lives in a layer. ``kind="glu"``: down(act(gate(x)) * up(x))."""

    kind: str  # "glu" (gate/up/down) or "fused_glu" (one gate_up tensor) or "mlp" (fc1/fc2)
    gate: str | None
    up: str
    down: str
    act_key: str = "hidden_act"


@dataclass(frozen=True)
class DenseFamily:
    model_type: str
    ffn: FFNSpec
    attention: tuple[str, ...]  # always present
    attention_optional: tuple[str, ...] = ()  # present depending on the config (biases)
    norms: tuple[str, ...] = ("input_layernorm.weight", "post_attention_layernorm.weight")
    layer_prefix: str = "model.layers.{i}."
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    target: str | None = None  # default MoE target (a key of upcycle.arch.targets.TARGETS)
    why_no_target: str = ""  # shown when target is None
    notes: str = ""

    def layer_tensors(self) -> tuple[str, ...]:
        ffn = tuple(n for n in (self.ffn.gate, self.ffn.up, self.ffn.down) if n)
        return self.attention + self.attention_optional + self.norms + ffn


_QKVO = tuple(f"self_attn.{p}_proj.weight" for p in "qkvo")
_QKV_BIAS = tuple(f"self_attn.{p}_proj.bias" for p in "qkv")
_LLAMA_BIAS = _QKV_BIAS + ("self_attn.o_proj.bias",)
_GLU = FFNSpec(
    "glu", gate="mlp.gate_proj.weight", up="mlp.up_proj.weight", down="mlp.down_proj.weight"
)
_GLU_BIAS = ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")

FAMILIES: dict[str, DenseFamily] = {
    f.model_type: f
    for f in [
        DenseFamily("llama", _GLU, _QKVO, _LLAMA_BIAS + _GLU_BIAS, target="mixtral"),
        DenseFamily("mistral", _GLU, _QKVO, target="mixtral"),
        DenseFamily("qwen2", _GLU, _QKVO + _QKV_BIAS, target="qwen2_moe"),
        DenseFamily(
            "qwen3",
            _GLU,
            _QKVO + ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
            _LLAMA_BIAS,
            target="qwen3_moe",
        ),
        DenseFamily(
            "gemma2",
            _GLU,
            _QKVO,
            norms=(
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "pre_feedforward_layernorm.weight",
                "post_feedforward_layernorm.weight",
            ),
            why_no_target="no stock transformers MoE class has Gemma-2's sandwich norms, "
            "scaled embeddings and logit soft-capping",
        ),
        DenseFamily(
            "gemma3_text",
            _GLU,
            _QKVO + ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
            norms=(
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "pre_feedforward_layernorm.weight",
                "post_feedforward_layernorm.weight",
            ),
            why_no_target="no stock transformers MoE class has Gemma-3's sandwich norms, "
            "scaled embeddings and local/global attention pattern",
        ),
        DenseFamily(
            "phi3",
            FFNSpec(
                "fused_glu", gate=None, up="mlp.gate_up_proj.weight", down="mlp.down_proj.weight"
            ),
            ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight"),
            why_no_target="transformers' PhiMoE differs from Phi-3 (LayerNorm with bias, "
            "attention biases, sparse-mixer routing), so no stock MoE class reproduces it",
        ),
    ]
}


@dataclass(frozen=True)
class MoEFamily:
    """A stock MoE architecture, for reading (inspect) and as a conversion target."""

    model_type: str
    experts_key: str
    top_k_key: str = "num_experts_per_tok"
    expert_width_key: str = "intermediate_size"
    shared_width_key: str | None = None


MOE_FAMILIES: dict[str, MoEFamily] = {
    f.model_type: f
    for f in [
        MoEFamily("mixtral", "num_local_experts"),
        MoEFamily(
            "qwen2_moe",
            "num_experts",
            expert_width_key="moe_intermediate_size",
            shared_width_key="shared_expert_intermediate_size",
        ),
        MoEFamily("qwen3_moe", "num_experts", expert_width_key="moe_intermediate_size"),
        MoEFamily("olmoe", "num_experts"),
        MoEFamily("phimoe", "num_local_experts"),
        MoEFamily("upcycle_bam", "num_local_experts"),  # upcycle/modeling (bam)
    ]
}


def supported_families() -> str:
    return ", ".join(sorted(f for f, s in FAMILIES.items() if s.target))
