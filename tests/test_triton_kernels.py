"""Triton MoE and LoRA-expert kernels (`upcycle.kernels.triton_moe` through `.ops`).

The kernels run on the CPU under TRITON_INTERPRET=1, which triton reads when its decorators run,
so the checks run in a child process (this file run as a script, `interpret`), where every
output and gradient is compared with the torch reference and with a plain per-token loop in
float64. A second child (`compile`) compiles every kernel for sm_90 without a GPU, which catches
what the interpreter accepts but the compiler rejects. Both children start together (2 cores).
The dispatch's fallback to the reference runs in this process (also without triton; the
kernel tests skip then).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from upcycle.kernels import ops
from upcycle.kernels.reference import routed_experts_lora

H, INTER, E, R = 40, 48, 4, 4  # H and I not powers of two, both cross block edges
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


# --- references --------------------------------------------------------------------------


def loop_experts(x, gate_up_w, down_w, index, weights, lora, scaling):
    """The MoE layer one token and one slot at a time (ids >= E contribute nothing)."""
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(down_w.shape[1])
        for k in range(index.shape[1]):
            e = int(index[t, k])
            if e >= gate_up_w.shape[0]:
                continue
            gu = gate_up_w[e] @ x[t]
            if "gate_up" in lora:
                a, b = lora["gate_up"]
                gu = gu + scaling * (b[e] @ (a[e] @ x[t]))
            g, u = gu.chunk(2)
            h = F.silu(g) * u
            out = down_w[e] @ h
            if "down" in lora:
                a, b = lora["down"]
                out = out + scaling * (b[e] @ (a[e] @ h))
            y = y + weights[t, k] * out
        rows.append(y)
    return torch.stack(rows)


def loop_segment_lora(xs, a, b, experts, scaling):
    """scaling * B_e A_e x for each row and its expert, one row at a time."""
    rows = zip(xs, experts.tolist(), strict=True)
    return torch.stack([scaling * (b[e] @ (a[e] @ row)) for row, e in rows])


def routing(tokens: int, top_k: int, seed: int, empty: int | None = 2):
    """Top-k ids (T, K) and renormalized weights; expert `empty` never gets a token."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, E, generator=gen)
    if empty is not None:
        logits[:, empty] = -torch.inf
    weights, index = torch.topk(logits.softmax(-1), top_k)
    return index, weights / weights.sum(-1, keepdim=True)


def make_experts(dtype, seed, lora_roles=("gate_up", "down")):
    """Random inputs at unit scale, cast to dtype (weights as leaves)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, fan_in=1):
        return (torch.randn(*shape, generator=gen) / fan_in**0.5).to(dtype)

    lora = {}
    if "gate_up" in lora_roles:
        lora["gate_up"] = (rand(E, R, H, fan_in=H), rand(E, 2 * INTER, R, fan_in=R))
    if "down" in lora_roles:
        lora["down"] = (rand(E, R, INTER, fan_in=INTER), rand(E, H, R, fan_in=R))
    return rand(E, 2 * INTER, H, fan_in=H), rand(E, H, INTER, fan_in=INTER), lora


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """|actual - expected| <= tol * max(1, max |expected|), elementwise."""
    err = (actual.double() - expected.double()).abs().max().item()
    bound = tol * max(1.0, expected.double().abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def outputs_and_grads(fn: Callable, leaves: dict[str, torch.Tensor], probe: torch.Tensor):
    """fn's output and the gradients of <output, probe> for the leaves that require grad."""
    y = fn()
    wanted = {k: v for k, v in leaves.items() if v.requires_grad}
    grads = torch.autograd.grad((y * probe.to(y.dtype)).sum(), list(wanted.values()))
    return y.detach(), dict(zip(wanted, grads, strict=True))


