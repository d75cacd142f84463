"""MixLoRA layers: LoRA experts with a top-k router on a frozen FFN, plain LoRA on linears.

Both are peft tuner layers (`BaseTunerLayer`): the wrapped module is `base_layer`, adapter
tensors live in containers keyed by adapter name, so peft's generic save, load, freeze and
`disable_adapter()` work on them unchanged.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from upcycle.adapters.export import expert_view, lora_scaling

from upcycle.nn.routing import balance_loss, top_k_routing, z_loss

ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
FUSED_GATE_UP = "gate_up_proj"  # Phi-3's MLP: one (2I, H) linear, gate rows first, then up
# where a gated MLP keeps its activation: act_fn (Llama, Qwen, Gemma), activation_fn (Phi-3)
ACTIVATIONS = ("act_fn", "activation_fn")


def ffn_activation(module: nn.Module):
    """The element-wise activation of a gated MLP module (its gate's), or None."""
    for name in ACTIVATIONS:
        act = getattr(module, name, None)
        if callable(act):
            return act
    return None


def fuses_gate_up(module: nn.Module) -> bool:
    """A Phi-3-style MLP: `gate_up_proj` (2I, H) and `down_proj` (H, I) linears."""
    gu, down = getattr(module, FUSED_GATE_UP, None), getattr(module, "down_proj", None)
    return (
        isinstance(gu, nn.Linear)
        and isinstance(down, nn.Linear)
        and gu.out_features == 2 * down.in_features
        and gu.in_features == down.out_features
    )


def is_gated_ffn(module: nn.Module, fused_gate_up: bool = False) -> bool:
    """A gated MLP with an activation: gate_proj, up_proj, down_proj linears (Llama, Mistral,
    Qwen, Gemma) or, with `fused_gate_up`, Phi-3's gate_up_proj and down_proj."""
    split = all(isinstance(getattr(module, n, None), nn.Linear) for n in ROLES)
    fused = fused_gate_up and fuses_gate_up(module)
    return (split or fused) and ffn_activation(module) is not None


def _half(module: nn.Module, part: int, x: torch.Tensor) -> torch.Tensor:
    """Part 0 (gate) or 1 (up) of a fused gate_up module's output."""
    return module(x).chunk(2, dim=-1)[part]


class LoraExperts(nn.Module):
    """Stacked LoRA factors of E experts: {role}_A (E, r, in) and {role}_B (E, out, r)."""

    def __init__(self, num_experts: int, r: int, dims: dict[str, tuple[int, int]]):
        super().__init__()
        self.roles = tuple(dims)
        self.r = r
        for role, (fan_in, fan_out) in dims.items():
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init (kaiming, a=sqrt(5))
            a = torch.empty(num_experts, r, fan_in).uniform_(-bound, bound)
            self.register_parameter(f"{role}_A", nn.Parameter(a))
            self.register_parameter(f"{role}_B", nn.Parameter(torch.zeros(num_experts, fan_out, r)))

    def pairs(self, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            role: (getattr(self, f"{role}_A").to(dtype), getattr(self, f"{role}_B").to(dtype))
            for role in self.roles
        }


class _TunerLayer(nn.Module, BaseTunerLayer):
    """State every tuner layer here shares: the wrapped module and peft's adapter bookkeeping."""

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer


class MixLoraFFN(_TunerLayer):
    """A frozen gated FFN turned into E routed LoRA experts (copy or granular expert views).

    The FFN is down(act(gate(x)) * up(x)) with the module's own activation (`ffn_activation`)
    and gate/up either separate linears or the two halves of Phi-3's fused gate_up_proj; the
    experts' LoRA pairs are per role (gate, up, down) in both layouts.
    """

    adapter_layer_names = ("mixlora_router", "mixlora_experts")
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config) -> None:
        fused = not all(isinstance(getattr(base_layer, n, None), nn.Linear) for n in ROLES)
        for name in (FUSED_GATE_UP, "down_proj") if fused else ROLES:
            if getattr(base_layer, name).bias is not None:
                raise ValueError(f"MixLoRA needs bias-free FFN projections ({name} has a bias)")
        super().__init__(base_layer, adapter_name)
        self.fused_gate_up = fused
        self.mixlora_router = nn.ModuleDict()
        self.mixlora_experts = nn.ModuleDict()
        self.mixlora_dropout = nn.ModuleDict()
        self.settings: dict[str, dict] = {}
        self.aux_loss: torch.Tensor | None = None
        self.collect_aux = False  # set by MixLoraModel.forward only
        # set by upcycle.adapters.checkpointing when this FFN is outside activation checkpoints
        self.recompute_base = False
        self.update_layer(adapter_name, config)

    @property
    def hidden_size(self) -> int:
        return self.base_layer.down_proj.out_features

    @property
    def intermediate_size(self) -> int:
        return self.base_layer.down_proj.in_features

    @property
    def act(self):
        """The FFN's own activation (SiLU, Gemma's tanh GELU, ...)."""
        return ffn_activation(self.base_layer)

    def linears(self) -> tuple[nn.Module, ...]:
        """The base FFN's linear modules: (gate_proj, up_proj, down_proj) or, fused,
        (gate_up_proj, down_proj)."""
        names = (FUSED_GATE_UP, "down_proj") if self.fused_gate_up else tuple(ROLES)
        return tuple(getattr(self.base_layer, n) for n in names)

    def projections(self) -> tuple:
        """The frozen (gate, up, down) projections: weight tensors where the base has plain
        linears (a fused gate_up weight's row halves, as views), else callables (quantized
        linears; a fused one's output halves)."""
        if all(type(m) is nn.Linear for m in self.linears()):
            if not self.fused_gate_up:
                return tuple(m.weight for m in self.linears())
            gate_up, down = self.linears()
            return (*gate_up.weight.chunk(2, dim=0), down.weight)
        if not self.fused_gate_up:
            return self.linears()
        gate_up, down = self.linears()
        return (functools.partial(_half, gate_up, 0), functools.partial(_half, gate_up, 1), down)

    def update_layer(self, adapter_name: str, config) -> None:
        H, inter = self.hidden_size, self.intermediate_size
        E = config.num_experts
        granular = config.expert_view == "granular"
        if granular and inter % config.granularity:
            raise ValueError(
                f"granularity {config.granularity} does not divide the FFN width {inter}"
            )
        view = expert_view(granular, E, config.top_k, inter, config.granularity)
        width = view.width
        dims = {"gate": (H, width), "up": (H, width), "down": (width, H)}
        roles = [ROLES[m] for m in ROLES if m in config.target_modules]
        router = nn.Linear(H, E, bias=False, dtype=torch.float32)
        nn.init.normal_(router.weight, std=config.router_init_std)
        self.mixlora_router[adapter_name] = router
        self.mixlora_experts[adapter_name] = LoraExperts(E, config.r, {r: dims[r] for r in roles})
        p = config.lora_dropout
        self.mixlora_dropout[adapter_name] = make_dropout(p)
        self.settings[adapter_name] = dict(
            num_experts=E,
            top_k=config.top_k,
            scaling=lora_scaling(config.lora_alpha, config.r),
            aux=config.router_aux_loss_coef,
            z=config.router_z_loss_coef,
            jitter=config.jitter_noise,
            slices=view.slices,
            expert_scale=view.scale,
            dropout=p,
        )
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    def route(self, x: torch.Tensor, adapter_name: str):
        """(weights, expert ids, router logits) for tokens x (T, H); logits in fp32."""
        s = self.settings[adapter_name]
        router = self.mixlora_router[adapter_name]
        h = x.to(router.weight.dtype)  # fp32 (or wider): routing decisions must not flip in bf16
        if self.training and s["jitter"] > 0:  # jitter the router's input only
            h = h * torch.empty_like(h).uniform_(1.0 - s["jitter"], 1.0 + s["jitter"])
        logits = router(h)
        weights, ids, probs = top_k_routing(logits, s["top_k"])
        if self.training and (s["aux"] or s["z"]):
            aux = s["aux"] * balance_loss(probs, ids, s["num_experts"])
            if s["z"]:
                aux = aux + s["z"] * z_loss(logits)
            if self.collect_aux:
                self.aux_loss = aux
        return weights, ids, logits

    def uses_fused(self, adapter_name: str) -> bool:
        """Whether `adapter_name` runs on the fused Functions (`upcycle.kernels.dispatch`
        decides: plain linears, copy view; any activation)."""
        from upcycle.kernels.dispatch import mixlora_fused

        return mixlora_fused(self.projections(), self.settings[adapter_name]["slices"])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        from upcycle.kernels.dispatch import routed_lora_ffn

        name = self.active_adapters[0]
        s = self.settings[name]
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        weights, ids, _ = self.route(h, name)
        y = routed_lora_ffn(  # the implementation that runs: upcycle.kernels.dispatch's rule
            h,
            self.projections(),
            self.act,
            weights,
            ids,
            s["num_experts"],
            self.mixlora_experts[name].pairs(h.dtype),
            s["scaling"],
            slices=s["slices"],
            expert_scale=s["expert_scale"],
            dropout_p=s["dropout"] if self.training else 0.0,
            recompute_base=self.recompute_base and self.training and torch.is_grad_enabled(),
        )
        return y.reshape(shape)

    def merge(self, *args, **kwargs) -> None:
        raise ValueError("MixLoRA experts cannot merge into one dense FFN; use `upcycle merge`")


