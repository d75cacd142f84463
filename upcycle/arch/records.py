"""One record per model_type, dense and MoE: the architectures upcycle knows, as frozen data.

Adding a family is adding one `Arch` to RECORDS below (the fields are described in
`upcycle.arch.spec`); converters, calibration, inspect, the adapters and training read the
record through `record(model_type)` and never spell a family's name or tensor names.
`upcycle.arch.families` and `upcycle.arch.targets` keep views of these records by role.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from upcycle.arch.spec import BASE_DEFAULTS, PRE_NORMS, Arch, FFNSpec, MoEKeys, MoETarget

_QKVO = tuple(f"self_attn.{p}_proj.weight" for p in "qkvo")
_QKV_BIAS = tuple(f"self_attn.{p}_proj.bias" for p in "qkv")
_QK_NORM = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
_LLAMA_BIAS = _QKV_BIAS + ("self_attn.o_proj.bias",)
_GLU = FFNSpec(
    "glu", gate="mlp.gate_proj.weight", up="mlp.up_proj.weight", down="mlp.down_proj.weight"
)
_GLU_BIAS = ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")
_GLU_GEMMA = FFNSpec(
    "glu",
    gate="mlp.gate_proj.weight",
    up="mlp.up_proj.weight",
    down="mlp.down_proj.weight",
    act_key="hidden_activation",
)
_SANDWICH_NORMS = PRE_NORMS + (
    "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight",
)
_QWEN_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_QWEN_WINDOW = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
# the Read-ME and BAM architectures (upcycle/modeling) are Mixtral's, sliding window included
_MIXTRAL_WINDOW = ("mixtral", "upcycle_bam", "upcycle_readme")


def _defaults(**values) -> Mapping[str, object]:
    """BASE_DEFAULTS with a config class's own values on top, read-only."""
    return MappingProxyType({**BASE_DEFAULTS, **values})


def _moe(target: MoETarget, **facts) -> Arch:
    """The record of an MoE architecture upcycle writes; a reader finds its experts under the
    config keys it writes them under."""
    return Arch(target.model_type, moe=target.keys(), target_spec=target, **facts)


