"""Expected tensor shapes of a dense checkpoint, derived from its config."""

from __future__ import annotations

from upcycle.arch.spec import Arch


def expected_shapes(family: Arch, cfg: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(global tensors, per-layer tensors relative to the layer prefix) -> shape.

    Names that may be absent (optional biases, the untied lm_head) are included; callers check
    only what is present, and presence of what is required.
    """
    h = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    v = cfg["vocab_size"]
    glob = {family.embed: (v, h), family.final_norm: (h,), family.lm_head: (v, h)}
    q, k = heads * hd, kv * hd
    proj = {"q": (q, h), "k": (k, h), "v": (k, h), "o": (h, q)}
    layer: dict[str, tuple] = {}
    for p, shape in proj.items():
        layer[f"self_attn.{p}_proj.weight"] = shape
        layer[f"self_attn.{p}_proj.bias"] = (shape[0],)
    layer["self_attn.qkv_proj.weight"] = (q + 2 * k, h)
    layer["self_attn.q_norm.weight"] = (hd,)
    layer["self_attn.k_norm.weight"] = (hd,)
    for n in family.norms:
        layer[n] = (h,)
    ffn = family.ffn
    if ffn.kind == "fused_glu":
        layer[ffn.up] = (2 * inter, h)
    else:
        if ffn.gate:
            layer[ffn.gate] = (inter, h)
        layer[ffn.up] = (inter, h)
    layer[ffn.down] = (h, inter)
    for role in ("gate", "up"):
        layer[f"mlp.{role}_proj.bias"] = (inter,)
    layer["mlp.down_proj.bias"] = (h,)
    return glob, layer