def run_experts(dtype, tokens, top_k, *, train_experts, lora_roles=(), seed=0, empty=2):
    """Triton vs reference vs float64 loop: outputs and every gradient."""
    index, weights = routing(tokens, top_k, seed, empty)
    gate_up_w, down_w, lora = make_experts(dtype, seed + 1, lora_roles)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    probe = torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed + 3))
    scaling = 0.5

    def leaves(cast):
        out = {
            "x": cast(x).requires_grad_(),
            "weights": cast(weights).requires_grad_(),
            "gate_up_w": cast(gate_up_w).requires_grad_(train_experts),
            "down_w": cast(down_w).requires_grad_(train_experts),
        }
        for role, (a, b) in lora.items():
            out[f"{role}_A"] = cast(a).requires_grad_()
            out[f"{role}_B"] = cast(b).requires_grad_()
        return out

    def call(fn, p, **kw):
        pairs = {role: (p[f"{role}_A"], p[f"{role}_B"]) for role in lora}
        args = (p["x"], p["gate_up_w"], p["down_w"], index, p["weights"], pairs, scaling)
        return lambda: fn(*args, **kw)

    tri = leaves(lambda t: t.clone())
    y, grads = outputs_and_grads(call(ops.experts_swiglu, tri, force_triton=True), tri, probe)
    ref = leaves(lambda t: t.clone())
    y_ref, g_ref = outputs_and_grads(call(ops.experts_swiglu, ref, force_triton=False), ref, probe)
    f64 = leaves(lambda t: t.double())
    y_loop, g_loop = outputs_and_grads(call(loop_experts, f64), f64, probe)
    assert y.dtype == dtype and set(grads) == set(g_loop)
    if not train_experts:
        assert tri["gate_up_w"].grad is None and tri["down_w"].grad is None
    tol = TOL[dtype]
    close(y, y_loop, tol, "output vs loop")
    close(y, y_ref, 2 * tol, "output vs reference")
    for name, g in grads.items():
        assert g.dtype == tri[name].dtype, name
        close(g, g_loop[name], tol, f"grad {name} vs loop")
        close(g, g_ref[name], 2 * tol, f"grad {name} vs reference")


# --- checks run under the interpreter (child process) ------------------------------------


def check_experts_fp32_top2_trainable():
    run_experts(torch.float32, 100, 2, train_experts=True)


def check_experts_fp16_top1_frozen():
    """Frozen experts: no dW is computed (no segment_outer launch at all without LoRA)."""
    from upcycle.kernels import triton_moe

    calls = []
    original = triton_moe.segment_outer
    triton_moe.segment_outer = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        run_experts(torch.float16, 100, 1, train_experts=False)
    finally:
        triton_moe.segment_outer = original
    assert not calls


def check_experts_bf16_top2_trainable():
    run_experts(torch.bfloat16, 50, 2, train_experts=True, seed=4)


def check_experts_lora_fp32_top2_frozen():
    run_experts(torch.float32, 100, 2, train_experts=False, lora_roles=("gate_up", "down"))


def check_experts_lora_fp16_top2_gate_up_only():
    run_experts(torch.float16, 50, 2, train_experts=True, lora_roles=("gate_up",), seed=7)


def check_experts_lora_down_only_top3_no_empty_expert():
    run_experts(torch.float32, 37, 3, train_experts=False, lora_roles=("down",), empty=None)


def check_experts_sentinel_ids_and_no_tokens():
    """Ids equal to E (expert-parallel sentinels) contribute nothing; zero tokens work."""
    index, weights = routing(30, 2, 3)
    index[::3, 1] = E
    gate_up_w, down_w, _ = make_experts(torch.float32, 4)
    x = torch.randn(30, H, requires_grad=True)
    y = ops.experts_swiglu(x, gate_up_w, down_w, index, weights, force_triton=True)
    (dx,) = torch.autograd.grad(y.sum(), x)  # stride-0 incoming gradient
    x64 = x.detach().double().requires_grad_()
    y64 = loop_experts(x64, gate_up_w.double(), down_w.double(), index, weights.double(), {}, 1)
    close(y.detach(), y64, TOL[torch.float32], "output")
    close(dx, torch.autograd.grad(y64.sum(), x64)[0], TOL[torch.float32], "grad x")
    empty = ops.experts_swiglu(x[:0], gate_up_w, down_w, index[:0], weights[:0], force_triton=True)
    assert empty.shape == (0, H)


