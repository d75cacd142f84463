"""Branch-Train-MiX: N dense models of one architecture become one MoE.

BTX (Sukhbaatar et al. 2024, https://arxiv.org/abs/2403.07816): copies of a seed model are
trained apart (one per domain); then layer i's FFN of model e becomes expert e of MoE layer i,
and every other tensor (embeddings, attention, norms, lm_head) is the weighted average over the
N models. The seed gives the config, the tokenizer and the tensor inventory the models must
match; its weights enter only if it is also listed as a model (BTX keeps the seed as an expert).

Exactness: N identical models give exactly the dense model with any router (renormalized top-k
weights sum to 1 and every expert is the same FFN; the average of identical tensors is computed
as x_0 + sum_e w_e (x_e - x_0), which is x_0 bit for bit). N different models give no dense
model back: it is the averaged attention with a routed mixture of the models' FFNs, a starting
point that BTX fine-tunes (routers and all) on the union of the domains.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from upcycle.arch.families import FAMILIES
from upcycle.errors import InputError, OptionError
from upcycle.io.arrays import cast, to_float32
from upcycle.io.checkpoint import Checkpoint
from upcycle.methods.base import Method, MethodInfo, MoELayer, MoELayout
from upcycle.methods.options import (
    EXPERT_PROMPTS,
    ROUTER_INIT,
    ROUTER_STD,
    ConvertOptions,
    Option,
)
from upcycle.methods.routers import (
    ROUTER_INITS,
    hidden_state_means,
    hidden_state_rows,
    random_router,
    zeros_router,
)

INFO = MethodInfo(
    name="btx",
    paper="https://arxiv.org/abs/2403.07816",
    summary="model e's FFN becomes expert e; all other tensors averaged over the models "
    "(Branch-Train-MiX)",
    exact="exact for any router when all models are identical (renormalized top-k); "
    "otherwise a merge to be fine-tuned",
)


def _model_paths(values) -> tuple[str, ...]:
    """Absolute paths (OUT/upcycle.json records them as the experts' provenance); the name
    `default` is the default model, built on first use."""
    import os
    import sys

    from upcycle.io.default_model import resolve_model

    def log(msg):
        print(msg, file=sys.stderr)

    return tuple(os.path.abspath(resolve_model(str(p), log=log)) for p in values)


def _weights(value) -> tuple[float, ...]:
    """--weights as "w1,w2,..." (or a YAML list) -> floats; validated against the models later."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return tuple(float(w) for w in items)
    except ValueError:
        raise OptionError(f"--weights: cannot read {value!r} (e.g. 0.5,0.25,0.25)") from None


EXPERTS_FROM = Option(
    "experts_from",
    (),
    "btx, bam: a dense model whose FFN (bam: and attention) becomes one expert "
    "(repeat once per expert).",
    multiple=True,
    parse=_model_paths,
)
WEIGHTS = Option(
    "weights",
    (),
    "btx, bam: averaging weights of the --experts-from models, e.g. 0.5,0.25,0.25 [uniform].",
    parse=_weights,
)

# Config entries that change what a tensor means without changing its shape: models that differ
# here cannot be averaged into one network.
_SAME_CONFIG = (
    "hidden_act",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "tie_word_embeddings",
    "sliding_window",
)


class AveragedCheckpoint(Checkpoint):
    """SEED's headers and config; each tensor read from N models and averaged in float32.

    The FFN tensors of the layer being converted are also kept per model until the BTX method
    takes them as experts (`member_ffn`), so each is read once. Memory: one layer's tensors
    times N, plus the float32 accumulator of one tensor.
    """

    def __init__(self, seed: str, models: Sequence[str], weights: Sequence[float]):
        super().__init__(seed)
        self.models = [Checkpoint(p) for p in models]
        for m in self.models:
            self._check_member(m)
        w = np.asarray(weights or [1.0] * len(models), dtype=np.float64)
        self.weights = (w / w.sum()).astype(np.float32)  # (N,), sums to 1
        self._held: dict[str, list[np.ndarray]] = {}
        self._kept: dict[str, list[np.ndarray] | None] = {}  # name -> arrays, see keep_members
        self._ffn_names = self._family_ffn_names()
        self._ffn_set = {n for roles in self._ffn_names.values() for n in roles.values()}

    def _check_member(self, m: Checkpoint) -> None:
        """One-line error naming the first difference between model `m` and SEED."""
        if m.model_type != self.model_type:
            raise InputError(
                f"{m.path}: model_type {m.model_type} differs from SEED's {self.model_type} "
                f"({self.path})"
            )
        for name in sorted(set(self.infos) | set(m.infos)):
            if name not in m.infos:
                raise InputError(f"{m.path}: tensor {name} is missing (SEED has it)")
            if name not in self.infos:
                raise InputError(f"{m.path}: tensor {name} is not in SEED ({self.path})")
            if m.shape(name) != self.shape(name):
                raise InputError(
                    f"{m.path}: tensor {name} has shape {list(m.shape(name))} "
                    f"but SEED has {list(self.shape(name))}"
                )
        for key in _SAME_CONFIG:
            if m.config.get(key) != self.config.get(key):
                raise InputError(
                    f"{m.path}: config {key} is {m.config.get(key)!r} "
                    f"but SEED has {self.config.get(key)!r}"
                )

    def _family_ffn_names(self) -> dict[int, dict[str, str]]:
        """{layer: {role: tensor name}} of the FFN tensors (empty for a family upcycle lacks;
        the engine rejects such a SEED with its own message)."""
        family = FAMILIES.get(self.model_type)
        if family is None or not family.ffn.gate:
            return {}
        out: dict[int, dict[str, str]] = {}
        for i in range(int(self.config.get("num_hidden_layers", 0))):
            prefix = family.layer_prefix.format(i=i)
            roles = {"gate": family.ffn.gate, "up": family.ffn.up, "down": family.ffn.down}
            out[i] = {role: prefix + rel for role, rel in roles.items()}
        return out

    def _read(self, name: str) -> list[np.ndarray]:
        if name not in self.infos:
            raise InputError(f"{self.path}: tensor {name} is missing")
        return [m.get(name) for m in self.models]

    def get(self, name: str, dtype: str | None = None) -> np.ndarray:
        """The weighted average over the models, cast to `dtype` (default: SEED's storage)."""
        arrays = self._held.get(name) or self._read(name)
        if name in self._kept:
            self._kept[name] = arrays
        elif name in self._ffn_set:
            self._held[name] = arrays  # the method takes them as experts next
        else:
            self._held.clear()  # a new layer began: drop experts no method took (dense layers)
        dtypes = [m.infos[name].dtype for m in self.models]
        ref = to_float32(arrays[0], dtypes[0])
        total = ref.copy()
        for w, a, d in zip(self.weights[1:], arrays[1:], dtypes[1:], strict=True):
            total += w * (to_float32(a, d) - ref)  # x_0 + sum_e w_e (x_e - x_0): exact if equal
        return cast(total, "F32", dtype or self.infos[name].dtype)

    def keep_members(self, names) -> None:
        """Keep each model's copy of these tensors when read, until `members` takes them."""
        self._kept.update(dict.fromkeys(names))

    def members(self, name: str, dtype: str) -> list[np.ndarray]:
        """Each model's `name` stored as `dtype` (read again unless kept from `get`)."""
        arrays = self._kept.get(name) or self._read(name)
        if name in self._kept:
            self._kept[name] = None
        return [
            cast(a, m.infos[name].dtype, dtype) for m, a in zip(self.models, arrays, strict=True)
        ]

    def member_ffn(self, layer: int, dtype: str) -> list[dict[str, np.ndarray]]:
        """Each model's FFN of `layer` as {"gate", "up", "down"} arrays stored as `dtype`."""
        experts: list[dict[str, np.ndarray]] = [{} for _ in self.models]
        for role, name in self._ffn_names[layer].items():
            arrays = self._held.pop(name, None) or self._read(name)
            for e, (m, a) in enumerate(zip(self.models, arrays, strict=True)):
                experts[e][role] = cast(a, m.infos[name].dtype, dtype)
        return experts


class BTXMethod(Method):
    """BTX conversion: experts from N models, everything else averaged (see module docstring)."""

    info = INFO
    options = (ROUTER_INIT, ROUTER_STD, EXPERT_PROMPTS, EXPERTS_FROM, WEIGHTS)

    def __init__(
        self,
        *,
        experts_from: Sequence[str],
        weights: Sequence[float] = (),
        num_experts: int | None = None,
        top_k: int = 2,
        router_init: str = "random",
        router_std: float = 0.02,
        seed: int = 0,
        expert_prompts: tuple[tuple[str, ...], ...] = (),
    ):
        self.experts_from = tuple(experts_from)
        self.weights = tuple(weights)
        self.num_experts = len(self.experts_from) if num_experts is None else num_experts
        self.top_k = top_k
        self.router_init = router_init
        self.router_std = router_std
        self.seed = seed
        self.expert_prompts = expert_prompts
        self._reader: AveragedCheckpoint | None = None
        self._hidden: dict[int, np.ndarray] = {}

    @classmethod
    def from_options(cls, opts: ConvertOptions) -> BTXMethod:
        return cls(
            num_experts=opts.num_experts, top_k=opts.top_k, seed=opts.seed, **opts.method_options
        )

    def validate(self) -> None:
        n = len(self.experts_from)
        if n < 2:
            raise OptionError(
                f"--method {self.info.name} needs at least 2 --experts-from models, got {n}"
                + (" (list SEED too if it should be an expert)" if n == 1 else "")
            )
        if self.num_experts != n:
            raise OptionError(
                f"--num-experts must equal the number of --experts-from models ({n}) for "
                f"{self.info.name}, got {self.num_experts}"
            )
        if not 1 <= self.top_k <= n:
            raise OptionError(f"--top-k must be between 1 and {n} (the models), got {self.top_k}")
        if self.weights and len(self.weights) != n:
            raise OptionError(
                f"--weights needs one weight per --experts-from model ({n}), got {len(self.weights)}"
            )
        if any(not w > 0 for w in self.weights):
            raise OptionError(f"--weights must all be positive, got {list(self.weights)}")
        if self.router_init not in ROUTER_INITS:
            raise OptionError(
                f"unknown --router-init {self.router_init!r}; choose from {', '.join(ROUTER_INITS)}"
            )
        if self.router_std < 0:
            raise OptionError("--router-std must not be negative")
        if self.router_init == "hidden":
            if len(self.expert_prompts) != n or not all(self.expert_prompts):
                raise OptionError(
                    f"--router-init hidden needs one non-empty --expert-prompts per model ({n}), "
                    f"got {len(self.expert_prompts)}"
                )
        elif self.expert_prompts:
            raise OptionError("--expert-prompts is used only with --router-init hidden")

    def open_checkpoint(self, source: str) -> AveragedCheckpoint:
        """The engine's reader: SEED checked against every model, tensors averaged on read."""
        self._reader = AveragedCheckpoint(source, self.experts_from, self.weights)
        return self._reader

    def describe(self) -> str:
        weights = ",".join(f"{w:g}" for w in self.weights) if self.weights else "uniform"
        init = self.router_init + (
            f" (std {self.router_std})" if self.router_init == "random" else ""
        )
        return (
            f"experts from {len(self.experts_from)} models, weights {weights}, router init {init}"
        )

    def layout(self, hidden: int, intermediate: int) -> MoELayout:
        return MoELayout(self.num_experts, self.top_k, expert_width=intermediate)

    def calibrate(self, reader, moe_layers: list[int], log) -> None:
        """Hidden-state routers: each model runs its own prompts (row e from model e).

        Model e is the one trained on expert e's domain, so its hidden states say best what
        that domain looks like; running each model needs one model in memory at a time and
        no averaged model written anywhere. For identical models this equals running the
        averaged model; for diverged ones, the rows also carry each model's drift.
        """
        if self.router_init != "hidden":
            return
        log(f"computing hidden-state routers from {len(self.experts_from)} models ...")
        per_model = [
            hidden_state_means(path, [list(prompts)], moe_layers)
            for path, prompts in zip(self.experts_from, self.expert_prompts, strict=True)
        ]
        self._hidden = {
            i: hidden_state_rows(np.concatenate([m[i] for m in per_model])) for i in moe_layers
        }

    def router(self, layer: int, hidden: int) -> np.ndarray:
        if self.router_init == "random":
            return random_router(self.num_experts, hidden, self.router_std, self.seed, layer)
        if self.router_init == "zeros":
            return zeros_router(self.num_experts, hidden)
        return self._hidden[layer]

    def layer(self, i: int, ffn: dict[str, np.ndarray], dtype: str) -> MoELayer:
        """`ffn` is the averaged FFN (used by dense layers); experts are each model's own."""
        if self._reader is None:
            raise RuntimeError(
                "BTXMethod.layer before open_checkpoint: the engine reads through it"
            )
        router = self.router(i, ffn["down"].shape[0])
        return MoELayer(router=router, experts=self._reader.member_ffn(i, dtype))
