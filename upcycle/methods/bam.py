"""Branch-Attend-Mix: N dense models become one MoE with FFN experts and attention experts.

BAM (Zhang et al., NeurIPS 2024, https://arxiv.org/abs/2408.08274) extends Branch-Train-MiX:
layer i's FFN of model e becomes FFN expert e (top-k routed), and layer i's attention of
model e becomes attention expert e. Attention experts are soft-routed: every token uses all of
them, weighted by softmax(self_attn.router(x)). Embeddings, norms and the LM head are averaged
over the models as in BTX (`AveragedCheckpoint`).

`--attention-experts shared-kv` keeps only each model's q and o projections as experts and
averages k and v into one shared projection (the KV cache stays the dense model's size).
`--parallel-attention` computes attention and FFN from the same input, as the BAM paper's
models do; for models trained sequentially (Llama and its kin) that changes the function, so
it needs training after the conversion.

The output is upcycle's own architecture `upcycle_bam` (upcycle/modeling/), written with its
modeling code and `auto_map`: transformers loads it with `trust_remote_code=True`.

Exactness: from N identical models with the attention router at zeros (uniform weights, the
default) and renormalized top-k FFN routing, the sequential BAM model equals the dense model:
every attention expert computes the same output, and their weights sum to 1. `shared-kv` is
exact too (the average of identical k, v is k, v). Parallel attention never is.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from upcycle.arch.families import FAMILIES
from upcycle.errors import OptionError, UnsupportedError
from upcycle.io.arrays import cast
from upcycle.methods.base import MethodInfo
from upcycle.methods.btx import BTXMethod
from upcycle.methods.options import Option
from upcycle.methods.routers import random_router, zeros_router

INFO = MethodInfo(
    name="bam",
    paper="https://arxiv.org/abs/2408.08274",
    summary="model e's FFN becomes FFN expert e and its attention attention expert e "
    "(soft-routed); other tensors averaged (Branch-Attend-Mix)",
    exact="exact when all models are identical (sequential attention, uniform attention "
    "router); otherwise a merge to be fine-tuned",
)

ATTENTION_EXPERTS = ("full", "shared-kv")
ROUTER = "self_attn.router.weight"
_PER_EXPERT = {  # attention tensors that become per-expert (relative name -> concat axis)
    "full": {f"self_attn.{p}_proj.{t}": 0 for p in "qkv" for t in ("weight", "bias")}
    | {"self_attn.o_proj.weight": 1},
    "shared-kv": {
        "self_attn.q_proj.weight": 0,
        "self_attn.q_proj.bias": 0,
        "self_attn.o_proj.weight": 1,
    },
}


ATTENTION = Option(
    "attention_experts",
    "full",
    "bam: full (own q, k, v, o per expert) or shared-kv (own q, o; k, v averaged).",
)
PARALLEL = Option(
    "parallel_attention",
    False,
    "bam: attention and FFN read the same input (changes a sequential model's function).",
    flag=True,
)


class BAMMethod(BTXMethod):
    """BAM conversion: BTX's FFN experts plus soft-routed attention experts."""

    info = INFO
    options = BTXMethod.options + (ATTENTION, PARALLEL)
    target = "upcycle_bam"  # the architecture it writes, whatever --target says

    def __init__(self, *, attention_experts: str = "full", parallel_attention: bool = False, **btx):
        super().__init__(**btx)
        self.attention_experts = attention_experts
        self.parallel_attention = parallel_attention

    def validate(self) -> None:
        super().validate()
        if self.attention_experts not in ATTENTION_EXPERTS:
            raise OptionError(
                f"unknown --attention-experts {self.attention_experts!r}; "
                f"choose from {', '.join(ATTENTION_EXPERTS)}"
            )

    @property
    def per_expert(self) -> dict[str, int]:
        return _PER_EXPERT[self.attention_experts]

    def open_checkpoint(self, source: str):
        reader = super().open_checkpoint(source)
        family = FAMILIES.get(reader.model_type)
        if family is not None:  # else the engine rejects SEED with its own message
            if any(n.endswith("self_attn.o_proj.bias") for n in reader.keys()):
                raise UnsupportedError(
                    f"{reader.path}: bam does not support attention output biases (o_proj.bias)"
                )
            layers = range(int(reader.config.get("num_hidden_layers", 0)))
            names = [
                family.layer_prefix.format(i=i) + rel for i in layers for rel in self.per_expert
            ]
            reader.keep_members(n for n in names if n in reader)
        return reader

    def describe(self) -> str:
        parallel = ", parallel attention" if self.parallel_attention else ""
        return f"{super().describe()}; attention experts {self.attention_experts}{parallel}"

    def adapt_plan(self, plan):
        """Attention tensors widened to N experts, a router per layer, the BAM config."""
        from upcycle.modeling import auto_map, code_files

        n, hidden = len(self.experts_from), plan.config["hidden_size"]
        prefix0 = plan.family.layer_prefix.split("{")[0]
        entries = []
        for name, dtype, shape in plan.entries:
            rel = name[len(prefix0) :].partition(".")[2] if name.startswith(prefix0) else ""
            axis = self.per_expert.get(rel)
            if axis is not None:
                shape = tuple(s * n if a == axis else s for a, s in enumerate(shape))
            entries.append((name, dtype, shape))
            if rel == "self_attn.o_proj.weight":
                entries.append((name[: -len(rel)] + ROUTER, dtype, (n, hidden)))
        cfg = dict(plan.config)
        window = cfg.get("sliding_window") and plan.reader.config.get("use_sliding_window", True)
        cfg.update(
            num_attention_experts=n,
            attention_experts=self.attention_experts.replace("-", "_"),
            parallel_attention=self.parallel_attention,
            qkv_bias=any(x.endswith("self_attn.q_proj.bias") for x in plan.layer_tensors[0]),
            sliding_window=cfg.get("sliding_window") if window else None,
            auto_map=auto_map(self.target),
        )
        return dataclasses.replace(
            plan,
            entries=entries,
            config=dict(sorted(cfg.items())),
            code_files=code_files(self.target),
        )

    def attention_router(self, layer: int, hidden: int) -> np.ndarray:
        """Zeros (uniform mixing: exact for identical models) unless --router-init random."""
        n = len(self.experts_from)
        if self.router_init == "random":
            return random_router(n, hidden, self.router_std, self.seed, layer, salt=2)
        return zeros_router(n, hidden)

    def finish_layer(self, i: int, prefix: str, out: dict, dtype: str) -> dict:
        """Replace the averaged attention tensors of layer i by the models' own, side by side."""
        for rel, axis in self.per_expert.items():
            if prefix + rel in out:
                out[prefix + rel] = np.concatenate(self._reader.members(prefix + rel, dtype), axis)
        hidden = out[prefix + "self_attn.o_proj.weight"].shape[0]
        out[prefix + ROUTER] = cast(self.attention_router(i, hidden), "F32", dtype)
        return out