def run_segment_lora(dtype, tokens, top_k, *, by_token: bool, fan_in, fan_out, seed):
    """Triton vs torch fallback vs float64 loop, outputs and grads of x, A, B."""
    gen = torch.Generator().manual_seed(seed)
    index, _ = routing(tokens, top_k, seed)
    order, offsets = ops.sort_routing(index, E)
    experts = index.reshape(-1)[order]
    rows = tokens if by_token else tokens * top_k
    x = torch.randn(rows, fan_in, generator=gen).to(dtype)
    a = (torch.randn(E, R, fan_in, generator=gen) / fan_in**0.5).to(dtype)
    b = (torch.randn(E, fan_out, R, generator=gen) / R**0.5).to(dtype)
    probe = torch.randn(tokens * top_k, fan_out, generator=gen)
    kw = dict(order=order, top_k=top_k) if by_token else {}

    def run(cast, fn):
        leaves = {"x": cast(x), "a": cast(a), "b": cast(b)}
        for t in leaves.values():
            t.requires_grad_()
        return outputs_and_grads(lambda: fn(leaves), leaves, probe)

    def lora(force):
        return lambda p: ops.segment_lora(
            p["x"], p["a"], p["b"], offsets, 0.5, force_triton=force, **kw
        )

    y, g = run(lambda t: t.clone(), lora(True))
    y_ref, g_ref = run(lambda t: t.clone(), lora(False))

    def loop(p):
        xs = p["x"][order // top_k] if by_token else p["x"]
        return loop_segment_lora(xs, p["a"], p["b"], experts, 0.5)

    y_loop, g_loop = run(lambda t: t.double(), loop)
    tol = TOL[dtype]
    close(y, y_loop, tol, "output vs loop")
    close(y, y_ref, 2 * tol, "output vs reference")
    for name in g:
        close(g[name], g_loop[name], tol, f"grad {name} vs loop")
        close(g[name], g_ref[name], 2 * tol, f"grad {name} vs reference")


def check_segment_lora_by_token_fp32_top2():
    run_segment_lora(torch.float32, 100, 2, by_token=True, fan_in=H, fan_out=INTER, seed=5)


def check_segment_lora_sorted_rows_fp16_top1():
    run_segment_lora(torch.float16, 100, 1, by_token=False, fan_in=INTER, fan_out=H, seed=6)


def check_opcheck_experts_swiglu():
    """Fake tensors and autograd registration of the custom op with LoRA; all of opcheck
    (schema, AOT dispatch as torch.compile runs it) without, to keep the interpreter brief."""
    index, weights = routing(4, 1, 8)
    gate_up_w, down_w, lora = make_experts(torch.float32, 9)
    leaves = [torch.randn(4, H), gate_up_w, down_w, weights, *lora["gate_up"], *lora["down"]]
    x, gate_up_w, down_w, weights, *factors = (t.requires_grad_() for t in leaves)
    op = torch.ops.upcycle.experts_swiglu.default
    args = (x, gate_up_w, down_w, index, weights, *factors, 0.5, True)
    torch.library.opcheck(op, args, test_utils=("test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(
        op, (x, gate_up_w, down_w, index, weights, None, None, None, None, 1.0, True)
    )


def check_opcheck_segment_lora():
    index, _ = routing(8, 2, 10)
    order, offsets = ops.sort_routing(index, E)
    x = torch.randn(8, H, requires_grad=True)
    a = torch.randn(E, R, H, requires_grad=True)
    b = torch.randn(E, INTER, R, requires_grad=True)
    torch.library.opcheck(torch.ops.upcycle.segment_lora.default, (x, a, b, offsets, order, 2, 0.5))


def check_torch_compile_fullgraph():
    """torch.compile traces the dispatch and the op without a graph break; same values."""
    index, weights = routing(8, 2, 14)
    gate_up_w, down_w, lora = make_experts(torch.float32, 15, ("gate_up",))
    x = torch.randn(8, H, requires_grad=True)

    def layer(x):
        y = ops.experts_swiglu(
            2 * x, gate_up_w, down_w, index, weights, lora, 0.5, force_triton=True
        )
        return y.square().sum()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    (dx,) = torch.autograd.grad(compiled(x), x)
    (dx_eager,) = torch.autograd.grad(layer(x), x)
    close(dx, dx_eager, TOL[torch.float32], "grad x")


class _triton_env:
    """UPCYCLE_TRITON=1 inside the block (the dispatch rule CUDA tensors meet), counting how
    often the Triton experts op runs."""

    def __enter__(self):
        self.calls = 0
        self.saved = os.environ.get("UPCYCLE_TRITON")
        os.environ["UPCYCLE_TRITON"] = "1"
        real = self.real = ops.experts_swiglu

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        ops.experts_swiglu = counted
        return self

    def __exit__(self, *exc):
        ops.experts_swiglu = self.real
        if self.saved is None:
            os.environ.pop("UPCYCLE_TRITON")
        else:
            os.environ["UPCYCLE_TRITON"] = self.saved


def _grads(module_fn, params, x, probe):
    y = module_fn(x)
    grads = torch.autograd.grad((y * probe).sum(), [x, *params])
    return y.detach(), grads


def check_upcycle_experts_implementation_runs_triton():
    """A transformers MoE with experts_implementation="upcycle" takes the Triton kernels where
    the dispatch says so, with the sorted Function's outputs and gradients."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from upcycle.kernels.dispatch import register

    register()
    cfg = MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E,
                        num_experts_per_tok=2)  # fmt: skip
    cfg._experts_implementation = "upcycle"
    torch.manual_seed(20)
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 9, H, requires_grad=True)
    probe = torch.randn(2, 9, H)
    params = [block.experts.gate_up_proj, block.experts.down_proj, block.gate.weight]
    with _triton_env() as env:
        y, grads = _grads(block, params, x, probe)
    assert env.calls == 1, env.calls
    y_ref, g_ref = _grads(block, params, x, probe)
    close(y, y_ref, TOL[torch.float32], "output")
    for name, g, r in zip(("x", "gate_up", "down", "router"), grads, g_ref, strict=True):
        close(g, r, TOL[torch.float32], f"grad {name}")


def check_experts_lora_layer_runs_triton_without_dropout():
    """LoRA experts (ExpertsLora) take the Triton kernels without dropout, the reference with."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from upcycle.adapters import MixLoraConfig
    from upcycle.adapters.layers import ExpertsLora

    cfg = MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E)
    torch.manual_seed(21)
    base = MixtralExperts(cfg)
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.2)
    layer = ExpertsLora(base, "default", MixLoraConfig(mode="experts", r=R, lora_dropout=0.0))
    with torch.no_grad():
        for p in layer.mixlora_experts.parameters():
            p.normal_(0, 0.2)
    index, weights = routing(11, 2, 22)
    x = torch.randn(11, H, requires_grad=True)
    probe = torch.randn(11, H)
    lora = list(layer.mixlora_experts.parameters())
    with _triton_env() as env:
        y, grads = _grads(lambda t: layer(t, index, weights), lora, x, probe)
    assert env.calls == 1, env.calls
    y_ref, g_ref = _grads(lambda t: layer(t, index, weights), lora, x, probe)
    close(y, y_ref, TOL[torch.float32], "output")
    for i, (g, r) in enumerate(zip(grads, g_ref, strict=True)):
        close(g, r, TOL[torch.float32], f"grad {i}")
    dropped = ExpertsLora(base, "default", MixLoraConfig(mode="experts", r=R, lora_dropout=0.1))
    dropped.train()
    with _triton_env() as env:
        dropped(x, index, weights)
    assert env.calls == 0, "dropout runs on the reference path"