class LoraLinear(_TunerLayer):
    """Plain LoRA on a linear layer: y = base(x) + (alpha / r) * B(A(dropout(x)))."""

    adapter_layer_names = ("mixlora_A", "mixlora_B")
    other_param_names = ()

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config) -> None:
        super().__init__(base_layer, adapter_name)
        self.mixlora_A = nn.ModuleDict()
        self.mixlora_B = nn.ModuleDict()
        self.mixlora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config) -> None:
        base = self.base_layer
        a = nn.Linear(base.in_features, config.r, bias=False, dtype=torch.float32)
        b = nn.Linear(config.r, base.out_features, bias=False, dtype=torch.float32)
        nn.init.zeros_(b.weight)
        self.mixlora_A[adapter_name] = a
        self.mixlora_B[adapter_name] = b
        p = config.lora_dropout
        self.mixlora_dropout[adapter_name] = make_dropout(p)
        self.scaling[adapter_name] = lora_scaling(config.lora_alpha, config.r)
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return y
        for name in self.active_adapters:
            a = self.mixlora_A[name].weight.to(x.dtype)
            b = self.mixlora_B[name].weight.to(x.dtype)
            d = F.linear(F.linear(self.mixlora_dropout[name](x), a), b)
            y = y + self.scaling[name] * d
        return y

    def merge(self, *args, **kwargs) -> None:
        raise ValueError("merge MixLoRA models with `upcycle merge`")


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5's fused experts: gate_up_proj (E, 2I, H), down_proj (E, H, I), act_fn."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gu, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gu.dim() == 3
        and down.dim() == 3
        and gu.shape[0] == down.shape[0]
        and gu.shape[1] == 2 * down.shape[2]
        and gu.shape[2] == down.shape[1]
        and callable(getattr(module, "act_fn", None))
    )


