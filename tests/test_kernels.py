"""upcycle.kernels: the "upcycle" experts implementation registered with transformers."""

from __future__ import annotations

import pytest
import torch
import upcycle.kernels  # noqa: F401  (registers experts_implementation="upcycle")
from conftest import save_tiny


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_upcycle_experts_equal_eager_outputs_and_gradients(tmp_path, monkeypatch, family):
    """Stock MoE models loaded with experts_implementation="upcycle" give eager's logits and
    gradients (fp32), also with an expert that gets no token."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.moe import ExpertsInterface
    from upcycle.kernels.dispatch import experts_forward

    calls = []

    def counted(*args):
        calls.append(1)
        return experts_forward(*args)

    path = save_tiny(str(tmp_path / family), family)
    assert ExpertsInterface._global_mapping["upcycle"] is experts_forward
    monkeypatch.setitem(ExpertsInterface._global_mapping, "upcycle", counted)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    results = []
    for impl in ("eager", "upcycle"):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, experts_implementation=impl
        )
        assert model.config._experts_implementation == impl
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        one = model(input_ids=ids[:1, :1]).logits  # one token: most experts get nothing
        results.append((logits.detach(), grads, one.detach()))
    assert calls  # the "upcycle" runs went through it
    (a_logits, a_grads, a_one), (b_logits, b_grads, b_one) = results
    torch.testing.assert_close(b_logits, a_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_one, a_one, rtol=1e-5, atol=1e-5)
    assert len(a_grads) == len(b_grads)
    for a, b in zip(a_grads, b_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def _naive_experts(x, weights, ids, w1, w2, lora, scaling, mask_x=None, mask_h=None, p=0.0):
    """Per (token, slot) reference for SortedSwiGLU with LoRA folded as W + s B A.

    mask_x (T, H) and mask_h (valid rows in expert-sorted order, I) are 0/1 dropout masks of
    the LoRA inputs; ids >= E (expert-parallel sentinels) contribute nothing.
    """
    import torch.nn.functional as F
    from upcycle.kernels.reference import sort_by_expert

    E, inter = w1.shape[0], w2.shape[2]
    order, tokens, _ = sort_by_expert(ids.clamp(max=E), E + 1)
    out = [torch.zeros_like(x[0]) for _ in range(x.shape[0])]
    keep = 1.0 / (1.0 - p)
    for i, (flat, t) in enumerate(zip(order.tolist(), tokens.tolist(), strict=True)):
        e = int(ids.reshape(-1)[flat])
        if e >= E:
            continue
        xd = x[t] if mask_x is None else x[t] * mask_x[t] * keep
        gu = w1[e] @ x[t]
        if "gate_up" in lora:
            a, b = lora["gate_up"]
            gu = gu + scaling * (b[e] @ (a[e] @ xd))
        h = F.silu(gu[:inter]) * gu[inter:]
        y = w2[e] @ h
        if "down" in lora:
            a, b = lora["down"]
            hd = h if mask_h is None else h * mask_h[i] * keep
            y = y + scaling * (b[e] @ (a[e] @ hd))
        out[t] = out[t] + weights.reshape(-1)[flat] * y
    return torch.stack(out)


def _problem(dtype, roles, trainable, seed=0, T=9, H=12, inter=10, E=5, r=3):
    """Random inputs for SortedSwiGLU: one expert gets no token, some slots are sentinels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    weights = torch.rand(T, 2, generator=g, dtype=torch.float64)
    ids = torch.randint(0, E - 1, (T, 2), generator=g)  # expert E-1 gets nothing
    ids[:, 1] = (ids[:, 0] + 1) % (E - 1)
    ids[0, 1] = E  # sentinel
    w1 = torch.randn(E, 2 * inter, H, generator=g, dtype=torch.float64) * 0.3
    w2 = torch.randn(E, H, inter, generator=g, dtype=torch.float64) * 0.3
    dims = {"gate_up": (H, 2 * inter), "down": (inter, H)}
    lora = {
        role: (
            torch.randn(E, r, dims[role][0], generator=g, dtype=torch.float64) * 0.3,
            torch.randn(E, dims[role][1], r, generator=g, dtype=torch.float64) * 0.3,
        )
        for role in roles
    }
    leaves = [
        x,
        weights,
        *([w1, w2] if trainable else []),
        *[t for ab in lora.values() for t in ab],
    ]
    for t in leaves:
        t.requires_grad_()
    cast = {
        id(t): t.detach().to(dtype).requires_grad_(t.requires_grad) for t in (x, weights, w1, w2)
    }
    for ab in lora.values():
        for t in ab:
            cast[id(t)] = t.detach().to(dtype).requires_grad_()
    return (x, weights, ids, w1, w2, lora, leaves), cast