def check_fused_segment_products_run_triton():
    """The fused MixLoRA FFN's per-expert products (`_seg_mm`, `_seg_outer`) on one grouped
    kernel each equal the per-segment torch loop, written in place, added, transposed or not."""
    from upcycle.kernels import fused

    counts = [5, 0, 7, 3]
    gen = torch.Generator().manual_seed(23)
    xs = torch.randn(sum(counts) + 2, H, generator=gen)  # 2 rows past the last segment
    w_t = torch.randn(E, INTER, H, generator=gen)
    w = torch.randn(E, H, INTER, generator=gen)
    out0 = torch.randn(xs.shape[0], INTER, generator=gen)
    b = torch.randn(xs.shape[0], INTER, generator=gen)
    results = {}
    for mode in ("triton", "loop"):
        segs = fused.Segments(counts, triton=mode == "triton")
        results[mode] = (
            fused._seg_mm(xs, segs, w_t, True)[: sum(counts)],
            fused._seg_mm(xs, segs, w, False)[: sum(counts)],
            fused._seg_mm(xs, segs, w_t, True, out=out0.clone(), add=True),
            fused._seg_outer(xs, b, segs),
        )
    for i, (got, want) in enumerate(zip(*results.values(), strict=True)):
        close(got, want, TOL[torch.float32], f"product {i}")


