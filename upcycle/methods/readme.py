"""Read-ME: experts cut from a dense FFN by domain activation masks, chosen by a pre-gate.

Read-ME (Cai et al., NeurIPS 2024, https://arxiv.org/abs/2410.19123):

1. Run the dense model on calibration text of each domain (one `--calibration-data` per
   domain; a single dataset is split into `--num-experts` domains by k-means over its blocks'
   activation profiles). Neuron j of layer l matters to domain d by the mean |h_j| over d's
   tokens, h = act(gate x) * up x being the down projection's input.
2. Domain d's mask keeps the top `--keep` fraction of each layer's neurons. The residual
   (shared) expert is the intersection of all masks; expert d is mask d minus the residual.
   Both become real weights (rows of gate/up, columns of down), padded with zero neurons to
   one width per model.
3. One pre-gating router for every layer: a small causal transformer over token ids whose
   embeddings are the LM's. At conversion its transformer layers start as the identity (zero
   output projections) and its head is a ridge fit from each token's (normalized) embedding
   to its activation label: the expert whose neurons carry most of the token's |h| summed over
   layers. `upcycle train --method readme` then trains router and backbone in turns.

Not exact by design: a token keeps the residual and its expert's neurons (about `keep` of the
FFN), a domain-level choice. `--keep 1` keeps every neuron in the residual, which is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from upcycle.errors import InputError, OptionError
from upcycle.io.arrays import STORAGE, cast
from upcycle.methods.base import Method, MethodInfo, MoELayer, MoELayout
from upcycle.methods.options import CALIBRATION_DATA, CALIBRATION_TOKENS, ConvertOptions, Option

INFO = MethodInfo(
    name="readme",
    paper="https://arxiv.org/abs/2410.19123",
    summary="experts = per-domain activation masks minus their shared residual; one "
    "pre-gating router over token ids for all layers (Read-ME)",
    exact="exact only with --keep 1; otherwise an approximation to be trained",
)
KEEP = Option("keep", 0.5, "readme: share of each layer's neurons in a domain's mask.", type=float)
ROUTER_LAYERS = Option(
    "router_layers", 1, "readme: transformer layers of the pre-gating router.", type=int
)

ROUTER_PREFIX = "model.router."
NEURONS_FILE = "readme_neurons.json"  # which dense neurons each expert holds, per layer


def _kmeans(points: np.ndarray, k: int, seed: int, iters: int = 50) -> np.ndarray:
    """Cluster labels (n,) by Lloyd's algorithm from a k-means++ start (deterministic)."""
    rng = np.random.default_rng(seed)
    n = points.shape[0]
    centers = [points[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min([((points - c) ** 2).sum(1) for c in centers], axis=0)
        total = d2.sum()
        pick = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        centers.append(points[pick])
    centers = np.stack(centers)
    labels = np.zeros(n, dtype=np.int64)
    for step in range(iters):
        dist = ((points[:, None, :] - centers[None]) ** 2).sum(-1)
        new = dist.argmin(1)
        if step and np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            if (labels == c).any():
                centers[c] = points[labels == c].mean(0)
    return labels


WIDTH_MULTIPLE = 8  # torch's grouped_mm wants 16-byte strides: 8 bf16 or 4 fp32 neurons


def _aligned(width: int) -> int:
    """`width` rounded up to WIDTH_MULTIPLE (the extra neurons are zero, so they add nothing)."""
    return -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def membership(experts: list[list[np.ndarray]], intermediate: int) -> np.ndarray:
    """(L, I, E) float32 0/1: whether dense neuron j of layer l belongs to expert e."""
    member = np.zeros((len(experts), intermediate, len(experts[0])), dtype=np.float32)
    for i, layer in enumerate(experts):
        for e, idx in enumerate(layer):
            member[i, idx, e] = 1.0
    return member


def load_membership(folder: str) -> np.ndarray:
    """The (L, I, E) membership of a Read-ME checkpoint, from its readme_neurons.json."""
    import json
    import os

    path = os.path.join(folder, NEURONS_FILE)
    if not os.path.isfile(path):
        raise InputError(f"{folder}: no {NEURONS_FILE} (not a Read-ME model from upcycle convert)")
    with open(path) as f:
        record = json.load(f)
    experts = [[np.asarray(e, dtype=np.int64) for e in lay["experts"]] for lay in record["layers"]]
    return membership(experts, int(record["source_intermediate_size"]))


def activation_scores(dense_model, ids, member: np.ndarray, batch_size: int = 4):
    """(tokens, E) float32 tensor: for each token of `ids` (blocks, T), the |h| mass on each
    expert's neurons summed over layers, h being the dense model's down-projection input.
    Its argmax is the token's activation label (Read-ME's router target)."""
    import torch

    weights = torch.from_numpy(member)
    scores: list[torch.Tensor] = []
    acc: dict[str, torch.Tensor] = {}

    def hook(i):
        def fn(_m, a):
            h = a[0].detach().abs().float().reshape(-1, a[0].shape[-1])
            s = h @ weights[i].to(h.device)
            acc["s"] = s if i == 0 else acc["s"] + s

        return fn

    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(hook(i))
        for i, layer in enumerate(dense_model.model.layers)
    ]
    try:
        with torch.no_grad():
            for b in range(0, ids.shape[0], batch_size):
                dense_model(input_ids=ids[b : b + batch_size])
                scores.append(acc["s"])
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(scores)


class ReadmeMethod(Method):
    """Read-ME conversion (see module docstring). The experts' widths depend on the masks:
    before calibration `layout` gives upper bounds (what `--dry-run` shows), after it the
    widths found."""

    info = INFO
    options = (CALIBRATION_DATA, KEEP, ROUTER_LAYERS, CALIBRATION_TOKENS)
    default_top_k = 1
    target = "upcycle_readme"

    def __init__(
        self,
        *,
        calibration_data: Sequence[str],
        num_experts: int | None = None,
        top_k: int = 1,
        keep: float = 0.5,
        calibration_tokens: int = 8192,
        seq_len: int = 256,
        router_layers: int = 1,
        router_intermediate_size: int | None = None,
        seed: int = 0,
    ):
        self.calibration_data = tuple(calibration_data)
        self.num_experts = num_experts
        self.top_k = top_k
        self.keep = keep
        self.calibration_tokens = calibration_tokens
        self.seq_len = seq_len
        self.router_layers = router_layers
        self.router_intermediate_size = router_intermediate_size
        self.seed = seed
        self.found: dict = {}  # what calibration found (upcycle.json's report)
        self._experts: list[list[np.ndarray]] = []  # [layer][expert] -> neuron indices
        self._residual: list[np.ndarray] = []  # [layer] -> neuron indices
        self._head: np.ndarray | None = None  # (E, H) float32

    @classmethod
    def from_options(cls, opts: ConvertOptions) -> ReadmeMethod:
        return cls(
            num_experts=opts.num_experts, top_k=opts.top_k, seed=opts.seed, **opts.method_options
        )

    @property
    def domains(self) -> int:
        n = len(self.calibration_data)
        return n if n > 1 else int(self.num_experts or 0)

    def validate(self) -> None:
        n = len(self.calibration_data)
        if n == 0:
            raise OptionError(
                "--method readme needs --calibration-data (one per domain, or one dataset "
                "with --num-experts domains to find)"
            )
        if n == 1 and (self.num_experts is None or self.num_experts < 2):
            raise OptionError(
                "--method readme with one --calibration-data needs --num-experts (at least 2) "
                "domains to cluster it into"
            )
        if n > 1 and self.num_experts is not None and self.num_experts != n:
            raise OptionError(
                f"--num-experts must equal the number of --calibration-data domains ({n}) for "
                f"readme, got {self.num_experts}"
            )
        if not 0 < self.keep <= 1:
            raise OptionError(f"--keep must be in (0, 1], got {self.keep}")
        if not 1 <= self.top_k <= self.domains:
            raise OptionError(
                f"--top-k must be between 1 and {self.domains} (the experts), got {self.top_k}"
            )
        if self.calibration_tokens < self.seq_len:
            raise OptionError(f"--calibration-tokens must be at least {self.seq_len}")
        if self.router_layers < 0:
            raise OptionError("--router-layers must not be negative")

    def describe(self) -> str:
        widths = ""
        if self.found:
            widths = (
                f"; residual {self.found['residual_width']}, experts "
                f"{self.found['expert_width']} neurons (padded)"
            )
        return (
            f"{self.domains} domains from {len(self.calibration_data)} dataset(s), keep "
            f"{self.keep:g}, pre-gate of {self.router_layers} layer(s){widths}"
        )

    # -- calibration --------------------------------------------------------------------------

    def open_checkpoint(self, source: str):
        from upcycle.arch import RECORDS, record
        from upcycle.errors import UnsupportedError
        from upcycle.io.checkpoint import Checkpoint

        ckpt = Checkpoint(source)
        if not record(ckpt.model_type).readme:
            families = " and ".join(t for t, r in RECORDS.items() if r.readme)
            raise UnsupportedError(
                f"--method readme supports {families} models, not {ckpt.model_type}"
            )
        return ckpt

    def calibrate(self, reader, moe_layers: list[int], log) -> None:
        self._calibrate(reader.path)

    def _calibrate(self, source: str) -> None:
        import sys

        import torch

        from upcycle.data import resolve_texts, token_blocks
        from upcycle.io.models import load_tokenizer
        from upcycle.methods.calibration import load_for_calibration

        def say(msg):
            print(msg, file=sys.stderr)

        from transformers.utils import logging as hf_logging

        tok = load_tokenizer(source)
        hf_logging.disable_progress_bar()
        try:
            model = load_for_calibration(source)
        finally:
            hf_logging.enable_progress_bar()
        layers = model.model.layers
        L, E = len(layers), self.domains
        blocks, owner = [], []
        for d, spec in enumerate(self.calibration_data):
            texts = resolve_texts(spec, split="calibration")
            b = token_blocks(texts, tok, seq_len=self.seq_len, max_tokens=self.calibration_tokens)
            if b.shape[0] == 0:
                raise InputError(
                    f"--calibration-data {spec}: no full block of {self.seq_len} tokens"
                )
            blocks.append(b)
            owner += [d] * b.shape[0]
        ids = torch.cat(blocks)
        say(f"readme: activation profiles of {ids.numel()} calibration tokens ...")
        profiles = self._profiles(model, ids)  # (blocks, L, I) mean |h|
        if len(self.calibration_data) > 1:
            domain = np.asarray(owner)
        else:
            flat = profiles.reshape(len(profiles), -1)
            flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
            domain = _kmeans(flat, E, self.seed)
            sizes = np.bincount(domain, minlength=E)
            if (sizes == 0).any():
                raise InputError(
                    f"--calibration-data {self.calibration_data[0]}: k-means found fewer than "
                    f"{E} domains in {len(flat)} blocks; give more text or fewer --num-experts"
                )
        importance = np.stack([profiles[domain == d].mean(0) for d in range(E)])  # (E, L, I)
        inter = importance.shape[-1]
        keep = int(round(self.keep * inter))
        masks = np.zeros_like(importance, dtype=bool)
        top = np.argsort(-importance, axis=-1, kind="stable")[..., :keep]
        np.put_along_axis(masks, top, True, axis=-1)
        residual = masks.all(axis=0)  # (L, I)
        self._residual = [np.flatnonzero(residual[i]) for i in range(L)]
        self._experts = [
            [np.flatnonzero(masks[d, i] & ~residual[i]) for d in range(E)] for i in range(L)
        ]
        member = membership(self._experts, inter)
        labels = activation_scores(model, ids, member).argmax(1).numpy()  # (tokens,)
        emb = model.get_input_embeddings().weight.detach().float().numpy()
        self._fit_head(emb, ids.reshape(-1).numpy(), labels, model.config.rms_norm_eps)
        self.found = {
            "domains": E,
            "intermediate_size": inter,
            "blocks_per_domain": np.bincount(domain, minlength=E).tolist(),
            "keep": keep,
            "residual_width": _aligned(max(len(r) for r in self._residual)),
            "residual_widths": [len(r) for r in self._residual],
            "expert_width": _aligned(max(1, max(len(x) for e in self._experts for x in e))),
            "label_share": np.bincount(labels, minlength=E).astype(float) / len(labels),
            "router_train_accuracy": self._accuracy,
        }
        self.found["label_share"] = [round(float(x), 4) for x in self.found["label_share"]]
        say(
            f"readme: residual {self.found['residual_width']} neurons, experts "
            f"{self.found['expert_width']}; router fit accuracy {self._accuracy:.3f}"
        )

    def _profiles(self, model, ids) -> np.ndarray:
        """(blocks, L, I): each block's mean |down-projection input| per layer."""
        import torch

        out = []
        sums: dict[int, torch.Tensor] = {}
        hooks = [
            layer.mlp.down_proj.register_forward_pre_hook(
                lambda _m, a, i=i: sums.__setitem__(i, a[0].detach().abs().float().mean(1))
            )
            for i, layer in enumerate(model.model.layers)
        ]
        try:
            with torch.no_grad():
                for b in range(0, ids.shape[0], 4):
                    model(input_ids=ids[b : b + 4])
                    out.append(torch.stack([sums[i] for i in range(len(sums))], 1))
        finally:
            for h in hooks:
                h.remove()
        return torch.cat(out).numpy()

    def _fit_head(self, emb: np.ndarray, tokens: np.ndarray, labels: np.ndarray, eps: float):
        from upcycle.methods.calibration import fit_linear_router

        x = emb[tokens]
        x = x / np.sqrt((x**2).mean(1, keepdims=True) + eps)  # the pre-gate's RMSNorm at init
        y = np.eye(self.domains, dtype=np.float32)[labels]
        self._head = fit_linear_router(x, y, log=False, logit_std=1.0)
        self._accuracy = float(((x @ self._head.T).argmax(1) == labels).mean())

    def write_files(self, folder: str) -> None:
        """readme_neurons.json: per layer, the dense FFN's neuron indices in the residual
        expert and in each routed expert, in the order they are stored (training computes
        the router's activation labels from them)."""
        import json
        import os

        record = {
            "source_intermediate_size": int(self.found["intermediate_size"]),
            "layers": [
                {"residual": r.tolist(), "experts": [e.tolist() for e in experts]}
                for r, experts in zip(self._residual, self._experts, strict=True)
            ],
        }
        with open(os.path.join(folder, NEURONS_FILE), "w") as f:
            json.dump(record, f)

    # -- the engine's hooks ---------------------------------------------------------------------

    def layout(self, hidden: int, intermediate: int) -> MoELayout:
        if not self.found:  # before calibration: a mask keeps at most `keep` of the neurons
            bound = _aligned(int(round(self.keep * intermediate)))
            return MoELayout(
                self.domains, self.top_k, expert_width=bound, shared_width=bound, final=False
            )
        return MoELayout(
            self.domains,
            self.top_k,
            expert_width=self.found["expert_width"],
            shared_width=self.found["residual_width"],
        )

    def report(self) -> dict | None:
        return self.found or None

    def layer(self, i: int, ffn: dict[str, np.ndarray], dtype: str) -> MoELayer:
        def part(idx: np.ndarray, width: int) -> dict[str, np.ndarray]:
            hidden = ffn["down"].shape[0]
            gate = np.zeros((width, hidden), STORAGE[dtype])
            up = np.zeros((width, hidden), STORAGE[dtype])
            down = np.zeros((hidden, width), STORAGE[dtype])
            gate[: len(idx)], up[: len(idx)] = ffn["gate"][idx], ffn["up"][idx]
            down[:, : len(idx)] = ffn["down"][:, idx]
            return {"gate": gate, "up": up, "down": down}

        experts = [part(idx, self.found["expert_width"]) for idx in self._experts[i]]
        shared = part(self._residual[i], self.found["residual_width"])
        return MoELayer(router=None, experts=experts, shared=shared)

    def router_width(self, hidden: int) -> int:
        return self.router_intermediate_size or 2 * hidden

    def router_shapes(self, cfg: dict) -> dict[str, tuple[int, ...]]:
        """The pre-gate's tensors (relative to ROUTER_PREFIX) and their shapes, in write order."""
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or hidden // heads
        kv = cfg["num_key_value_heads"] * head_dim
        width = self.router_width(hidden)
        shapes = {"embed_tokens.weight": (cfg["vocab_size"], hidden)}
        for r in range(self.router_layers):
            p = f"layers.{r}."
            shapes.update(
                {
                    p + "input_layernorm.weight": (hidden,),
                    p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                    p + "self_attn.k_proj.weight": (kv, hidden),
                    p + "self_attn.v_proj.weight": (kv, hidden),
                    p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                    p + "post_attention_layernorm.weight": (hidden,),
                    p + "mlp.gate_proj.weight": (width, hidden),
                    p + "mlp.up_proj.weight": (width, hidden),
                    p + "mlp.down_proj.weight": (hidden, width),
                }
            )
        shapes.update({"norm.weight": (hidden,), "head.weight": (self.domains, hidden)})
        return shapes

    def adapt_plan(self, plan):
        """The pre-gate's tensors after everything else; its config; the code files."""
        from upcycle.modeling import auto_map, code_files

        cfg = dict(plan.config)
        shapes = self.router_shapes(cfg)
        entries = plan.entries + [(ROUTER_PREFIX + rel, plan.dtype, s) for rel, s in shapes.items()]
        window = cfg.get("sliding_window") and plan.reader.config.get("use_sliding_window", True)
        cfg.update(
            router_num_layers=self.router_layers,
            router_intermediate_size=self.router_width(cfg["hidden_size"]),
            sliding_window=cfg.get("sliding_window") if window else None,
            auto_map=auto_map(self.target),
        )
        return dataclasses.replace(
            plan,
            entries=entries,
            config=dict(sorted(cfg.items())),
            code_files=code_files(self.target),
        )

    def extra_tensors(self, plan, ckpt) -> dict[str, np.ndarray]:
        """The pre-gate: the LM's embeddings, identity layers (zero output projections, small
        random inputs so training can move them), unit norms, the fitted head."""
        rng = np.random.default_rng([self.seed, 7])
        dtype = plan.dtype
        out: dict[str, np.ndarray] = {}
        for rel, shape in self.router_shapes(plan.config).items():
            if rel == "embed_tokens.weight":
                out[ROUTER_PREFIX + rel] = ckpt.get(plan.family.embed, dtype)
                continue
            if rel == "head.weight":
                arr = self._head
            elif rel.endswith("norm.weight"):
                arr = np.ones(shape, np.float32)
            elif rel.endswith(("o_proj.weight", "down_proj.weight")):
                arr = np.zeros(shape, np.float32)
            else:
                arr = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            out[ROUTER_PREFIX + rel] = cast(arr.astype(np.float32), "F32", dtype)
        return out
