"""Granular upcycling: each FFN's neurons split into G fine-grained parts.

NVIDIA granular upcycling (He et al. 2024, https://arxiv.org/abs/2410.07524): cut the
intermediate neurons into G shards (gate/up rows, down columns) and repeat the shard list
R = E / (G - S) times ("virtual groups"); Qwen1.5-MoE and DeepSeekMoE add always-on shared
experts. Here S of the G parts form the shared expert, the other G - S are routed (each
replicated R times), and top-K of the E routed experts run per token.

Scaling. Every target renormalizes the top-k routing weights (mixtral always, qwen with
norm_topk_prob), so K chosen experts get weights averaging 1/K. Each routed expert's down
projection is multiplied by s = K / R: with a uniform router and K = E (every part chosen,
each of its R replicas with weight 1/E), sum_e (1/E) * s * part_e(x) = (s R / E) sum_p part_p(x)
= sum_p part_p(x), the dense FFN minus the shared part. The routers that give a part's R
replicas one row (zeros, centroid, activation) make top-k take whole replica sets, so with
K < E and near-uniform weights a token gets the plain sum of its chosen parts.
`--router-init virtual-group` instead gives each replica group (one copy of all P = G - S parts)
one row, so top-k takes whole copies: there s = P, and whenever K is a multiple of P the K
chosen experts are K / P complete copies and sum_e (1/K) * P * part_e(x) = sum_p part_p(x), the
dense FFN again (with K = E too). Only the down projection is scaled (the FFN is
linear in it), which keeps exactness for any activation. The shared expert is returned ungated;
the engine compensates a target's gate (qwen2_moe: sigmoid(0 . x) = 1/2, so its down projection
is doubled).
"""

from __future__ import annotations

import numpy as np

from upcycle.errors import OptionError
from upcycle.io.arrays import cast, to_float32
from upcycle.methods import partitions as P
from upcycle.methods.base import Method, MethodInfo, MoELayer, MoELayout
from upcycle.methods.calibration import LayerActivations, collect_activations, fit_linear_router
from upcycle.methods.options import (
    CALIBRATION_DATA,
    CALIBRATION_TOKENS,
    ROUTER_INIT,
    ROUTER_STD,
    ConvertOptions,
    Option,
)
from upcycle.methods.routers import random_router

INFO = MethodInfo(
    name="granular",
    paper="https://arxiv.org/abs/2410.07524",
    summary="each FFN split into G fine-grained parts: S shared, G-S routed (replicated to E)",
    exact="exact when top-k equals the number of routed experts and the router is uniform "
    "(--router-init zeros), or with --router-init virtual-group when top-k is a multiple of "
    "G - S (whole copies)",
)
GRANULARITY = Option(
    "granularity", None, "granular: parts each FFN is cut into.", type=int, short="-G"
)
SHARED_EXPERTS = Option(
    "shared_experts",
    0,
    "granular: parts that form the always-on shared expert (qwen2_moe).",
    type=int,
    short="-S",
)
PARTITION = Option(
    "partition", "contiguous", "granular: contiguous, random, kmeans or coactivation."
)
ROUTER_INITS = ("random", "zeros", "virtual-group", "centroid", "activation")
NEEDS_DATA = {"partition": ("coactivation",), "router_init": ("activation",)}


