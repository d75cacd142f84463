"""Config normalization without importing transformers (which costs seconds at start-up).

`source_config` fills in what a dense config.json may leave out with the defaults of that
family's transformers class (its record's ``defaults``, in `upcycle.arch.records`), and
normalizes rotary settings to transformers 5's ``rope_parameters``. `target_config` writes the
MoE config with the keys every reader needs: ``rope_parameters`` for transformers 5 and
``rope_theta``/``rope_scaling`` for 4.x and vLLM.
A test checks these defaults against the installed transformers classes.
"""

from __future__ import annotations

from upcycle.arch.records import record
from upcycle.arch.spec import MoETarget

# Keys every supported dense family shares with every target.
COMMON = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
    "initializer_range",
)


def rope_parameters(raw: dict, default_theta: float) -> dict:
    """transformers 5's rope_parameters from either the new or the legacy (4.x) keys."""
    if isinstance(raw.get("rope_parameters"), dict):
        rope = dict(raw["rope_parameters"])
    elif isinstance(raw.get("rope_scaling"), dict):
        rope = dict(raw["rope_scaling"])
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope["type"]
    else:
        rope = {"rope_type": "default"}
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", float(raw.get("rope_theta", default_theta)))
    return rope


def source_config(model_type: str, raw: dict) -> dict:
    """The effective config of a dense checkpoint: its config.json with class defaults filled in."""
    defaults = record(model_type).defaults
    cfg = {**defaults, **{k: v for k, v in raw.items() if v is not None or k not in defaults}}
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["rope_parameters"] = rope_parameters(raw, defaults["rope_theta"])
    return cfg


def target_config(
    src: dict,
    target: MoETarget,
    *,
    num_experts: int,
    top_k: int,
    expert_width: int,
    shared_width: int,
    normalize_top_k: bool,
    moe_layers: list[int],
    router_aux_loss_coef: float,
    dtype: str,
) -> dict:
    """The MoE config.json, as a plain dict with sorted keys."""
    cfg = {k: src.get(k) for k in COMMON}
    cfg.update({k: src[k] for k in target.carry if k in src})
    cfg.update(dict(target.fixed))
    for key in target.experts_keys:
        cfg[key] = num_experts
    cfg["num_experts_per_tok"] = top_k
    cfg[target.expert_width_key] = expert_width
    if target.dense_width_key:
        cfg[target.dense_width_key] = src["intermediate_size"]
        cfg["mlp_only_layers"] = [i for i in range(src["num_hidden_layers"]) if i not in moe_layers]
    if target.shared_width_key:
        cfg[target.shared_width_key] = shared_width
    if target.normalizes_top_k:
        cfg[target.normalizes_top_k] = normalize_top_k
    cfg.update(
        router_aux_loss_coef=router_aux_loss_coef,
        output_router_logits=False,
        use_cache=True,
        model_type=target.model_type,
        architectures=[target.architecture],
        dtype=dtype,
    )
    return dict(sorted(with_legacy_keys(cfg).items()))


def with_legacy_keys(cfg: dict) -> dict:
    """cfg plus the keys transformers 4.x, vLLM and llama.cpp read where transformers 5 writes
    others: `rope_theta` and `rope_scaling` next to `rope_parameters`, `torch_dtype` next to
    `dtype`. Without rope_theta, transformers 4.x silently takes its class default (10000 for llama,
    qwen2 and qwen3; 1e6 for mixtral) and the logits go wrong.
    Keys already present are kept; a new dict."""
    cfg = dict(cfg)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if cfg.get("dtype") is not None:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    return cfg


# Keys of a source config.json that describe the file rather than the network.
_NOT_CARRIED = ("architectures", "auto_map", "model_type", "transformers_version")


def generic_config(
    raw: dict,
    target: MoETarget,
    *,
    num_experts: int,
    top_k: int,
    expert_width: int,
    shared_width: int,
    normalize_top_k: bool,
    moe_layers: list[int],
    router_aux_loss_coef: float,
    dtype: str,
) -> dict:
    """The config of a `keeps_source` target (upcycle_moe): the source's config.json as it is
    (its family's class fills in what it omits, as for the dense model), the family's name as
    `base_model_type`, and the MoE keys."""
    cfg = {k: v for k, v in raw.items() if k not in _NOT_CARRIED and k != "torch_dtype"}
    cfg["base_model_type"] = raw["model_type"]
    cfg[target.experts_keys[0]] = num_experts
    cfg["num_experts_per_tok"] = top_k
    cfg[target.expert_width_key] = expert_width
    cfg[target.shared_width_key] = shared_width
    cfg[target.normalizes_top_k] = normalize_top_k
    cfg.update(
        moe_layers=list(moe_layers),
        router_aux_loss_coef=router_aux_loss_coef,
        output_router_logits=False,
        model_type=target.model_type,
        architectures=[target.architecture],
        dtype=dtype,
    )
    return dict(sorted(with_legacy_keys(cfg).items()))
