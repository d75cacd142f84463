"""Stock transformers MoE architectures that upcycle writes, as data.

Each target names its per-expert tensors in the layout transformers' ``save_pretrained`` writes
by default (legacy per-expert keys, read by transformers 4.x/5.x, vLLM and llama.cpp), the
attention tensors it accepts, and how to build its config from a dense one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoETarget:
    model_type: str
    architecture: str
    router: str | None  # relative to the layer prefix (None: routing comes from elsewhere)
    expert: str  # formatted with e (expert index) and p (projection name)
    proj: dict[str, str]  # role (gate/up/down) -> projection name in `expert`
    experts_keys: tuple[str, ...]  # config keys carrying the number of experts
    expert_width_key: str
    attention: tuple[str, ...]  # attention/norm tensors it always has
    attention_optional: tuple[str, ...] = ()  # accepted when the source has them
    zero_fill: tuple[str, ...] = ()  # always present in the target; zeros if the source lacks them
    dense_mlp: str | None = (
        None  # per-layer dense FFN (formatted with p) where layers may stay dense
    )
    shared: str | None = None  # shared-expert FFN (formatted with p)
    shared_gate: str | None = None  # None: the shared expert always has weight 1
    shared_gate_at_zero: float = 1.0  # the shared expert's gate value when its weights are zero
    carry: tuple[str, ...] = ()  # extra config fields copied from the source when present
    normalizes_top_k: str | None = None  # config key that switches top-k renormalization on
    dense_width_key: str | None = None  # config key of the dense layers' FFN width
    shared_width_key: str | None = None
    fixed: tuple[tuple[str, object], ...] = ()  # config values this target always gets
    same_sliding_window: tuple[str, ...] = ()  # source families whose sliding window it reproduces
    fused: tuple[str, str] | None = None  # experts stored fused: gate_up (E, 2I, H), down (E, H, I)

    def expert_name(self, e: int, role: str) -> str:
        if self.fused:
            raise ValueError(f"{self.model_type} stores its experts fused, not one by one")
        return self.expert.format(e=e, p=self.proj[role])


_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
_QKVO = tuple(f"self_attn.{p}_proj.weight" for p in "qkvo")
_QKV_BIAS = tuple(f"self_attn.{p}_proj.bias" for p in "qkv")
_QWEN_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

TARGETS: dict[str, MoETarget] = {
    t.model_type: t
    for t in [
        MoETarget(
            "mixtral",
            "MixtralForCausalLM",
            router="block_sparse_moe.gate.weight",
            expert="block_sparse_moe.experts.{e}.{p}.weight",
            proj={"gate": "w1", "up": "w3", "down": "w2"},
            experts_keys=("num_local_experts",),
            expert_width_key="intermediate_size",
            attention=_QKVO + _NORMS,
            carry=("sliding_window",),
            fixed=(("router_jitter_noise", 0.0),),
            same_sliding_window=("llama", "mistral"),
        ),
        MoETarget(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            router="mlp.gate.weight",
            expert="mlp.experts.{e}.{p}.weight",
            proj=_QWEN_PROJ,
            experts_keys=("num_experts",),
            expert_width_key="moe_intermediate_size",
            attention=_QKVO + _NORMS,
            zero_fill=_QKV_BIAS,
            dense_mlp="mlp.{p}.weight",
            shared="mlp.shared_expert.{p}.weight",
            shared_gate="mlp.shared_expert_gate.weight",
            shared_gate_at_zero=0.5,  # sigmoid(0)
            carry=("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
            normalizes_top_k="norm_topk_prob",
            dense_width_key="intermediate_size",
            shared_width_key="shared_expert_intermediate_size",
            fixed=(("qkv_bias", True), ("decoder_sparse_step", 1)),
            same_sliding_window=("qwen2",),
        ),
        MoETarget(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            router="mlp.gate.weight",
            expert="mlp.experts.{e}.{p}.weight",
            proj=_QWEN_PROJ,
            # transformers 5 writes num_local_experts, 4.x and other readers expect num_experts
            experts_keys=("num_experts", "num_local_experts"),
            expert_width_key="moe_intermediate_size",
            attention=_QKVO + _NORMS + ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
            attention_optional=_QKV_BIAS + ("self_attn.o_proj.bias",),
            dense_mlp="mlp.{p}.weight",
            carry=(
                "attention_bias",
                "use_sliding_window",
                "sliding_window",
                "max_window_layers",
                "layer_types",
            ),
            normalizes_top_k="norm_topk_prob",
            dense_width_key="intermediate_size",
            fixed=(("decoder_sparse_step", 1),),
            same_sliding_window=("qwen2", "qwen3"),
        ),
    ]
}

# Architectures of upcycle's own (upcycle/modeling/), written only by the methods that need
# them: their names are not --target choices.
CUSTOM_TARGETS: dict[str, MoETarget] = {
    "upcycle_bam": MoETarget(
        "upcycle_bam",
        "UpcycleBamForCausalLM",
        router="mlp.gate.weight",
        expert="",
        proj={"gate": "gate", "up": "up", "down": "down"},
        experts_keys=("num_local_experts",),
        expert_width_key="intermediate_size",
        attention=_QKVO + _NORMS,
        attention_optional=_QKV_BIAS,
        carry=("sliding_window",),
        fixed=(("router_jitter_noise", 0.0),),
        same_sliding_window=("llama", "mistral"),
        fused=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    ),
}
CUSTOM_TARGETS["upcycle_readme"] = MoETarget(
    "upcycle_readme",
    "UpcycleReadmeForCausalLM",
    router=None,  # one pre-gating router for every layer, written by the method
    expert="",
    proj={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    experts_keys=("num_local_experts",),
    expert_width_key="intermediate_size",
    attention=_QKVO + _NORMS,
    shared="mlp.shared_expert.{p}.weight",
    shared_width_key="shared_expert_intermediate_size",
    carry=("sliding_window",),
    fixed=(("router_jitter_noise", 0.0),),
    same_sliding_window=("llama", "mistral"),
    fused=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
)