class GranularMethod(Method):
    info = INFO
    options = (
        ROUTER_INIT,
        GRANULARITY,
        SHARED_EXPERTS,
        PARTITION,
        CALIBRATION_DATA,
        CALIBRATION_TOKENS,
        ROUTER_STD,
    )

    def __init__(
        self,
        *,
        granularity: int,
        num_experts: int | None,
        top_k: int,
        shared_experts: int = 0,
        partition: str = "contiguous",
        router_init: str = "random",
        router_std: float = 0.02,
        seed: int = 0,
        calibration_data: str | None = None,
        calibration_tokens: int = 8192,
        active_fraction: float | None = None,
    ):
        self.granularity = granularity
        self.shared = shared_experts
        self.num_experts = num_experts if num_experts is not None else granularity - shared_experts
        self.top_k = top_k
        self.partition = partition
        self.router_init = router_init
        self.router_std = router_std
        self.seed = seed
        self.calibration_data = calibration_data  # a dataset spec (upcycle.data.resolve_texts)
        self.calibration_tokens = calibration_tokens
        self.active_fraction = active_fraction
        self._acts: dict[int, LayerActivations] = {}

    @classmethod
    def from_options(cls, opts: ConvertOptions) -> GranularMethod:
        own = dict(opts.method_options)
        if own["granularity"] is None:
            raise OptionError("--method granular needs --granularity")
        data = own.pop("calibration_data")
        if len(data) > 1:
            raise OptionError("--method granular takes one --calibration-data")
        return cls(
            num_experts=opts.num_experts,
            top_k=opts.top_k,
            seed=opts.seed,
            calibration_data=data[0] if data else None,
            **own,
        )

    @property
    def replicas(self) -> int:
        return self.num_experts // (self.granularity - self.shared)

    def validate(self) -> None:
        g, s, e, k = self.granularity, self.shared, self.num_experts, self.top_k
        if g < 2:
            raise OptionError(f"--granularity must be at least 2, got {g}")
        if not 0 <= s < g:
            raise OptionError(
                f"--shared-experts must be between 0 and --granularity - 1 ({g - 1}), got {s}"
            )
        if e < 2 or e % (g - s):
            raise OptionError(
                f"--num-experts must be a multiple of the routed parts (granularity - shared = {g - s}), got {e}"
            )
        if s and k > e:
            raise OptionError(
                f"--top-k counts routed experts only (the {s} shared parts are always on): "
                f"at most {e}, got {k}"
            )
        if not 1 <= k <= e:
            raise OptionError(f"--top-k must be between 1 and --num-experts ({e}), got {k}")
        if self.partition not in P.PARTITIONS:
            raise OptionError(
                f"unknown --partition {self.partition!r}; choose from {', '.join(P.PARTITIONS)}"
            )
        if self.router_init not in ROUTER_INITS:
            raise OptionError(
                f"unknown --router-init {self.router_init!r}; choose from {', '.join(ROUTER_INITS)}"
            )
        if self.router_init == "virtual-group" and k % (g - s):
            raise OptionError(
                f"--router-init virtual-group picks whole copies of the {g - s} routed parts: "
                f"--top-k must be a multiple of {g - s}, got {k}"
            )
        for option, values in NEEDS_DATA.items():
            value = getattr(self, option)
            if value in values and not self.calibration_data:
                flag = "--" + option.replace("_", "-")
                raise OptionError(f"{flag} {value} needs --calibration-data")

    def describe(self) -> str:
        data = f", calibration {self.calibration_tokens} tokens" if self.calibration_data else ""
        return (
            f"{self.granularity} parts ({self.shared} shared, {self.granularity - self.shared} routed "
            f"x{self.replicas}), partition {self.partition}, router init {self.router_init}{data}"
        )

    def layout(self, hidden: int, intermediate: int) -> MoELayout:
        if intermediate % self.granularity:
            raise OptionError(
                f"--granularity {self.granularity} does not divide the FFN width {intermediate}"
            )
        width = intermediate // self.granularity
        return MoELayout(
            self.num_experts, self.top_k, expert_width=width, shared_width=self.shared * width
        )

    def calibrate(self, reader, moe_layers: list[int], log) -> None:
        if self.calibration_data and (
            self.partition == "coactivation" or self.router_init == "activation" or self.shared
        ):
            from upcycle.data import resolve_texts

            self._acts = collect_activations(
                reader.path,
                resolve_texts(self.calibration_data, split="calibration"),
                moe_layers,
                max_tokens=self.calibration_tokens,
                log=log,
            )

    def parts(self, i: int, gate: np.ndarray, up: np.ndarray, down: np.ndarray):
        """(shared neuron indices, routed parts) for layer i; arrays are float32."""
        n, g = gate.shape[0], self.granularity
        acts = self._acts.get(i)
        if self.partition == "coactivation":
            # replicas of a part share its router row, so a token's top-k takes whole groups
            per_token = min(-(-self.top_k // self.replicas), g - self.shared)
            return P.coactivation_partition(
                acts.contributions(down),
                g,
                self.seed,
                i,
                shared=self.shared,
                top_k=per_token,
                router_inputs=acts.x,
            )
        fraction = self.active_fraction or max(self.top_k / self.num_experts, 1 / g)
        if self.partition == "contiguous":
            parts = P.contiguous(n, g)
        elif self.partition == "random":
            parts = P.random_partition(n, g, self.seed, i)
        else:
            parts = P.kmeans_partition(gate, up, g, self.seed, i)
        importance = None
        if self.shared and self.partition != "contiguous":
            if acts is not None:  # how often a neuron is among a token's most important
                importance = acts.active(down, fraction).mean(axis=0)
            else:  # a weight-only proxy for the same
                importance = (
                    np.linalg.norm(gate, axis=1)
                    * np.linalg.norm(up, axis=1)
                    * np.linalg.norm(down, axis=0)
                )
        return P.split_shared(parts, self.shared, importance)

    def router(
        self, i: int, hidden: int, gate: np.ndarray, down: np.ndarray, routed: list[np.ndarray]
    ) -> np.ndarray:
        """(E, H) float32; expert r * (G - S) + p is replica r of routed part p."""
        r, p = self.replicas, len(routed)
        if self.router_init == "random":
            return random_router(self.num_experts, hidden, self.router_std, self.seed, i)
        if self.router_init == "zeros":
            return np.zeros((self.num_experts, hidden), np.float32)
        if self.router_init == "virtual-group":  # one random row per replica group
            rows = random_router(r, hidden, self.router_std, self.seed, i)
            return np.repeat(rows, p, axis=0)
        if self.router_init == "centroid":  # mean gate row: the part's mean pre-activation
            rows = np.stack([gate[part].mean(axis=0) for part in routed])
            # as long as random rows of --router-std: near-uniform mixing weights (see fit_linear_router)
            norms = np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
            rows = rows / norms * (self.router_std * np.sqrt(hidden))
        else:
            acts = self._acts[i]
            rows = fit_linear_router(acts.x, acts.part_norms(down, routed))
        return np.tile(rows.astype(np.float32), (r, 1))

    def layer(self, i: int, ffn: dict[str, np.ndarray], dtype: str) -> MoELayer:
        gate, up, down = (to_float32(ffn[k], dtype) for k in ("gate", "up", "down"))
        shared, routed = self.parts(i, gate, up, down)
        scale = np.float32(self.top_k / self.replicas)  # see the module docstring
        if self.router_init == "virtual-group":  # top-k takes whole copies of the P parts
            scale = np.float32(len(routed))
        parts = [
            {
                "gate": ffn["gate"][p],
                "up": ffn["up"][p],
                "down": cast(down[:, p] * scale, "F32", dtype),
            }
            for p in routed
        ]
        experts = [parts[e % len(parts)] for e in range(self.num_experts)]
        layer = MoELayer(router=self.router(i, gate.shape[1], gate, down, routed), experts=experts)
        if self.shared:
            layer.shared = {
                "gate": ffn["gate"][shared],
                "up": ffn["up"][shared],
                "down": ffn["down"][:, shared],
            }
        return layer