INTERPRETED = {
    name.removeprefix("check_"): fn for name, fn in globals().items() if name.startswith("check_")
}


# --- compiled for CUDA without a GPU (child process) -------------------------------------


def compile_for_sm90() -> dict[str, str | None]:
    """Compile each kernel (bf16, its first CUDA config, every optional path on) to a cubin."""
    import triton
    import triton.language as tl
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from upcycle.kernels import triton_moe as tm

    if "nvidia" not in backends:
        return {"kernels": "SKIP: triton has no nvidia backend"}
    index_types = {
        "offsets_ptr": "*i32",
        **dict.fromkeys(("scale_ptr", "weights_ptr", "part_ptr"), "*fp32"),
        **dict.fromkeys(
            ("tokens_ptr", "gather_ptr", "scatter_ptr", "gather_a_ptr", "gather_b_ptr"), "*i64"
        ),
    }

    def arg_type(name: str) -> str:
        """Pointers: bf16 data, fp32 scales, int indices; `alpha` fp32; other scalars i32."""
        if name.endswith("_ptr"):
            return index_types.get(name, "*bf16")
        return "fp32" if name == "alpha" else "i32"

    dot = dict(DOT=tl.bfloat16, PRECISION="ieee")
    flags = {
        tm._gate_up_kernel: dict(HAS_DELTA=True, SAVE_GU=True, BLOCK_E=8),
        tm._grouped_mm_kernel: dict(
            GATHER=True, SCATTER=True, SCALE=True, ACCUMULATE=True, BLOCK_E=8
        ),
        tm._swiglu_bwd_kernel: dict(HAS_EXTRA=True, STORE_H=True, BLOCK_E=8),
        tm._segment_outer_kernel: dict(GATHER_A=True, GATHER_B=True, SCALE=True),
    }
    results = {}
    for kernel, constexprs in flags.items():
        config = kernel.configs[0]
        constexprs = {**constexprs, **dot, **config.kwargs}
        fn = kernel.fn
        signature = {name: arg_type(name) for name in fn.arg_names}
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        try:
            source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            assert compiled.asm["cubin"]
            results[fn.__name__] = None
        except Exception:
            results[fn.__name__] = traceback.format_exc()
    return results


COMPILED_KERNELS = (
    "_gate_up_kernel",
    "_grouped_mm_kernel",
    "_swiglu_bwd_kernel",
    "_segment_outer_kernel",
)


