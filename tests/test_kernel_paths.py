"""The CUDA-first paths (dense MixLoRA, grouped_mm experts with LoRA) against the references,
on CPU in fp64/fp32, and the dispatch rules that choose between implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

ROLE_DIMS = {"gate": ("H", "N"), "up": ("H", "N"), "down": ("N", "H")}


def _routing(T, E, K, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(T, E, generator=g, dtype=dtype).softmax(-1)
    weights, ids = probs.topk(K, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).requires_grad_(), ids


def _ffn(H, N, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype) * 0.3 for s in ((N, H), (N, H), (H, N))]


def _lora(roles, E, r, H, N, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    size = {"H": H, "N": N}
    out = {}
    for role in roles:
        fan_in, fan_out = (size[d] for d in ROLE_DIMS[role])
        a = torch.randn(E, r, fan_in, generator=g, dtype=dtype) * 0.3
        b = torch.randn(E, fan_out, r, generator=g, dtype=dtype) * 0.3
        out[role] = (a.requires_grad_(), b.requires_grad_())
    return out


def _naive_mixlora(x, gate_w, up_w, down_w, weights, ids, lora, s, keep_x=None, keep_h=None, p=0.0):
    """Per token and slot, with explicit keep masks: keep_x (T, H), keep_h (K, T, N)."""
    scale = 1.0 / (1.0 - p) if p > 0 else 1.0
    rows = []
    for t in range(x.shape[0]):
        xt = x[t]
        xd = xt * keep_x[t] * scale if keep_x is not None else xt
        y = torch.zeros_like(xt)
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            g, u = gate_w @ xt, up_w @ xt
            if "gate" in lora:
                g = g + s * (lora["gate"][1][e] @ (lora["gate"][0][e] @ xd))
            if "up" in lora:
                u = u + s * (lora["up"][1][e] @ (lora["up"][0][e] @ xd))
            h = F.silu(g) * u
            out = down_w @ h
            if "down" in lora:
                hd = h * keep_h[k, t] * scale if keep_h is not None else h
                out = out + s * (lora["down"][1][e] @ (lora["down"][0][e] @ hd))
            y = y + weights[t, k] * out
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("roles", [("gate", "up", "down"), ("down",), ("gate",), ("up", "down")])
def test_dense_mixlora_equals_the_reference_with_gradients(roles):
    from upcycle.kernels.mixlora_dense import routed_lora_swiglu_dense
    from upcycle.kernels.reference import routed_lora_ffn

    T, H, N, E, K, r = 13, 12, 16, 5, 2, 3
    x = torch.randn(T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_()
    gate_w, up_w, down_w = _ffn(H, N, 2)
    weights, ids = _routing(T, E, K, 3)
    lora = _lora(roles, E, r, H, N, 4)
    leaves = [x, weights, *(t for ab in lora.values() for t in ab)]
    got = routed_lora_swiglu_dense(
        x, gate_w, up_w, down_w, weights, ids, E, lora, 0.7, expert_scale=1.25
    )
    want = routed_lora_ffn(
        x, gate_w, up_w, down_w, F.silu, weights, ids, E, lora, 0.7, expert_scale=1.25
    )
    torch.testing.assert_close(got, want)
    dy = torch.randn_like(got)
    for a, b in zip(
        torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_dense_mixlora_dropout_uses_one_mask_per_token_and_per_slot(monkeypatch):
    """Gate/up LoRA inputs share one mask per token; down LoRA inputs get one per slot; the
    backward uses the forward's masks."""
    import upcycle.kernels.mixlora_dense as dense

    T, H, N, E, K, r, p = 9, 8, 12, 4, 2, 2, 0.3
    drawn = []
    real = dense._keep

    def record(shape, p, device):
        mask = real(shape, p, device)
        drawn.append(mask)
        return mask

    monkeypatch.setattr(dense, "_keep", record)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    gate_w, up_w, down_w = _ffn(H, N, 5)
    weights, ids = _routing(T, E, K, 6)
    lora = _lora(("gate", "up", "down"), E, r, H, N, 7)
    leaves = [x, weights, *(t for ab in lora.values() for t in ab)]
    got = dense.routed_lora_swiglu_dense(
        x, gate_w, up_w, down_w, weights, ids, E, lora, 0.5, dropout_p=p
    )
    keep_x, keep_h = drawn
    assert keep_x.shape == (T, H) and keep_h.shape == (K, T, N)
    assert 0 < int((~keep_h).sum()) < keep_h.numel()
    want = _naive_mixlora(x, gate_w, up_w, down_w, weights, ids, lora, 0.5, keep_x, keep_h, p)
    torch.testing.assert_close(got, want)
    dy = torch.randn_like(got)
    for a, b in zip(
        torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_dense_mixlora_fits_small_stacked_ranks_only():
    from upcycle.kernels.mixlora_dense import fits

    assert fits(8, 16, 1536) and fits(8, 16, 8192)
    assert not fits(64, 16, 1536)


def test_mixlora_layer_takes_the_dense_path_when_told_and_trains_the_same(monkeypatch):
    """A MixLoRA model on a tiny llama: UPCYCLE_MIXLORA=dense and =lean give the same loss and
    LoRA gradients (fp64)."""
    import upcycle.adapters as A
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    results = {}
    for path in ("lean", "dense"):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64)
        model = get_peft_model(base, A.MixLoraConfig(num_experts=4, top_k=2, r=2, lora_dropout=0))
        for name, param in model.named_parameters():
            if "mixlora_experts" in name and name.endswith("_B"):
                torch.nn.init.normal_(param, std=0.1)  # B starts at zero: make the deltas count
        monkeypatch.setenv("UPCYCLE_MIXLORA", path)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[path] = loss.detach(), grads
    (loss_l, grads_l), (loss_d, grads_d) = results["lean"], results["dense"]
    torch.testing.assert_close(loss_d, loss_l)
    assert grads_l.keys() == grads_d.keys() and any("mixlora_experts" in n for n in grads_l)
    for name in grads_l:
        torch.testing.assert_close(grads_d[name], grads_l[name], msg=name)