@pytest.mark.parametrize("roles", [(), ("gate_up",), ("down",), ("gate_up", "down")])
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("block_elems", [1 << 21, 25])
def test_sorted_swiglu_matches_per_token_experts(monkeypatch, roles, trainable, block_elems):
    """Outputs and gradients (x, routing weights, LoRA factors, expert weights only when
    trainable) equal a per-token computation; empty experts and sentinel slots included.
    A tiny element-wise block size makes every expert its own group, cut in several blocks
    (the layout of large batches); the default puts all these experts in one group."""
    import upcycle.kernels.experts as experts
    from upcycle.kernels.experts import sorted_swiglu_experts

    monkeypatch.setattr(experts, "_BLOCK_ELEMS", block_elems)
    (x, weights, ids, w1, w2, lora, leaves), _ = _problem(torch.float64, roles, trainable)
    y = sorted_swiglu_experts(x, weights, ids, w1, w2, lora, 0.7)
    want = _naive_experts(x, weights, ids, w1, w2, lora, 0.7)
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    ref = torch.autograd.grad(want, leaves, dy)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    if trainable:
        assert got[2][-1].abs().sum() == 0  # expert E-1 got no token: zero gradient


def test_sorted_swiglu_frozen_weights_get_no_gradient_and_inference_path():
    """Frozen expert weights take no gradient; without grad the result is the same."""
    from upcycle.kernels.experts import sorted_swiglu_experts

    (x, weights, ids, w1, w2, lora, _), _ = _problem(torch.float64, ("gate_up",), False)
    y = sorted_swiglu_experts(x, weights, ids, w1, w2, lora, 0.5)
    y.sum().backward()
    assert w1.grad is None and w2.grad is None and x.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(sorted_swiglu_experts(x, weights, ids, w1, w2, lora, 0.5), y)


