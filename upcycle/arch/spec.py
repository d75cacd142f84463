"""The shape of an architecture record: frozen dataclasses, no data.

`Arch` is everything upcycle knows about one ``model_type``; the records themselves are in
`upcycle.arch.records`. Tensor names inside a decoder layer are relative to
``Arch.layer_prefix`` (formatted with the layer index ``i``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Defaults every transformers config class (5.x) of a supported family shares, for keys a
# config.json may omit. A record's own defaults start from these.
BASE_DEFAULTS: Mapping[str, object] = MappingProxyType(
    dict(
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
)
PRE_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


@dataclass(frozen=True)
class FFNSpec:
    """Where a dense FFN lives in a layer. ``kind="glu"``: down(act(gate(x)) * up(x))."""

    kind: str  # "glu" (gate/up/down) or "fused_glu" (one gate_up tensor) or "mlp" (fc1/fc2)
    gate: str | None
    up: str
    down: str
    act_key: str = "hidden_act"


@dataclass(frozen=True)
class MoEKeys:
    """The config keys an MoE architecture keeps its expert counts and widths under."""

    experts_key: str
    top_k_key: str = "num_experts_per_tok"
    expert_width_key: str = "intermediate_size"
    shared_width_key: str | None = None


@dataclass(frozen=True)
class MoETarget:
    """How upcycle writes an MoE architecture: tensor names and config keys."""

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
    shared_optional: bool = False  # no shared-expert tensors when the width is 0 (else empty ones)
    carry: tuple[str, ...] = ()  # extra config fields copied from the source when present
    normalizes_top_k: str | None = None  # config key that switches top-k renormalization on
    dense_width_key: str | None = None  # config key of the dense layers' FFN width
    shared_width_key: str | None = None
    fixed: tuple[tuple[str, object], ...] = ()  # config values this target always gets
    fused: tuple[str, str] | None = None  # experts stored fused: gate_up (E, 2I, H), down (E, H, I)
    # the source family's own layers with only the FFN swapped (upcycle_moe): the config keeps
    # every source key, every source layer tensor is accepted, dense layers keep the source's FFN
    keeps_source: bool = False
    remote_code: bool = False  # written with its modeling code and auto_map (upcycle/modeling)
    # config key listing each MoE layer's expert count when layers differ (None: one count)
    layer_experts_key: str | None = None

    def expert_name(self, e: int, role: str) -> str:
        if self.fused:
            raise ValueError(f"{self.model_type} stores its experts fused, not one by one")
        return self.expert.format(e=e, p=self.proj[role])

    def keys(self) -> MoEKeys:
        """The config keys a reader finds this architecture's experts under."""
        return MoEKeys(
            self.experts_keys[0],
            expert_width_key=self.expert_width_key,
            shared_width_key=self.shared_width_key,
        )


@dataclass(frozen=True)
class Arch:
    """Everything upcycle knows about one model_type, dense or MoE.

    A dense family upcycle reads has ``ffn``; an MoE has ``moe``; a type upcycle does not know
    gets a blank record from `upcycle.arch.record` (neither, every capability off).
    """

    model_type: str
    # -- checkpoint layout ------------------------------------------------------------------
    layer_prefix: str = "model.layers.{i}."
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    # -- a dense family: its layer's tensors, and how it converts ---------------------------
    ffn: FFNSpec | None = None
    attention: tuple[str, ...] = ()  # always present
    attention_optional: tuple[str, ...] = ()  # present depending on the config (biases)
    norms: tuple[str, ...] = PRE_NORMS
    target: str | None = None  # default MoE target (a model_type whose record has target_spec)
    why_no_target: str = ""  # shown when target is None
    window_targets: tuple[str, ...] = ()  # targets that reproduce its sliding window exactly
    readme: bool = False  # --method readme (Read-ME) converts it
    # its config class's defaults for keys a config.json may omit (read by source_config)
    defaults: Mapping[str, object] = field(default_factory=lambda: BASE_DEFAULTS)
    # -- an MoE -----------------------------------------------------------------------------
    moe: MoEKeys | None = None  # where its config keeps expert counts and widths
    target_spec: MoETarget | None = None  # how upcycle writes it, when it is a conversion target
    custom: bool = False  # upcycle's own (upcycle/modeling): written by methods, not a --target
    # -- training ---------------------------------------------------------------------------
    plain_head: bool = False  # forward is `logits = lm_head(hidden)`: no soft-capping, scaling
    pre_norm_layers: bool = False  # decoder layers are the plain pre-norm sequence (see
    # upcycle.adapters.checkpointing): input_layernorm, self_attn, residual add,
    # post_attention_layernorm, mlp, residual add

    @property
    def is_dense(self) -> bool:
        return self.ffn is not None

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def layer_tensors(self) -> tuple[str, ...]:
        """A dense layer's tensor names, relative to the layer prefix."""
        ffn = tuple(n for n in (self.ffn.gate, self.ffn.up, self.ffn.down) if n) if self.ffn else ()
        return self.attention + self.attention_optional + self.norms + ffn