@pytest.mark.parametrize("roles", [("gate_up", "down"), ("down",), ()])
def test_grouped_experts_lora_equals_the_reference(roles):
    """grouped_mm runs on the CPU too (fp32 here), so the CUDA experts-lora path is checked
    against the per-expert reference; an expert without tokens and a sentinel id included."""
    from upcycle.kernels import grouped

    T, H, N, E, K, r = 11, 16, 8, 5, 2, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    gate_up_w = torch.randn(E, 2 * N, H, generator=g) * 0.3
    down_w = torch.randn(E, H, N, generator=g) * 0.3
    weights, ids = _routing(T, E - 1, K, 1, torch.float32)  # expert E-1 gets no token
    ids = ids.clone()
    ids[0, 1] = E  # an expert-parallel sentinel: contributes nothing
    dims = {"gate_up": (H, 2 * N), "down": (N, H)}
    lora = {
        role: (
            (torch.randn(E, r, dims[role][0], generator=g) * 0.3).requires_grad_(),
            (torch.randn(E, dims[role][1], r, generator=g) * 0.3).requires_grad_(),
        )
        for role in roles
    }
    leaves = [x, weights, *(t for ab in lora.values() for t in ab)]
    got = grouped.experts_lora(x, gate_up_w, down_w, F.silu, weights, ids, lora, 0.5)
    want = torch.zeros_like(got)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            if e >= E:
                continue
            gu = gate_up_w[e] @ x[t]
            if "gate_up" in lora:
                gu = gu + 0.5 * lora["gate_up"][1][e] @ (lora["gate_up"][0][e] @ x[t])
            h = F.silu(gu[:N]) * gu[N:]
            y = down_w[e] @ h
            if "down" in lora:
                y = y + 0.5 * lora["down"][1][e] @ (lora["down"][0][e] @ h)
            want[t] = want[t] + weights[t, k] * y
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(got)
    for a, b in zip(
        torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_device_routing_matches_the_host_sort():
    from upcycle.kernels.grouped import device_routing
    from upcycle.kernels.reference import sort_by_expert

    ids = torch.randint(0, 6, (40, 3), generator=torch.Generator().manual_seed(2))
    ids[ids == 4] = 5  # an expert without tokens
    order, tokens, offsets = device_routing(ids, 6)
    want_order, want_tokens, counts = sort_by_expert(ids, 6)
    assert torch.equal(order, want_order) and torch.equal(tokens, want_tokens)
    assert offsets.dtype == torch.int32
    assert offsets.tolist() == torch.tensor(counts).cumsum(0).tolist()


def test_dispatch_rules_on_cpu_and_their_overrides(monkeypatch):
    from upcycle.kernels import dispatch

    x = torch.zeros(8, 4)
    for name in ("UPCYCLE_EXPERTS", "UPCYCLE_MIXLORA", "UPCYCLE_TRITON"):
        monkeypatch.delenv(name, raising=False)
    assert dispatch.experts(x, plain_swiglu=True) == "sorted"
    assert dispatch.experts(x, plain_swiglu=False) == "sorted"
    assert dispatch.experts_lora(x, {}) == "sorted"  # grouped_mm path: CUDA only
    assert dispatch.mixlora(x, 8, 16, 1536) == "lean"
    monkeypatch.setenv("UPCYCLE_EXPERTS", "grouped_mm")
    assert dispatch.experts(x, plain_swiglu=True) == "grouped_mm"
    monkeypatch.setenv("UPCYCLE_EXPERTS", "triton")  # not available on CPU: the default
    assert dispatch.experts(x, plain_swiglu=True) == "sorted"
    monkeypatch.setenv("UPCYCLE_TRITON", "1")
    assert dispatch.experts(x, plain_swiglu=True) == "triton"
    monkeypatch.setenv("UPCYCLE_MIXLORA", "dense")
    assert dispatch.mixlora(x, 64, 16, 1536) == "dense"
    monkeypatch.setenv("UPCYCLE_MIXLORA", "fast")
    with pytest.raises(ValueError, match="UPCYCLE_MIXLORA='fast'"):
        dispatch.mixlora(x, 8, 16, 1536)


def test_dispatch_rules_for_cuda_inputs(monkeypatch):
    """The rules for CUDA inputs, on stand-ins (the rules read device, dtype and size only):
    Triton up to TRITON_MAX_TOKENS tokens where it applies, grouped_mm above; LoRA experts
    with dropout, or not SiLU, never on Triton."""
    from types import SimpleNamespace

    from upcycle.kernels import dispatch, grouped

    if grouped.supports(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16), {}) is False:
        pytest.skip("this torch has no grouped_mm")
    for name in ("UPCYCLE_EXPERTS", "UPCYCLE_MIXLORA", "UPCYCLE_TRITON"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dispatch, "TRITON_INSTALLED", True)

    def cuda(tokens, dtype=torch.bfloat16):
        return SimpleNamespace(is_cuda=True, shape=(tokens, 64), dtype=dtype)

    small, large = dispatch.TRITON_MAX_TOKENS, dispatch.TRITON_MAX_TOKENS + 1
    lora = {"gate_up": (torch.zeros(4, 8, 64), torch.zeros(4, 128, 8))}
    assert dispatch.triton_runs_on(cuda(1))
    assert dispatch.experts(cuda(small), plain_swiglu=True) == "triton"
    assert dispatch.experts(cuda(large), plain_swiglu=True) == "grouped_mm"
    assert dispatch.experts(cuda(small), plain_swiglu=False) == "grouped_mm"
    assert dispatch.experts_lora(cuda(small), lora, silu=True) == "triton"
    assert dispatch.experts_lora(cuda(large), lora, silu=True) == "triton"  # no dropout: any size
    assert dispatch.experts_lora(cuda(small), lora, silu=True, dropout_p=0.05) == "grouped_mm"
    assert dispatch.experts_lora(cuda(large, torch.float32), lora, silu=True) == "triton"
    assert dispatch.experts_lora(cuda(large, torch.float32), lora, silu=False) == "sorted"
    assert dispatch.experts_lora(cuda(small, torch.float32), lora, dropout_p=0.05) == "sorted"
    assert dispatch.mixlora(cuda(small), 8, 16, 1536) == "dense"
    assert dispatch.mixlora(cuda(small), 64, 16, 1536) == "lean"
    monkeypatch.setenv("UPCYCLE_EXPERTS", "sorted")
    assert dispatch.experts_lora(cuda(small), lora, silu=True) == "sorted"
    monkeypatch.setattr(dispatch, "TRITON_INSTALLED", False)
    monkeypatch.setenv("UPCYCLE_EXPERTS", "triton")  # cannot run: the rule's own choice
    assert not dispatch.triton_runs_on(cuda(1))
    assert dispatch.experts_lora(cuda(small), lora, silu=True) == "grouped_mm"


