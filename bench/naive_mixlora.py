"""`upcycle train` with a naive MixLoRA layer, for reference in bench/train.py.

    .venv/bin/python bench/naive_mixlora.py MODEL OUT --data ... (any `upcycle train` options)

Same data, loop and adapter parameters as `upcycle train --adapter mixlora`; only the FFN
layer's forward differs: each expert's weights W + (alpha/r) B A are materialized and the
whole expert FFN runs on that expert's tokens (what a straightforward implementation does).
"""

import sys

import torch
import torch.nn.functional as F
from upcycle.adapters.layers import ROLES, MixLoraFFN


def naive_forward(self, x, *args, **kwargs):
    if self.disable_adapters or not self.active_adapters:
        return self.base_layer(x, *args, **kwargs)
    name = self.active_adapters[0]
    s = self.settings[name]
    shape = x.shape
    h = x.reshape(-1, shape[-1])
    weights, ids, _ = self.route(h, name)
    experts = self.mixlora_experts[name]
    drop = self.mixlora_dropout[name]
    out = torch.zeros_like(h)
    for e in range(s["num_experts"]):
        token, slot = (ids == e).nonzero(as_tuple=True)
        if len(token) == 0:
            continue
        w = {}
        for module, role in ROLES.items():
            base = getattr(self.base_layer, module).weight
            if role in experts.roles:
                a, b = getattr(experts, f"{role}_A")[e], getattr(experts, f"{role}_B")[e]
                base = base + s["scaling"] * (b @ a).to(base.dtype)
            w[role] = base
        xe = drop(h[token])
        y = F.linear(
            self.base_layer.act_fn(F.linear(xe, w["gate"])) * F.linear(xe, w["up"]), w["down"]
        )
        out = out.index_add(0, token, y * weights[token, slot, None].to(y.dtype))
    return out.reshape(shape)


if __name__ == "__main__":
    MixLoraFFN.forward = naive_forward
    MixLoraFFN.uses_fused = lambda self, name: False  # whole-layer checkpointing, as before
    from upcycle.cli import main

    main(["train", *sys.argv[1:]])
