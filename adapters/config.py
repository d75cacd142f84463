"""MixLoraConfig: the peft config of MixLoRA adapters (arXiv 2404.15159)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from upcycle.adapters.export import lora_scaling

FFN_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj") + FFN_MODULES  # the default targets
# Projections some families fuse into one linear (Phi-3), by the parts they hold. Naming a
# part targets the fused linear where a model has it and not the part (`fused_targets`).
FUSED_MODULES = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
ATTENTION_MODULES = ALL_MODULES[:4] + ("qkv_proj",)
KNOWN_MODULES = ALL_MODULES + ("qkv_proj",)
FUSED_GATE_UP = "gate_up_proj"
VIEWS = ("copy", "granular")
MODES = ("mixlora", "experts")


def fused_targets(names: list[str], present: set[str]) -> list[str]:
    """`names` (module names to adapt) with each part of a fused projection that `present`
    (a model's module names) lacks replaced by the fused one it has: on Phi-3, q/k/v_proj ->
    qkv_proj and gate/up_proj -> gate_up_proj. Order kept, duplicates dropped."""
    out: list[str] = []
    for name in names:
        if name not in present:
            name = next(
                (f for f, parts in FUSED_MODULES.items() if name in parts and f in present), name
            )
        if name not in out:
            out.append(name)
    return out


@dataclass
class MixLoraConfig(PeftConfig):
    """A top-k router and `num_experts` LoRA experts on each frozen FFN; plain LoRA on attention.

    Expert e computes the base FFN with LoRA deltas on the projections named in
    `target_modules` (gate_proj/up_proj/down_proj; on Phi-3's fused gate_up_proj they are its
    two halves, and `gate_up_proj` names both); attention projections named there get one
    plain LoRA each (Phi-3's fused qkv_proj one, when any of q/k/v_proj or qkv_proj is named). Routing is Mixtral's: softmax over experts, top-k, renormalized, so the
    model folds exactly into a stock MoE checkpoint (`upcycle merge`).

    `mode="experts"` is for bases that are already MoE models (e.g. from `upcycle convert`):
    each existing expert gets its own LoRA on its fused gate/up and down projections, and the
    router becomes trainable; `num_experts` and `top_k` are then the model's.

    `expert_view="granular"` gives each expert a slice of `intermediate_size / granularity`
    neurons of the base FFN (expert e takes part e mod granularity) instead of the whole FFN.
    """

    num_experts: int = field(default=8, metadata={"help": "LoRA experts per FFN"})
    top_k: int = field(default=2, metadata={"help": "experts per token"})
    r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on LoRA inputs"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "projections to adapt; default all seven"}
    )
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "balance loss weight"})
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "router z-loss weight"})
    jitter_noise: float = field(default=0.0, metadata={"help": "multiplicative input jitter"})
    router_init_std: float = field(default=0.02, metadata={"help": "router init N(0, std)"})
    mode: str = field(
        default="mixlora",
        metadata={
            "help": "mixlora: LoRA experts on a dense FFN; experts: LoRA on an MoE's experts"
        },
    )
    expert_view: str = field(default="copy", metadata={"help": "copy or granular"})
    granularity: int = field(default=1, metadata={"help": "parts per FFN for granular views"})
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "decoder layers to adapt (default: all)"}
    )
    base_fingerprint: str | None = field(
        default=None, metadata={"help": "set when attached: identifies the base model"}
    )
    bias: str = field(default="none", metadata={"help": "kept for peft; only 'none'"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "unused"})

    def __post_init__(self):
        super().__post_init__()
        from upcycle.adapters.peft_type import peft_type

        self.peft_type = peft_type()
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        if self.target_modules is None:
            self.target_modules = list(ALL_MODULES)
        elif isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if FUSED_GATE_UP in self.target_modules:  # both halves: the gate and up roles
            parts = FUSED_MODULES[FUSED_GATE_UP]
            self.target_modules = [m for m in self.target_modules if m != FUSED_GATE_UP] + list(
                parts
            )
        self.target_modules = [m for m in ALL_MODULES if m in set(self.target_modules)] + sorted(
            set(self.target_modules) - set(ALL_MODULES)
        )
        self.validate()

    def validate(self) -> None:
        unknown = [m for m in self.target_modules if m not in KNOWN_MODULES]
        if unknown:
            raise ValueError(
                f"unknown target module {unknown[0]!r}; MixLoRA adapts "
                f"{', '.join(KNOWN_MODULES)} (and gate_up_proj: gate_proj and up_proj)"
            )
        if not any(m in FFN_MODULES for m in self.target_modules):
            raise ValueError(
                "MixLoRA needs at least one FFN projection in target_modules "
                "(gate_proj, up_proj, down_proj); for attention-only adapters use LoRA"
            )
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be between 1 and num_experts ({self.num_experts}), got {self.top_k}"
            )
        if self.r < 1:
            raise ValueError(f"r must be at least 1, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "experts" and self.expert_view != "copy":
            raise ValueError("expert_view applies to mode='mixlora' only")
        if self.expert_view not in VIEWS:
            raise ValueError(
                f"expert_view must be one of {', '.join(VIEWS)}, got {self.expert_view!r}"
            )
        if self.expert_view == "granular":
            if self.granularity < 2:
                raise ValueError("a granular expert view needs granularity >= 2")
            if self.num_experts % self.granularity:
                raise ValueError(
                    f"num_experts ({self.num_experts}) must be a multiple of granularity "
                    f"({self.granularity})"
                )
        elif self.granularity != 1:
            raise ValueError("granularity applies to expert_view='granular' only")
        if self.bias != "none":
            raise ValueError("MixLoRA trains no biases; bias must be 'none'")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_alpha, self.r)
