"""Copy upcycling: each dense FFN becomes E identical experts.

Sparse Upcycling (Komatsuzaki et al. 2022, https://arxiv.org/abs/2212.05055) and AquilaMoE's
scale-out (BAAI 2024, https://arxiv.org/abs/2408.06567, E=8, top-2, router N(0, 0.02)).

Exactness: with renormalized top-k weights (they sum to 1) the layer output is
sum_k w_k * FFN(x) = FFN(x), whatever the router says. Expert noise breaks this on purpose.
"""

from __future__ import annotations

import numpy as np

from upcycle.io.arrays import cast, to_float32
from upcycle.methods.base import Method, MethodInfo, MoELayer, MoELayout, layer_rng
from upcycle.methods.options import EXPERT_PROMPTS, ROUTER_INIT, ROUTER_STD, ConvertOptions, Option
from upcycle.methods.routers import (
    ROUTER_INITS,
    hidden_state_means,
    hidden_state_rows,
    random_router,
    zeros_router,
)

INFO = MethodInfo(
    name="copy",
    paper="https://arxiv.org/abs/2212.05055",
    summary="each FFN copied into E identical experts (Sparse Upcycling, AquilaMoE scale-out)",
    exact="exact for any router when top-k weights are renormalized and --expert-noise and "
    "--drop-ratio are 0",
)
EXPERT_NOISE = Option(
    "expert_noise",
    0.0,
    "Relative Gaussian noise added to each expert copy (breaks exactness).",
    type=float,
)
DROP_RATIO = Option(
    "drop_ratio",
    0.0,
    "copy: share of each expert's neurons re-initialised, a different random set per expert "
    "(Drop-Upcycling; breaks exactness).",
    type=float,
)


def drop_neurons(
    ffn: dict[str, np.ndarray], ratio: float, dtype: str, seed: int, layer: int, expert: int
) -> dict[str, np.ndarray]:
    """Drop-Upcycling (Nakamura et al., ICLR 2025, https://arxiv.org/abs/2502.19261): a random
    `ratio` of the intermediate neurons, drawn from (seed, layer, expert), re-initialised: their
    gate and up rows and down columns from a normal with each source matrix's mean and std."""
    inter = ffn["down"].shape[1]
    rng = layer_rng(seed, layer, salt=200 + expert)
    idx = np.sort(rng.choice(inter, size=int(round(ratio * inter)), replace=False))
    out = {}
    for role in ("gate", "up", "down"):
        w = to_float32(ffn[role], dtype)
        mean, std = float(w.mean(dtype=np.float64)), float(w.std(dtype=np.float64))
        w = w.copy()
        if role == "down":
            w[:, idx] = rng.normal(mean, std, (w.shape[0], len(idx))).astype(np.float32)
        else:
            w[idx] = rng.normal(mean, std, (len(idx), w.shape[1])).astype(np.float32)
        out[role] = cast(w, "F32", dtype)
    return out


def copy_experts(
    ffn: dict[str, np.ndarray],
    num_experts: int,
    dtype: str,
    noise: float = 0.0,
    seed: int = 0,
    layer: int = 0,
) -> list[dict[str, np.ndarray]]:
    """E experts from one FFN {"gate": (I, H), "up": (I, H), "down": (H, I)} stored as `dtype`.

    Without noise every expert shares the same arrays (no copies in memory). With noise,
    expert e's matrix W becomes W + noise * rms(W) * N(0, 1), drawn from (seed, layer, e).
    """
    if noise == 0.0:
        return [dict(ffn) for _ in range(num_experts)]
    experts = []
    for e in range(num_experts):
        rng = layer_rng(seed, layer, salt=100 + e)
        out = {}
        for role in sorted(ffn):
            w = to_float32(ffn[role], dtype)
            rms = np.sqrt(np.mean(np.square(w, dtype=np.float64)))
            noisy = w + np.float32(noise * rms) * rng.standard_normal(w.shape, dtype=np.float32)
            out[role] = cast(noisy, "F32", dtype)
        experts.append(out)
    return experts