@pytest.mark.parametrize("block_elems", [1 << 21, 25])
def test_sorted_swiglu_dropout_matches_masked_reference(monkeypatch, block_elems):
    """LoRA-input dropout: one mask per token for x, one per sorted row for the activation,
    drawn in that order; outputs and gradients equal the masked per-token computation."""
    import upcycle.kernels.experts as experts
    from upcycle.kernels.experts import sorted_swiglu_experts
    from upcycle.kernels.reference import dropped_positions

    monkeypatch.setattr(experts, "_BLOCK_ELEMS", block_elems)
    p = 0.3
    (x, weights, ids, w1, w2, lora, leaves), _ = _problem(torch.float64, ("gate_up", "down"), False)
    torch.manual_seed(5)
    y = sorted_swiglu_experts(x, weights, ids, w1, w2, lora, 0.7, dropout_p=p)
    torch.manual_seed(5)
    valid = int((ids < w1.shape[0]).sum())
    mask_x = torch.ones(x.numel(), dtype=x.dtype)
    mask_x[dropped_positions(x.numel(), p)] = 0
    mask_h = torch.ones(valid * w2.shape[2], dtype=x.dtype)
    mask_h[dropped_positions(mask_h.numel(), p)] = 0
    assert 0 < int((mask_h == 0).sum()) < mask_h.numel()
    want = _naive_experts(
        x, weights, ids, w1, w2, lora, 0.7, mask_x.view(x.shape), mask_h.view(valid, -1), p
    )
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(y, leaves, dy), torch.autograd.grad(want, leaves, dy), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_sorted_swiglu_bf16_close_to_fp64_and_keeps_dtypes():
    """bf16 inputs: results and gradients as close to fp64 as the same arithmetic written
    plainly in bf16 gets (2x its error, or 2e-2 / 3e-2), every gradient in its parameter's
    dtype. CPUs without bf16 matrix units compute in fp32; the others round in bf16 between
    products, as a plain bf16 model does."""
    from upcycle.kernels.experts import sorted_swiglu_experts

    (x, weights, ids, w1, w2, lora, leaves), cast = _problem(
        torch.bfloat16, ("gate_up", "down"), True
    )
    want = _naive_experts(x, weights, ids, w1, w2, lora, 0.7)
    lora16 = {k: (cast[id(a)], cast[id(b)]) for k, (a, b) in lora.items()}
    args16 = [cast[id(t)] for t in (x, weights)], ids, cast[id(w1)], cast[id(w2)]
    (x16, w16), _, w1_16, w2_16 = args16
    y = sorted_swiglu_experts(x16, w16, ids, w1_16, w2_16, lora16, 0.7)
    plain = _naive_experts(x16, w16, ids, w1_16, w2_16, lora16, 0.7)
    assert y.dtype == torch.bfloat16

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(y, want) <= max(2 * err(plain, want), 2e-2)
    dy = torch.randn_like(want)
    leaves16 = [cast[id(t)] for t in leaves]
    got = torch.autograd.grad(y, leaves16, dy.to(torch.bfloat16))
    plain_grads = torch.autograd.grad(plain, leaves16, dy.to(torch.bfloat16))
    ref = torch.autograd.grad(want, leaves, dy)
    for a, p, b, leaf in zip(got, plain_grads, ref, leaves16, strict=True):
        assert a.dtype == leaf.dtype
        assert err(a, b) <= max(2 * err(p, b), 3e-2), (err(a, b), err(p, b))


def test_routed_experts_lora_other_activation_uses_autograd_path():
    """A non-SiLU activation runs the autograd loop, with the same result as per token."""
    import torch.nn.functional as F
    from upcycle.kernels.reference import routed_experts_lora

    (x, weights, ids, w1, w2, lora, _), _ = _problem(torch.float64, ("gate_up", "down"), False)
    ids = ids.clamp(max=w1.shape[0] - 1)  # the autograd loop has no sentinel slots
    y = routed_experts_lora(x, w1, w2, F.gelu, weights, ids, lora, 0.7)
    inter = w2.shape[2]
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(2):
            e = int(ids[t, k])
            gu = (w1[e] + 0.7 * lora["gate_up"][1][e] @ lora["gate_up"][0][e]) @ x[t]
            h = F.gelu(gu[:inter]) * gu[inter:]
            ref[t] += weights[t, k] * (w2[e] + 0.7 * lora["down"][1][e] @ lora["down"][0][e]) @ h
    torch.testing.assert_close(y, ref)


def test_upcycle_experts_other_gates_use_autograd_path():
    """Experts the fused Function does not cover (here GELU instead of SiLU) run the autograd
    path and still equal eager, gradients included."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from upcycle.kernels.experts import is_plain_swiglu

    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=16, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2,
        hidden_act="gelu",
    )  # fmt: skip
    outs = []
    for impl in ("eager", "upcycle"):
        cfg._experts_implementation = impl
        torch.manual_seed(0)
        block = MixtralSparseMoeBlock(cfg)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.3)
        assert not is_plain_swiglu(block.experts)
        x = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = block(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad, block.experts.gate_up_proj.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a)