# --- tests (parent process) --------------------------------------------------------------


@pytest.fixture(scope="module")
def children(tmp_path_factory) -> dict[str, dict[str, str | None]]:
    """Run both children at once; {mode: {check: None (passed) or the failure}}."""
    pytest.importorskip("triton")
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "UPCYCLE_TRITON")}
    envs = {
        "interpret": {**base, "TRITON_INTERPRET": "1"},
        "compile": {**base, "TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("triton_cache"))},
    }
    procs = {
        mode: subprocess.Popen(
            [sys.executable, __file__, mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode, env in envs.items()
    }
    results = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        lines = out.strip().splitlines()
        if proc.returncode or not lines:
            results[mode] = {"__crash__": f"exit {proc.returncode}\n{err[-6000:]}"}
        else:
            results[mode] = json.loads(lines[-1])
    return results


def _outcome(results: dict[str, str | None], name: str) -> None:
    assert "__crash__" not in results, results.get("__crash__")
    failure = results[name] if name in results else results.get("kernels", f"{name} not run")
    if failure and failure.startswith("SKIP"):
        pytest.skip(failure)
    assert failure is None, failure


@pytest.mark.parametrize("name", list(INTERPRETED))
def test_kernels_under_interpreter(children, name):
    """Each check: Triton (TRITON_INTERPRET=1) == reference == per-token loop, with grads."""
    _outcome(children["interpret"], name)


@pytest.mark.parametrize("name", COMPILED_KERNELS)
def test_kernel_compiles_for_sm90(children, name):
    """The compiler (not just the interpreter) accepts the kernel, for an H100/H200 target."""
    _outcome(children["compile"], name)


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    """On CPU without UPCYCLE_TRITON the dispatch keeps the Triton kernels out; the ops'
    torch fallbacks (force_triton=False) are the reference."""
    from upcycle.kernels import dispatch

    monkeypatch.delenv("UPCYCLE_TRITON", raising=False)
    monkeypatch.delenv("UPCYCLE_EXPERTS", raising=False)
    index, weights = routing(20, 2, 12)
    gate_up_w, down_w, lora = make_experts(torch.float32, 13)
    x = torch.randn(20, H)
    assert not dispatch.triton_runs_on(x)
    assert dispatch.experts_lora(x, lora, silu=True) == "sorted"
    y = ops.experts_swiglu(x, gate_up_w, down_w, index, weights, lora, 0.5, force_triton=False)
    expected = routed_experts_lora(x, gate_up_w, down_w, F.silu, weights, index, lora, 0.5)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    order, offsets = ops.sort_routing(index, E)
    a, b = lora["gate_up"]
    delta = ops.segment_lora(x, a, b, offsets, 0.5, order=order, top_k=2, force_triton=False)
    loop = loop_segment_lora(x[order // 2], a, b, index.reshape(-1)[order], 0.5)
    torch.testing.assert_close(delta, loop, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("UPCYCLE_TRITON", "1")
    assert dispatch.triton_runs_on(x)
    assert dispatch.experts_lora(x, lora, silu=True) == "triton"
    assert dispatch.experts_lora(x, lora, silu=True, dropout_p=0.1) == "sorted"


def test_sort_routing_offsets_and_sentinels():
    """offsets bound each expert's rows in `order`; sentinel ids (== E) sort after them."""
    index = torch.tensor([[1, 3], [E, 1], [0, E]])
    order, offsets = ops.sort_routing(index, E)
    assert offsets.tolist() == [0, 1, 3, 3, 4] and offsets.dtype == torch.int32
    assert index.reshape(-1)[order].tolist() == [0, 1, 1, 3, E, E]


if __name__ == "__main__":
    if sys.argv[1] == "interpret":
        report = {}
        for check_name, check in INTERPRETED.items():
            try:
                check()
                report[check_name] = None
            except Exception:
                report[check_name] = traceback.format_exc()
    else:
        report = compile_for_sm90()
    print(json.dumps(report))