class CopyMethod(Method):
    """Copy upcycling with a choice of router initialization."""

    info = INFO
    options = (ROUTER_INIT, ROUTER_STD, EXPERT_NOISE, EXPERT_PROMPTS, DROP_RATIO)

    def __init__(
        self,
        *,
        num_experts: int,
        top_k: int,
        router_init: str = "random",
        router_std: float = 0.02,
        expert_noise: float = 0.0,
        seed: int = 0,
        expert_prompts: tuple[tuple[str, ...], ...] = (),
        drop_ratio: float = 0.0,
    ):
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_init = router_init
        self.router_std = router_std
        self.expert_noise = expert_noise
        self.seed = seed
        self.expert_prompts = expert_prompts
        self.drop_ratio = drop_ratio
        self._hidden: dict[int, np.ndarray] = {}

    @classmethod
    def from_options(cls, opts: ConvertOptions) -> CopyMethod:
        return cls(
            num_experts=8 if opts.num_experts is None else opts.num_experts,
            top_k=opts.top_k,
            seed=opts.seed,
            **opts.method_options,
        )

    def validate(self) -> None:
        from upcycle.errors import OptionError

        if self.num_experts < 2:
            raise OptionError(f"--num-experts must be at least 2, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise OptionError(
                f"--top-k must be between 1 and --num-experts ({self.num_experts}), got {self.top_k}"
            )
        if self.router_init not in ROUTER_INITS:
            raise OptionError(
                f"unknown --router-init {self.router_init!r}; choose from {', '.join(ROUTER_INITS)}"
            )
        if self.router_std < 0 or self.expert_noise < 0:
            raise OptionError("--router-std and --expert-noise must not be negative")
        if not 0 <= self.drop_ratio <= 1:
            raise OptionError(f"--drop-ratio must be in [0, 1], got {self.drop_ratio}")
        if self.router_init == "hidden":
            if len(self.expert_prompts) != self.num_experts:
                raise OptionError(
                    f"--router-init hidden needs one --expert-prompts per expert "
                    f"({self.num_experts}), got {len(self.expert_prompts)}"
                )
            if not all(self.expert_prompts):
                raise OptionError("--expert-prompts: every expert needs at least one prompt")
        elif self.expert_prompts:
            raise OptionError("--expert-prompts is used only with --router-init hidden")

    def describe(self) -> str:
        init = self.router_init + (
            f" (std {self.router_std})" if self.router_init == "random" else ""
        )
        drop = f", drop ratio {self.drop_ratio:g}" if self.drop_ratio else ""
        return f"router init {init}, expert noise {self.expert_noise}{drop}"

    def inexact(self) -> str | None:
        if self.drop_ratio:
            return (
                f"{self.drop_ratio:g} of each expert's neurons were re-initialised "
                "(Drop-Upcycling): the experts differ from the dense FFN and from each other"
            )
        if self.expert_noise:
            return f"each expert copy carries relative noise {self.expert_noise:g}"
        return None

    def layout(self, hidden: int, intermediate: int) -> MoELayout:
        return MoELayout(self.num_experts, self.top_k, expert_width=intermediate)

    def calibrate(self, reader, moe_layers: list[int], log) -> None:
        if self.router_init == "hidden":
            log(
                f"computing hidden-state routers from {sum(map(len, self.expert_prompts))} prompts ..."
            )
            means = hidden_state_means(
                reader.path, [list(p) for p in self.expert_prompts], moe_layers
            )
            self._hidden = {i: hidden_state_rows(m) for i, m in means.items()}

    def router(self, layer: int, hidden: int) -> np.ndarray:
        if self.router_init == "random":
            return random_router(self.num_experts, hidden, self.router_std, self.seed, layer)
        if self.router_init == "zeros":
            return zeros_router(self.num_experts, hidden)
        return self._hidden[layer]

    def layer(self, i: int, ffn: dict[str, np.ndarray], dtype: str) -> MoELayer:
        router = self.router(i, ffn["down"].shape[0])
        experts = copy_experts(ffn, self.num_experts, dtype, self.expert_noise, self.seed, i)
        if self.drop_ratio:
            experts = [
                drop_neurons(x, self.drop_ratio, dtype, self.seed, i, e)
                for e, x in enumerate(experts)
            ]
        return MoELayer(router=router, experts=experts)