_DENSE = [
    Arch(
        "llama",
        ffn=_GLU,
        attention=_QKVO,
        attention_optional=_LLAMA_BIAS + _GLU_BIAS,
        target="mixtral",
        window_targets=_MIXTRAL_WINDOW,
        readme=True,
        defaults=_defaults(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
        plain_head=True,
        pre_norm_layers=True,
    ),
    Arch(
        "mistral",
        ffn=_GLU,
        attention=_QKVO,
        target="mixtral",
        window_targets=_MIXTRAL_WINDOW,
        readme=True,
        defaults=_defaults(
            max_position_embeddings=131072, bos_token_id=1, eos_token_id=2, sliding_window=4096
        ),
        plain_head=True,
        pre_norm_layers=True,
    ),
    Arch(
        "qwen2",
        ffn=_GLU,
        attention=_QKVO + _QKV_BIAS,
        target="qwen2_moe",
        window_targets=("qwen2_moe", "qwen3_moe"),
        defaults=_defaults(
            max_position_embeddings=32768,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=28,
        ),
        plain_head=True,
        pre_norm_layers=True,
    ),
    Arch(
        "qwen3",
        ffn=_GLU,
        attention=_QKVO + _QK_NORM,
        attention_optional=_LLAMA_BIAS,
        target="qwen3_moe",
        window_targets=("qwen3_moe",),
        defaults=_defaults(
            max_position_embeddings=32768,
            head_dim=128,
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=28,
        ),
        plain_head=True,
        pre_norm_layers=True,
    ),
    Arch(
        "gemma2",
        ffn=_GLU_GEMMA,
        attention=_QKVO,
        norms=_SANDWICH_NORMS,
        target="upcycle_moe",
    ),
    Arch(
        "gemma3_text",
        ffn=_GLU_GEMMA,
        attention=_QKVO + _QK_NORM,
        norms=_SANDWICH_NORMS,
        target="upcycle_moe",
    ),
    Arch(
        "phi3",
        ffn=FFNSpec(
            "fused_glu", gate=None, up="mlp.gate_up_proj.weight", down="mlp.down_proj.weight"
        ),
        attention=("self_attn.qkv_proj.weight", "self_attn.o_proj.weight"),
        target="upcycle_moe",
    ),
]

# Stock transformers MoE architectures upcycle writes. Each target names its per-expert tensors
# in the layout transformers' `save_pretrained` writes by default (legacy per-expert keys, read
# by transformers 4.x/5.x, vLLM and llama.cpp), the attention tensors it accepts, and how to
# build its config from a dense one. Their order is the order of --target's choices.
_STOCK = [
    _moe(
        MoETarget(
            "mixtral",
            "MixtralForCausalLM",
            router="block_sparse_moe.gate.weight",
            expert="block_sparse_moe.experts.{e}.{p}.weight",
            proj={"gate": "w1", "up": "w3", "down": "w2"},
            experts_keys=("num_local_experts",),
            expert_width_key="intermediate_size",
            attention=_QKVO + PRE_NORMS,
            carry=("sliding_window",),
            fixed=(("router_jitter_noise", 0.0),),
        ),
        plain_head=True,
    ),
    _moe(
        MoETarget(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            router="mlp.gate.weight",
            expert="mlp.experts.{e}.{p}.weight",
            proj=_QWEN_PROJ,
            experts_keys=("num_experts",),
            expert_width_key="moe_intermediate_size",
            attention=_QKVO + PRE_NORMS,
            zero_fill=_QKV_BIAS,
            dense_mlp="mlp.{p}.weight",
            shared="mlp.shared_expert.{p}.weight",
            shared_gate="mlp.shared_expert_gate.weight",
            shared_gate_at_zero=0.5,  # sigmoid(0)
            carry=_QWEN_WINDOW,
            normalizes_top_k="norm_topk_prob",
            dense_width_key="intermediate_size",
            shared_width_key="shared_expert_intermediate_size",
            fixed=(("qkv_bias", True), ("decoder_sparse_step", 1)),
        ),
        plain_head=True,
    ),
    _moe(
        MoETarget(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            router="mlp.gate.weight",
            expert="mlp.experts.{e}.{p}.weight",
            proj=_QWEN_PROJ,
            # transformers 5 writes num_local_experts, 4.x and other readers expect num_experts
            experts_keys=("num_experts", "num_local_experts"),
            expert_width_key="moe_intermediate_size",
            attention=_QKVO + PRE_NORMS + _QK_NORM,
            attention_optional=_LLAMA_BIAS,
            dense_mlp="mlp.{p}.weight",
            carry=("attention_bias",) + _QWEN_WINDOW,
            normalizes_top_k="norm_topk_prob",
            dense_width_key="intermediate_size",
            fixed=(("decoder_sparse_step", 1),),
        ),
        plain_head=True,
    ),
]

# MoE architectures upcycle reads (inspect) and refuses to convert or to put MixLoRA on.
_READ_ONLY = [
    Arch("olmoe", moe=MoEKeys("num_experts")),
    Arch("phimoe", moe=MoEKeys("num_local_experts")),
    Arch(
        "deepseek_v3",
        moe=MoEKeys("n_routed_experts", expert_width_key="moe_intermediate_size"),
    ),
]

# upcycle's generic architecture (upcycle/modeling/): the source family's own decoder with
# only the FFN swapped for an MoE block. The default target of families no stock MoE class
# reproduces, and a --target choice for every family.
_GENERIC = [
    _moe(
        MoETarget(
            "upcycle_moe",
            "UpcycleMoeForCausalLM",
            router="mlp.gate.weight",
            expert="",
            proj={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
            experts_keys=("num_experts",),
            expert_width_key="moe_intermediate_size",
            attention=(),
            shared="mlp.shared_expert.{p}.weight",
            shared_width_key="shared_expert_intermediate_size",
            shared_optional=True,
            normalizes_top_k="norm_topk_prob",
            fused=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
            keeps_source=True,
            remote_code=True,
            layer_experts_key="layer_experts",
        ),
    ),
]

# Architectures of upcycle's own (upcycle/modeling/), written only by the methods that need
# them: their names are not --target choices.
_CUSTOM = [
    _moe(
        MoETarget(
            "upcycle_bam",
            "UpcycleBamForCausalLM",
            router="mlp.gate.weight",
            expert="",
            proj={"gate": "gate", "up": "up", "down": "down"},
            experts_keys=("num_local_experts",),
            expert_width_key="intermediate_size",
            attention=_QKVO + PRE_NORMS,
            attention_optional=_QKV_BIAS,
            carry=("sliding_window",),
            fixed=(("router_jitter_noise", 0.0),),
            fused=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        ),
        custom=True,
    ),
    _moe(
        MoETarget(
            "upcycle_readme",
            "UpcycleReadmeForCausalLM",
            router=None,  # one pre-gating router for every layer, written by the method
            expert="",
            proj={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
            experts_keys=("num_local_experts",),
            expert_width_key="intermediate_size",
            attention=_QKVO + PRE_NORMS,
            shared="mlp.shared_expert.{p}.weight",
            shared_width_key="shared_expert_intermediate_size",
            carry=("sliding_window",),
            fixed=(("router_jitter_noise", 0.0),),
            fused=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        ),
        custom=True,
    ),
]

RECORDS: Mapping[str, Arch] = MappingProxyType(
    {r.model_type: r for r in _DENSE + _STOCK + _READ_ONLY + _GENERIC + _CUSTOM}
)


def record(model_type: str | None) -> Arch:
    """The record of `model_type`; for a type upcycle does not know, a blank record (neither
    dense nor MoE, no target, every capability off, the base config defaults)."""
    found = RECORDS.get(model_type) if model_type is not None else None
    return found if found is not None else Arch(model_type or "")
