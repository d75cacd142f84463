"""Training on Gemma-2, Gemma-3 (text) and Phi-3: MixLoRA computes each family's FFN exactly
(its own activation; Phi-3's fused gate_up_proj), and `upcycle train` runs mixlora, lora and
full on them; lora runs merge into a dense model that equals the adapter."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import logits, save_tiny
from test_train import write_data

# Config overrides on top of conftest's TINY. Gemma-2: a low final soft-cap so that the
# capping shows in the logits, attention soft-capping and a sliding window shorter than the
# training blocks; Gemma-3: one sliding and one global layer; Phi-3: token ids inside the
# tiny vocabulary (its defaults are 32000).
FAMILIES = {
    "gemma2": dict(final_logit_softcapping=3.0, attn_logit_softcapping=20.0, sliding_window=8),
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
# the activation of each family's FFN, spelled out: the reference below does not ask the model
ACTIVATION = {
    "gemma2": lambda t: F.gelu(t, approximate="tanh"),
    "gemma3_text": lambda t: F.gelu(t, approximate="tanh"),
    "phi3": F.silu,
}
PATHS = ("fused", "reference")  # where upcycle.kernels.dispatch sends the MixLoRA FFN
TRAIN = ["--seq-len", "16", "--batch-size", "2", "--max-steps", "2", "-q"]
LORA = ["--r", "4", "--num-experts", "4"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> a tiny random checkpoint with a tokenizer, made once for the module."""
    root = tmp_path_factory.mktemp("families")
    return {
        f: save_tiny(str(root / f), f, tokenizer=True, **overrides)
        for f, overrides in FAMILIES.items()
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def _load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _mixlora(model, **overrides):
    import upcycle.adapters as adapters
    from peft import get_peft_model

    kwargs = dict(num_experts=4, top_k=2, r=4, lora_dropout=0.0, router_aux_loss_coef=0.0)
    return get_peft_model(model, adapters.MixLoraConfig(**{**kwargs, **overrides}))


def _ffns(model) -> list:
    from upcycle.adapters.layers import MixLoraFFN

    return [m for m in model.modules() if isinstance(m, MixLoraFFN)]


def _force(monkeypatch, path: str) -> None:
    """Send MixLoRA FFNs to the fused Functions (as dispatch does for plain linears) or to the
    reference."""
    from upcycle.kernels import dispatch

    if path == "reference":
        monkeypatch.setattr(dispatch, "mixlora_fused", lambda projections, slices: False)


def _ids(n: int = 2, length: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_mixlora_at_init_is_the_dense_model(bases, family, path, monkeypatch):
    """LoRA B starts at zero, so every expert is the dense FFN and the routing weights sum to
    one: the wrapped model's logits are the dense model's."""
    _force(monkeypatch, path)
    model = _load(bases[family])
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    peft = _mixlora(model)
    ffns = _ffns(peft)
    assert len(ffns) == model.config.num_hidden_layers
    for ffn in ffns:
        assert set(ffn.mixlora_experts["default"].roles) == {"gate", "up", "down"}
        assert ffn.uses_fused("default") == (path == "fused")
    with torch.no_grad():
        got = peft(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5


def test_phi3_adapters_target_its_fused_projections(bases):
    """On Phi-3, MixLoRA's experts sit on the halves of gate_up_proj with llama's per-role
    LoRA pairs, its attention LoRA on qkv_proj and o_proj."""
    peft = _mixlora(_load(bases["phi3"]))
    layer = peft.base_model.model.model.layers[0]
    experts = layer.mlp.mixlora_experts["default"]
    inter, hidden = layer.mlp.intermediate_size, layer.mlp.hidden_size
    assert layer.mlp.fused_gate_up and (inter, hidden) == (96, 64)
    assert experts.gate_B.shape == experts.up_B.shape == (4, inter, 4)
    assert experts.down_A.shape == (4, 4, inter)
    names = {n for n, _ in peft.named_parameters() if "layers.0." in n and "mixlora_" in n}
    assert any("self_attn.qkv_proj.mixlora_A" in n for n in names)
    assert any("self_attn.o_proj.mixlora_A" in n for n in names)


def test_fused_targets_names_the_model_s_own_linears():
    from upcycle.adapters.config import fused_targets

    default = "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj".split()
    phi3 = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert fused_targets(default, phi3) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert fused_targets(default, set(default)) == default
    assert fused_targets(["up_proj", "zz"], phi3) == ["gate_up_proj", "zz"]


def _naive_ffn(ffn, x: torch.Tensor, act) -> torch.Tensor:
    """MixLoRA's FFN token by token in plain torch: Mixtral routing (softmax, top-k,
    renormalized), expert e = base FFN with W + s B_e A_e on gate, up and down."""
    base, s = ffn.base_layer, ffn.settings["default"]
    if hasattr(base, "gate_up_proj"):
        gate_w, up_w = base.gate_up_proj.weight.chunk(2, dim=0)
    else:
        gate_w, up_w = base.gate_proj.weight, base.up_proj.weight
    w = {"gate": gate_w, "up": up_w, "down": base.down_proj.weight}
    experts = ffn.mixlora_experts["default"]
    probs = torch.softmax(x.float() @ ffn.mixlora_router["default"].weight.t(), dim=-1)
    top, ids = probs.topk(s["top_k"], dim=-1)
    top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(s["top_k"]):
            e = int(ids[t, k])
            we = {}
            for role, base_w in w.items():
                a, b = getattr(experts, f"{role}_A")[e], getattr(experts, f"{role}_B")[e]
                we[role] = base_w + s["scaling"] * b @ a
            h = act(we["gate"] @ x[t]) * (we["up"] @ x[t])
            out[t] += top[t, k] * (we["down"] @ h)
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_mixlora_forward_is_the_routed_lora_maths(bases, family, path, monkeypatch):
    """With random non-zero LoRA B, each MixLoRA FFN's output equals a token-by-token torch
    reference with the family's activation (and Phi-3's gate_up_proj split gate-first)."""
    _force(monkeypatch, path)
    torch.manual_seed(1)
    peft = _mixlora(_load(bases[family]))
    seen = []
    for ffn in _ffns(peft):
        experts = ffn.mixlora_experts["default"]
        with torch.no_grad():
            for role in experts.roles:
                getattr(experts, f"{role}_B").normal_(0.0, 0.3)
        ffn.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
    with torch.no_grad():
        peft(input_ids=_ids(length=9))
    assert len(seen) == len(_ffns(peft))
    for ffn, x, out in seen:
        h = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            want = _naive_ffn(ffn, h, ACTIVATION[family])
        got = out.reshape(h.shape)
        assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
        assert (want - ffn.base_layer(x).reshape(h.shape)).abs().max() > 1e-2  # LoRA shows


@pytest.mark.parametrize("roles", [("gate", "up", "down"), ("up", "down")])
@pytest.mark.parametrize("kernel", ["lean", "lean-recompute", "dense"])
def test_fused_functions_take_any_activation(kernel, roles):
    """The lean and dense MixLoRA Functions with Gemma's tanh GELU equal the reference, values
    and gradients (x, routing weights, every LoRA factor)."""
    from upcycle.kernels.fused import routed_lora_swiglu
    from upcycle.kernels.mixlora_dense import routed_lora_swiglu_dense
    from upcycle.kernels.reference import routed_lora_ffn

    def act(t):
        return F.gelu(t, approximate="tanh")

    g = torch.Generator().manual_seed(3)
    T, H, N, E, K, r = 11, 8, 12, 4, 2, 3

    def randn(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    x = randn(T, H, scale=1.0)
    gate_w, up_w, down_w = (randn(*s).detach() for s in ((N, H), (N, H), (H, N)))
    weights = torch.softmax(torch.randn(T, K, generator=g, dtype=torch.float64), -1)
    weights.requires_grad_()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    dims = {"gate": (H, N), "up": (H, N), "down": (N, H)}
    lora = {role: (randn(E, r, dims[role][0]), randn(E, dims[role][1], r)) for role in roles}
    args = (x, gate_w, up_w, down_w, weights, ids, E, lora, 0.7)
    if kernel == "dense":
        got = routed_lora_swiglu_dense(*args, expert_scale=1.25, act=act)
    else:
        recompute = kernel == "lean-recompute"
        got = routed_lora_swiglu(*args, expert_scale=1.25, recompute_base=recompute, act=act)
    want = routed_lora_ffn(
        x, gate_w, up_w, down_w, act, weights, ids, E, lora, 0.7, expert_scale=1.25
    )
    torch.testing.assert_close(got, want)
    leaves = [x, weights, *(t for pair in lora.values() for t in pair)]
    dy = torch.randn(got.shape, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_dispatch_hands_the_activation_to_the_fused_functions(monkeypatch):
    """SiLU (transformers' module or torch's) runs the Functions' own SiLU code (act None);
    another activation reaches them as given."""
    from transformers.activations import ACT2FN
    from upcycle.kernels import dispatch, fused

    monkeypatch.delenv("UPCYCLE_MIXLORA", raising=False)
    seen = []
    monkeypatch.setattr(fused, "routed_lora_swiglu", lambda *a, **k: seen.append(k["act"]))
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    lora = {"down": (torch.zeros(2, 1, 8), torch.zeros(2, 8, 1))}
    routing = (torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.long), 2, lora, 1.0)
    gelu = ACT2FN["gelu_pytorch_tanh"]
    for act in (ACT2FN["silu"], torch.nn.SiLU(), F.silu, gelu):
        dispatch.routed_lora_ffn(x, (w, w, w), act, *routing)
    assert seen == [None, None, None, gelu]


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train(cli, base, out, data, adapter, *extra):
    args = LORA if adapter in ("mixlora", "lora") else []
    r = cli("train", base, out, "--data", data, "--adapter", adapter, *TRAIN, *args, *extra)
    assert r.code == 0, r.err
    m = _metrics(out)
    steps = [e for e in m if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2]
    assert all(math.isfinite(e[k]) for e in steps for k in ("loss", "lm_loss", "grad_norm"))
    assert all(math.isfinite(e["eval_loss"]) for e in m if "eval_loss" in e)
    return m


@pytest.mark.parametrize("adapter", ["mixlora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_train_runs(tmp_path, cli, bases, data, family, adapter):
    """`upcycle train` with activation checkpointing (whole decoder layers for these
    families: their layers are not the plain pre-norm sequence)."""
    out = tmp_path / "run"
    _train(cli, bases[family], out, data, adapter, "--gradient-checkpointing", "--lr", "1e-2")
    record = json.loads((out / "upcycle_train.json").read_text())
    assert math.isfinite(record["final"]["eval_loss"])


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_run_merges_into_the_adapter_s_dense_model(tmp_path, cli, bases, data, family):
    import upcycle.adapters  # noqa: F401
    from peft import PeftModel

    base, out = bases[family], tmp_path / "run"
    _train(cli, base, out, data, "lora", "--lr", "1e-2")
    targets = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    if family == "phi3":
        assert targets == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    else:
        assert targets == {f"{p}_proj" for p in ("q", "k", "v", "o", "gate", "up", "down")}
    model = PeftModel.from_pretrained(_load(base), str(out)).eval()
    ids = _ids(seed=5)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    r = cli("merge", out, tmp_path / "merged", "-q")
    assert r.code == 0, r.err
    got, dense = logits(str(tmp_path / "merged"), ids), logits(base, ids)
    scale = float(want.abs().max())
    assert (got - want).abs().max() <= 1e-4 * scale
    assert (dense - want).abs().max() > 1e-3 * scale  # the trained LoRA shows in the logits


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_checkpointing_keep_the_family_s_layers_and_head(bases, family):
    """The run's token loss is transformers' own loss (Gemma-2's soft-capped logits, Gemma's
    scaled embeddings: no chunked head for these families), and activation checkpointing
    (whole layers, sandwich norms included) gives the gradients of the plain run."""
    from upcycle.adapters.checkpointing import checkpoint_attention_only

    from upcycle.train.components import enable_checkpointing, token_loss_sum
    from upcycle.train.loss import chunked_head

    ids = _ids(length=12, seed=7)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(2)
        model = _mixlora(_load(bases[family]))
        for ffn in _ffns(model):
            with torch.no_grad():
                ffn.mixlora_experts["default"].down_B.normal_(0.0, 0.3)
        assert chunked_head(model) is None
        model.train()
        if checkpointed:
            enable_checkpointing(model)
            assert checkpoint_attention_only(model) == 0
        loss, _ = token_loss_sum(model, batch)
        with torch.no_grad():
            own = model(**batch).loss * (ids.shape[0] * (ids.shape[1] - 1))
        assert torch.allclose(loss, own, rtol=1e-5)
        loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert grads[0] and all(g is not None for g in grads[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
