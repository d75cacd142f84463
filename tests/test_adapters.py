"""MixLoRA adapters: forward and gradients against a naive per-expert model, peft round trips."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
import upcycle.adapters as A
from conftest import PY, python_env, save_tiny
from upcycle.adapters.layers import MixLoraFFN

from upcycle.train.components import enable_checkpointing

_ROLES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def tiny_model(family="llama", seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    from conftest import FAMILY_CONFIGS, TINY
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(family, **{**TINY, **FAMILY_CONFIGS[family]})
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def randomize(model, seed=1):
    """Give every adapter tensor random values (B starts at zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mixlora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def naive_ffn(layer: MixLoraFFN, x: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert: the expert's merged weights applied to x, weighted."""
    s = layer.settings["default"]
    base = layer.base_layer
    experts = layer.mixlora_experts["default"]
    h = x.reshape(-1, x.shape[-1])
    router = layer.mixlora_router["default"]
    probs = torch.softmax(router(h.to(router.weight.dtype)), -1)
    w, ids = torch.topk(probs, s["top_k"], -1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for k in range(s["top_k"]):
            e = int(ids[t, k])
            lo, hi = s["slices"][e] if s["slices"] else (0, layer.intermediate_size)
            W = {
                "gate": base.gate_proj.weight[lo:hi],
                "up": base.up_proj.weight[lo:hi],
                "down": base.down_proj.weight[:, lo:hi],
            }
            for role in experts.roles:
                a, b = getattr(experts, f"{role}_A")[e], getattr(experts, f"{role}_B")[e]
                W[role] = W[role] + s["scaling"] * b @ a
            y = F.linear(
                base.act_fn(F.linear(h[t], W["gate"])) * F.linear(h[t], W["up"]), W["down"]
            )
            out[t] += w[t, k].to(h.dtype) * s["expert_scale"] * y
    return out.reshape(x.shape)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_experts=4, top_k=2),
        dict(num_experts=3, top_k=1, target_modules=["up_proj", "down_proj"]),
        dict(num_experts=8, top_k=3, expert_view="granular", granularity=4),
    ],
)
def test_layer_matches_naive_experts(kwargs):
    from peft import get_peft_model

    model = get_peft_model(tiny_model(), A.MixLoraConfig(r=4, lora_dropout=0.0, **kwargs))
    randomize(model)
    layer = next(m for m in model.modules() if isinstance(m, MixLoraFFN)).double()
    x = torch.randn(3, 7, layer.hidden_size, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    torch.manual_seed(0)
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad((y * upstream).sum(), [x] + params)
    y_ref = naive_ffn(layer, x)
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), [x] + params)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_empty_experts_and_bf16():
    """Experts no token picks get zero gradients; bf16 inputs run with fp32 adapter weights."""
    from peft import get_peft_model

    model = get_peft_model(tiny_model(), A.MixLoraConfig(num_experts=6, top_k=1, r=4))
    randomize(model)
    layer = next(m for m in model.modules() if isinstance(m, MixLoraFFN))
    with torch.no_grad():  # route every token to expert 2
        layer.mixlora_router["default"].weight.zero_()
        layer.mixlora_router["default"].weight[2] = 0.0
    x = torch.randn(1, 5, layer.hidden_size)
    _, ids, _ = layer.route(x.reshape(-1, x.shape[-1]), "default")
    layer(x).sum().backward()
    used = set(ids.flatten().tolist())
    experts = layer.mixlora_experts["default"]
    for e in range(6):
        zero = bool((experts.up_B.grad[e] == 0).all())
        assert zero == (e not in used)
    layer.to(torch.bfloat16)
    layer.mixlora_router.float()
    layer.mixlora_experts.float()
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_disabled_adapter_is_the_base_model():
    from peft import get_peft_model

    base = tiny_model()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        want = base(ids).logits
    model = get_peft_model(base, A.MixLoraConfig(num_experts=4, top_k=2, r=4))
    randomize(model)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            got = model(input_ids=ids).logits
        changed = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert (changed - want).abs().max() > 1e-3


def test_aux_loss_reaches_routers_with_gradient_checkpointing():
    from peft import get_peft_model

    model = get_peft_model(
        tiny_model(), A.MixLoraConfig(num_experts=4, top_k=2, r=4, router_z_loss_coef=1e-3)
    )
    enable_checkpointing(model)
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.aux_loss.backward()
    router = next(m for m in model.modules() if isinstance(m, MixLoraFFN)).mixlora_router
    assert router["default"].weight.grad.abs().sum() > 0


