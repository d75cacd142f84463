"""Configuration of upcycle's generic MoE architecture (a dense family's decoder, MoE FFNs).

`upcycle_moe` keeps a dense family's own decoder (llama, mistral, qwen2, qwen3, gemma2,
gemma3_text, phi3, ...) and swaps the FFN of chosen layers for a routed MoE block. Its
config.json holds every key of the source family's config, flat, as that family's config class
takes them, plus `base_model_type` (the family's model_type) and the MoE keys below.

Self-contained: this file is copied next to the weights of every upcycle_moe checkpoint and
loaded by transformers with `trust_remote_code=True`, so it imports transformers and nothing of
upcycle. It needs transformers 5 (dataclass configs, `rope_parameters`); transformers 4.x is
not supported.
"""

from __future__ import annotations

from dataclasses import fields

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

# The MoE keys: this config's own fields, never handed to the base family's config class.
MOE_KEYS = (
    "base_model_type",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "shared_expert_gate",
    "fused_experts",
    "norm_topk_prob",
    "moe_layers",
    "layer_experts",
    "router_aux_loss_coef",
    "output_router_logits",
)
# Keys every config has (PreTrainedConfig's fields and bookkeeping): this config keeps its own.
_COMMON_KEYS = frozenset(f.name for f in fields(PreTrainedConfig)) | {
    "model_type",
    "_name_or_path",
    "output_attentions",
    "auto_map",
}
# Legacy RoPE keys (transformers 4.x); the base family folds them into `rope_parameters`.
_LEGACY_ROPE_KEYS = ("rope_theta", "rope_scaling")


def family_config(base_model_type: str, values: dict) -> PreTrainedConfig:
    """The config object of family `base_model_type` built from `values` (flat config keys)."""
    if base_model_type == UpcycleMoeConfig.model_type:
        raise ValueError("base_model_type must be a dense family, not upcycle_moe itself")
    kwargs = {k: v for k, v in values.items() if k not in MOE_KEYS and k != "auto_map"}
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        kwargs.pop(key, None)
    return AutoConfig.for_model(base_model_type, **kwargs)


@strict
class UpcycleMoeConfig(PreTrainedConfig):
    """A dense family's config (every key, flat) plus the MoE layers' keys.

    base_model_type: the dense family whose decoder this model keeps (e.g. "gemma3_text").
    num_experts: routed experts per MoE layer (E).
    num_experts_per_tok: experts each token uses (k).
    moe_intermediate_size: each routed expert's width (I); None: the family's intermediate_size.
    shared_expert_intermediate_size: width of an always-on shared expert, added to the routed
        output (0: none).
    shared_expert_gate: scale the shared expert's output by sigmoid(shared_expert_gate(x)), a
        Linear(hidden_size, 1) per MoE layer, as Qwen2-MoE does (False: weight 1). Needs a
        shared expert.
    fused_experts: hold the routed experts in two fused tensors per layer,
        `experts.gate_up_proj` (E, 2I, H) and `experts.down_proj` (E, H, I), run through
        transformers' experts implementations; False: one module per expert,
        `experts.{e}.{gate,up,down}_proj.weight`, run by a loop over the active experts.
    norm_topk_prob: renormalise the top-k softmax weights to sum to 1.
    moe_layers: indices of the layers whose FFN is an MoE block (None: every layer); the other
        layers keep the family's own MLP.
    layer_experts: routed experts of each MoE layer, in `moe_layers` order, when layers differ
        (a pruned pyramid); None: num_experts in every MoE layer. num_experts is then the
        largest entry and num_experts_per_tok at most the smallest.
    router_aux_loss_coef: weight of the load-balancing loss added to the LM loss when
        `output_router_logits` is on.
    output_router_logits: return every MoE layer's router logits (and the aux loss).

    The experts' activation is the family's FFN activation (`hidden_activation` where the family
    has it, as Gemma does, else `hidden_act`).
    """

    model_type = "upcycle_moe"

    base_model_type: str = "llama"
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    fused_experts: bool = True
    norm_topk_prob: bool = True
    moe_layers: list[int] | None = None
    layer_experts: list[int] | None = None
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        # The family's class reads the flat keys first (its defaults fill what is missing, its
        # own normalisation applies: RoPE parameters, layer types); every key it ends up with
        # becomes an attribute here too, so generation and the family's ForCausalLM.forward,
        # which read this config, see what the family's modules see.
        base = family_config(self.base_model_type, {**kwargs, "dtype": self.dtype}).to_dict()
        own = {k: v for k, v in kwargs.items() if k not in base and k not in _LEGACY_ROPE_KEYS}
        super().__post_init__(**own)
        for key, value in base.items():
            if key not in _COMMON_KEYS:
                setattr(self, key, value)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.moe_layers is None:
            self.moe_layers = list(range(self.num_hidden_layers))
        self.moe_layers = sorted(int(i) for i in self.moe_layers)
        self._check_moe()

    def experts_in(self, layer: int) -> int:
        """Routed experts of MoE layer `layer` (an index into the decoder's layers)."""
        if self.layer_experts is None:
            return self.num_experts
        return self.layer_experts[self.moe_layers.index(layer)]

    def _check_moe(self) -> None:
        if self.num_experts < 1:
            raise ValueError("num_experts must be at least 1")
        fewest = self.num_experts
        if self.layer_experts is not None:
            counts = [int(n) for n in self.layer_experts]
            if len(counts) != len(self.moe_layers) or max(counts) != self.num_experts:
                raise ValueError(
                    f"layer_experts must give one count per MoE layer ({len(self.moe_layers)}) "
                    f"with num_experts ({self.num_experts}) the largest, got {counts}"
                )
            self.layer_experts, fewest = counts, min(counts)
        if not 1 <= self.num_experts_per_tok <= fewest:
            raise ValueError(
                f"num_experts_per_tok must be between 1 and the fewest experts of a layer "
                f"({fewest}), got {self.num_experts_per_tok}"
            )
        if self.moe_intermediate_size < 1 or self.shared_expert_intermediate_size < 0:
            raise ValueError(
                "moe_intermediate_size must be positive, the shared width not negative"
            )
        if self.shared_expert_gate and self.shared_expert_intermediate_size == 0:
            raise ValueError(
                "shared_expert_gate needs a shared expert (shared_expert_intermediate_size > 0)"
            )
        layers = self.moe_layers
        if len(set(layers)) != len(layers) or any(
            not 0 <= i < self.num_hidden_layers for i in layers
        ):
            raise ValueError(
                f"moe_layers must be distinct layer indices below {self.num_hidden_layers}, "
                f"got {layers}"
            )

    def base_config(self) -> PreTrainedConfig:
        """The base family's own config object (every key but the MoE ones)."""
        config = family_config(self.base_model_type, self.to_dict())
        config.dtype = self.dtype
        return config

    def expert_activation(self) -> str:
        """The family's FFN activation, which the experts use."""
        return getattr(self, "hidden_activation", None) or self.hidden_act


__all__ = ["UpcycleMoeConfig"]