class ExpertsLora(_TunerLayer):
    """LoRA on every expert of an MoE layer's fused experts (split LoRA, never W + B A)."""

    adapter_layer_names = ("mixlora_experts",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config) -> None:
        super().__init__(base_layer, adapter_name)
        self.mixlora_experts = nn.ModuleDict()
        self.mixlora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config) -> None:
        E, two_i, H = self.base_layer.gate_up_proj.shape
        dims = {}
        if {"gate_proj", "up_proj"} & set(config.target_modules):
            dims["gate_up"] = (H, two_i)
        if "down_proj" in config.target_modules:
            dims["down"] = (two_i // 2, H)
        self.mixlora_experts[adapter_name] = LoraExperts(E, config.r, dims)
        p = config.lora_dropout
        self.mixlora_dropout[adapter_name] = make_dropout(p)
        self.scaling[adapter_name] = lora_scaling(config.lora_alpha, config.r)
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if self.disable_adapters or not self.active_adapters:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        from upcycle.kernels.dispatch import routed_experts_lora

        name = self.active_adapters[0]
        base = self.base_layer
        p = getattr(self.mixlora_dropout[name], "p", 0.0) if self.training else 0.0
        return routed_experts_lora(  # the kernel that runs: upcycle.kernels.dispatch's rule
            hidden_states,
            base.gate_up_proj,
            base.down_proj,
            base.act_fn,
            top_k_weights,
            top_k_index,
            self.mixlora_experts[name].pairs(hidden_states.dtype),
            self.scaling[name],
            dropout_p=p,
        )


class TrainableRouter(_TunerLayer):
    """A stock MoE router whose weight is trained as adapter state (the base stays frozen).

    The wrapped router runs unchanged with the adapter's weight in place of its own, so the
    routing rule (softmax, top-k, normalization) is exactly the model's.
    """

    adapter_layer_names = ("mixlora_router",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config) -> None:
        super().__init__(base_layer, adapter_name)
        self.mixlora_router = nn.ParameterDict()
        self.settings: dict[str, dict] = {}
        self.aux_loss: torch.Tensor | None = None
        self.collect_aux = False  # set by MixLoraModel.forward only
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config) -> None:
        weight = self.base_layer.weight.detach().float().clone()
        self.mixlora_router[adapter_name] = nn.Parameter(weight)
        self.settings[adapter_name] = dict(
            aux=config.router_aux_loss_coef, z=config.router_z_loss_coef
        )
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    def forward(self, hidden_states, *args, **kwargs):
        if self.disable_adapters or not self.active_adapters:
            return self.base_layer(hidden_states, *args, **kwargs)
        name = self.active_adapters[0]
        weight = self.mixlora_router[name].to(self.base_layer.weight.dtype)
        out = torch.func.functional_call(
            self.base_layer, {"weight": weight}, (hidden_states, *args), kwargs
        )
        s = self.settings[name]
        if self.training and (s["aux"] or s["z"]) and isinstance(out, tuple) and len(out) == 3:
            logits, _, ids = out
            probs = torch.softmax(logits.float(), dim=-1)
            aux = s["aux"] * balance_loss(probs, ids, logits.shape[-1])
            if s["z"]:
                aux = aux + s["z"] * z_loss(logits)
            if self.collect_aux:
                self.aux_loss = aux
        return out


class FastDropout(nn.Module):
    """nn.Dropout with a cheaper random mask (`upcycle.kernels.reference.fast_dropout`)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from upcycle.kernels.reference import fast_dropout

        return fast_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def make_dropout(p: float) -> nn.Module:
    return FastDropout(p) if p > 0 else nn.Identity()


def use_fast_dropout(model: nn.Module) -> int:
    """Swap the nn.Dropout modules of peft LoRA layers for FastDropout (same p); returns how many.

    Plain LoRA trained by `upcycle train` uses the same dropout as MixLoRA, so the two compare
    on their own merits.
    """
    count = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for key, d in list(drops.items()):
                if type(d) is nn.Dropout:
                    drops[key] = FastDropout(d.p)
                    count += 1
    return count