def test_checkpointed_training_matches_plain_and_keeps_no_router_graph():
    """Gradients with activation checkpointing, of whole layers or of attention only (the
    FFN outside, rerunning its base projections in backward), equal those without (dropout
    on, masks replayed from the restored RNG), across batches of different sizes (the fused
    layer's reused workspace), and no layer keeps a router loss after the call: one kept from
    checkpoint re-runs would hold that layer's recomputed graph until the next step."""
    from peft import get_peft_model
    from upcycle.adapters.checkpointing import checkpoint_attention_only
    from upcycle.kernels.workspace import release_workspace

    def grads(checkpointing: str, shapes):
        model = get_peft_model(
            tiny_model(), A.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.1)
        )
        randomize(model)
        if checkpointing != "none":
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
            model.enable_input_require_grads()
        if checkpointing == "attention":
            assert checkpoint_attention_only(model) == model.config.num_hidden_layers
        model.train()
        layers = model.base_model.mixlora_layers()
        result = []
        for i, shape in enumerate(shapes):
            torch.manual_seed(100 + i)
            ids = torch.randint(0, 128, shape)
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            assert all(layer.aux_loss is None and not layer.collect_aux for layer in layers)
            result.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
            model.zero_grad()
        return result

    shapes = [(2, 9), (3, 17), (1, 5)]
    release_workspace()
    plain = grads("none", shapes)
    for mode in ("layers", "attention"):
        checkpointed = grads(mode, shapes)
        for a_step, b_step in zip(plain, checkpointed, strict=True):
            for a, b in zip(a_step, b_step, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_in_a_fresh_process(tmp_path):
    from peft import get_peft_model

    base_dir = save_tiny(str(tmp_path / "base"), "qwen2")
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        A.MixLoraConfig(
            num_experts=4, top_k=2, r=4, target_modules=["q_proj", "gate_proj", "down_proj"]
        ),
    )
    randomize(model)
    model.eval()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    run = tmp_path / "run"
    model.save_pretrained(run)
    assert sorted(os.listdir(run)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert json.loads((run / "adapter_config.json").read_text())["peft_type"] == "MIXLORA"
    from safetensors.torch import save_file

    save_file({"logits": want}, str(tmp_path / "want.safetensors"))
    script = f"""
import torch, upcycle.adapters
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM
cfg = PeftConfig.from_pretrained({str(run)!r})
assert type(cfg).__name__ == "MixLoraConfig", type(cfg)
assert cfg.target_modules == ["q_proj", "gate_proj", "down_proj"], cfg.target_modules
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_dir!r}), {str(run)!r})
model.eval()
with torch.no_grad():
    got = model(input_ids=torch.arange(12).reshape(2, 6)).logits
from safetensors.torch import load_file
want = load_file({str(tmp_path / "want.safetensors")!r})["logits"]
torch.testing.assert_close(got, want, rtol=0, atol=0)
assert not any(p.requires_grad for p in model.parameters())
print("ok")
"""
    r = subprocess.run([PY, "-c", script], env=python_env(), capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(target_modules=["q_proj", "w9"]), "unknown target module 'w9'"),
        (dict(num_experts=4, top_k=5), "top_k must be between 1 and num_experts (4)"),
        (dict(target_modules=["q_proj"]), "at least one FFN projection"),
        (dict(expert_view="granular", granularity=3, num_experts=8), "multiple of granularity"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError) as info:
        A.MixLoraConfig(**kwargs)
    assert message in str(info.value)


def test_refuses_moe_bases_and_a_second_adapter():
    from peft import get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    moe = MixtralForCausalLM(
        MixtralConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        )
    )
    with pytest.raises(ValueError, match="already an MoE model"):
        get_peft_model(moe, A.MixLoraConfig())
    model = get_peft_model(tiny_model(), A.MixLoraConfig(num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="already has a MixLoRA adapter"):
        model.add_adapter("second", A.MixLoraConfig(num_experts=2, top_k=1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fused_layer_matches_reference_with_dropout(dtype):
    """The lean-backward Function equals autograd on the reference, dropout masks included.

    In fp64 the two agree to rounding. In bf16 they round differently, so each is compared
    with the fp64 reference: the fused error must be of the same order as the reference's.
    """
    from upcycle.kernels.fused import routed_lora_swiglu
    from upcycle.kernels.reference import fast_dropout, routed_lora_ffn

    g = torch.Generator().manual_seed(0)
    T, H, inter, E, K, r = 37, 24, 40, 5, 2, 3

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x, logits = rand(T, H), rand(T, E)
    base = [rand(*s, scale=0.2) for s in ((inter, H), (inter, H), (H, inter))]
    lora = {
        "gate": (rand(E, r, H), rand(E, inter, r)),
        "up": (rand(E, r, H), rand(E, inter, r)),
        "down": (rand(E, r, inter), rand(E, H, r)),
    }
    up = rand(T, H, scale=1.0)

    def run(fused, dt):
        leaves = [t.to(dt).requires_grad_() for t in (x, logits, *sum(lora.values(), ()))]
        xx, lg, *ab = leaves
        pairs = {role: (ab[2 * i], ab[2 * i + 1]) for i, role in enumerate(lora)}
        gate_w, up_w, down_w = (w.to(dt) for w in base)
        w, ids = torch.topk(torch.softmax(lg.float(), -1), K)
        w = w / w.sum(-1, keepdim=True)
        torch.manual_seed(7)
        if fused:
            y = routed_lora_swiglu(xx, gate_w, up_w, down_w, w, ids, E, pairs, 2.0, dropout_p=0.25)
        else:
            y = routed_lora_ffn(
                xx,
                gate_w,
                up_w,
                down_w,
                torch.nn.functional.silu,
                w,
                ids,
                E,
                pairs,
                2.0,
                dropout=lambda t: fast_dropout(t, 0.25),
            )
        return [y, *torch.autograd.grad((y * up.to(dt)).sum(), leaves)]

    fused, ref = run(True, dtype), run(False, dtype)
    if dtype == torch.float64:
        for a, b in zip(fused, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        return
    truth = run(False, torch.float64)
    for a, b, t in zip(fused, ref, truth, strict=True):
        err_fused = (a.double() - t).norm() / t.norm()
        err_ref = (b.double() - t).norm() / t.norm()
        assert err_fused < 2 * err_ref + 1e-3, (float(err_fused), float(err_ref))
        assert err_fused < 2e-2


def test_dropped_positions_are_independent_bernoulli(monkeypatch):
    """Dropout by geometric gaps: sorted in-range positions, each element dropped with
    probability p independently of its neighbour, deterministic under the seed, also when
    the gaps take more than one draw."""
    import upcycle.kernels.reference as R

    for p in (0.05, 0.5, 0.9):
        torch.manual_seed(1)
        pos = R.dropped_positions(200_000, p)
        assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all())
        assert 0 <= int(pos[0]) and int(pos[-1]) < 200_000
        assert abs(pos.numel() / 200_000 - p) < 5 * (p * (1 - p) / 200_000) ** 0.5
    torch.manual_seed(2)
    hits = torch.zeros(2000, 64)
    for i in range(2000):
        hits[i, R.dropped_positions(64, 0.2)] = 1
    assert float((hits.mean(0) - 0.2).abs().max()) < 0.05  # 5.5 sigma
    pairs = (hits[:, :-1] * hits[:, 1:]).mean()  # neighbours independent: p^2
    assert abs(float(pairs) - 0.04) < 0.006
    assert R.dropped_positions(0, 0.3).numel() == 0 and R.dropped_positions(9, 0.0).numel() == 0

    torch.manual_seed(3)
    once = R.dropped_positions(5000, 0.1)
    monkeypatch.setattr(R, "_gap_draws", lambda numel, p: 7)  # force many small draws
    torch.manual_seed(4)
    many = R.dropped_positions(5000, 0.1)
    assert bool((many[1:] > many[:-1]).all()) and int(many[-1]) < 5000
    assert abs(many.numel() - 500) < 5 * 450**0.5 and not torch.equal(once, many)
    torch.manual_seed(4)
    assert torch.equal(many, R.dropped_positions(5000, 0.1))


def test_fast_dropout_zeroes_and_scales_like_dropout():
    from upcycle.kernels.reference import dropped_positions, fast_dropout

    x = torch.randn(6, 50, dtype=torch.float64).t().requires_grad_()  # non-contiguous input
    torch.manual_seed(5)
    y = fast_dropout(x, 0.3)
    torch.manual_seed(5)
    keep = torch.ones(x.numel(), dtype=torch.float64)
    keep[dropped_positions(x.numel(), 0.3)] = 0.0
    keep = keep.view(50, 6)
    torch.testing.assert_close(y, x * keep / 0.7)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, keep / 0.7)
    assert fast_dropout(x, 0.3, training=False) is x