def test_mixlora_lean_path_takes_the_dispatch_triton_choice(monkeypatch):
    """The lean MixLoRA Function runs its segment products on Triton exactly where
    `dispatch.triton_runs_on` says so; it decides nothing itself."""
    from upcycle.kernels import dispatch, fused

    for name in ("UPCYCLE_MIXLORA", "UPCYCLE_TRITON"):
        monkeypatch.delenv(name, raising=False)
    seen = []
    monkeypatch.setattr(fused, "routed_lora_swiglu", lambda *a, **k: seen.append(k["triton"]))
    T, H, N, E, r = 6, 8, 16, 4, 2
    gate_w, up_w, down_w = _ffn(H, N, 0, torch.float32)
    weights, ids = _routing(T, E, 2, 1, torch.float32)
    lora = _lora(("gate", "up", "down"), E, r, H, N, 2, torch.float32)
    x = torch.randn(T, H)
    args = (x, gate_w, up_w, down_w, weights, ids, E, lora, 2.0)
    dispatch.routed_lora_swiglu(*args)
    monkeypatch.setenv("UPCYCLE_TRITON", "1")
    dispatch.routed_lora_swiglu(*args)
    assert seen == [False, True]


def test_experts_implementation_upcycle_on_grouped_mm_equals_eager(tmp_path, monkeypatch):
    """The grouped_mm choice of `experts_implementation="upcycle"` is transformers' own."""
    import upcycle.kernels  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, num_local_experts=4,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 7))
    out = {}
    for impl in ("eager", "upcycle"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=impl)
        monkeypatch.setenv("UPCYCLE_EXPERTS", "grouped_mm")
        with torch.no_grad():
            out[impl] = model(input_ids=ids).logits
    torch.testing.assert_close(out["upcycle"], out["eager"], rtol=1e-5, atol=1e-5)


def test_dense_mixlora_compiles_into_one_graph():
    """No host syncs or data-dependent Python in the dense path: torch.compile captures
    forward and backward with fullgraph=True (a graph break would raise)."""
    from upcycle.kernels.mixlora_dense import routed_lora_swiglu_dense

    T, H, N, E, K, r = 32, 16, 64, 4, 2, 4
    gate_w, up_w, down_w = _ffn(H, N, 0, torch.float32)
    weights, ids = _routing(T, E, K, 1, torch.float32)
    lora = _lora(("gate", "up", "down"), E, r, H, N, 2, torch.float32)
    x = torch.randn(T, H, requires_grad=True)

    def ffn(x, weights, ids):
        return routed_lora_swiglu_dense(x, gate_w, up_w, down_w, weights, ids, E, lora, 0.5)

    compiled = torch.compile(ffn, fullgraph=True)
    got = compiled(x, weights, ids)
    got.backward(torch.randn_like(got))
    torch.testing.assert_close(got, ffn(x, weights, ids), rtol=1e-4, atol=1e-4)
