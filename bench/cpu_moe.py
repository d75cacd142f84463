"""Kernels benchmark (issue 5): LoRA-expert training step and MoE block forward+backward, CPU.

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/cpu_moe.py [--threads 2] [--reps 5] [--dtypes float32,bfloat16]
                                      [--tokens 4096,128] [--lora-tokens 4096]
                                      [--out bench/results/kernels.json]

Shapes: a MixtralSparseMoeBlock with H=576, INTER=1536, E=8, top-2 (random weights, seeded),
input (1, tokens, H); every step is forward plus backward of a fixed random output gradient,
with the input requiring grad, and gradients dropped (set to None) after each step as an
optimizer's `zero_grad()` does.

1. LoRA-expert training step (r=16, alpha 32, LoRA on every expert's gate_up and down
   projections, expert weights and router frozen), at --lora-tokens:
   - frozen: the stock block (transformers' default experts implementation, grouped_mm),
     no LoRA: the floor any LoRA step sits on;
   - peft: peft's `LoraConfig(target_parameters=[experts.gate_up_proj, experts.down_proj])`
     on the stock block (it folds W + s B A into the weights every forward);
   - ours: the block's experts wrapped by `--adapter experts-lora`'s layer (`ExpertsLora`,
     which runs `upcycle.kernels.reference.routed_experts_lora`).
2. MoE block forward+backward with trainable expert weights and with frozen ones, at each of
   --tokens: `experts_implementation` "upcycle" vs transformers' "grouped_mm" (the default)
   and "eager". The "gemm floor" row times only the matrix products a sorted implementation
   must do for the same routing (one per expert and projection, into preallocated outputs):
   what is left above it is each implementation's own overhead.

Before timing, the script checks in fp32 (at 256 tokens) that the variants compute the same
outputs and gradients, so the timings compare equal work. Timed variants run interleaved, one
step each per round in rotating order, after one warm-up round; tables give medians of the
rounds (wall clock), the JSON keeps every round's wall and CPU time. Output: markdown tables
and PASS/FAIL lines on stdout, JSON at --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
H, INTER, E, K, R, ALPHA = 576, 1536, 8, 2, 16, 32
CHECK_TOKENS = 256
IMPLS = ("upcycle", "grouped_mm", "eager")
TARGETS = {"lora": 1.2, "block": {4096: 1.3, 128: 2.0}}


def make_block(impl: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A MixtralSparseMoeBlock at the benchmark shapes, N(0, 0.02) weights from `seed`."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=H, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=K
    )
    config._experts_implementation = impl
    gen = torch.Generator().manual_seed(seed)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return block.to(dtype)


def peft_block(base: torch.nn.Module) -> torch.nn.Module:
    """peft LoRA (target_parameters) on a copy of a stock block; only LoRA trains."""
    from peft import LoraConfig, inject_adapter_in_model

    block = copy.deepcopy(base).requires_grad_(False)
    config = LoraConfig(
        target_parameters=["experts.gate_up_proj", "experts.down_proj"], r=R, lora_alpha=ALPHA
    )
    return inject_adapter_in_model(config, block)


def ours_block(base: torch.nn.Module) -> torch.nn.Module:
    """`--adapter experts-lora`'s layer on a copy of a stock block; only LoRA trains."""
    from upcycle.adapters.config import MixLoraConfig
    from upcycle.adapters.layers import ExpertsLora

    block = copy.deepcopy(base).requires_grad_(False)
    config = MixLoraConfig(
        mode="experts",
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=["gate_proj", "up_proj", "down_proj"],
    )
    block.experts = ExpertsLora(block.experts, "default", config)
    return block


def lora_stacks(block: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """The LoRA factors (or, with `grads`, their gradients) of a peft or ours block as
    (E, r, in) A and (E, out, r) B stacks.

    peft keeps A as (E*r, in) with expert-major rows and B as (out, r*E) with expert-minor
    columns (its `get_delta_weight`); ours keeps the stacks directly. The results are views of
    the parameters (or gradients).
    """
    if hasattr(block.experts, "mixlora_experts"):
        ex = block.experts.mixlora_experts["default"]
        names = ("gate_up_A", "gate_up_B", "down_A", "down_B")
        return {n: getattr(ex, n).grad if grads else getattr(ex, n) for n in names}
    out = {}
    for role, layer in (("gate_up", block.experts.base_layer), ("down", block.experts)):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a, b = (a.grad, b.grad) if grads else (a, b)
        out[f"{role}_A"] = a.view(E, R, a.shape[1])
        out[f"{role}_B"] = b.view(b.shape[0], R, E).permute(2, 0, 1)
    return out


def step_fn(block: torch.nn.Module, x0: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of `block` on a fresh leaf copy of x0; gradients dropped."""

    def run() -> None:
        x = x0.clone().requires_grad_()
        block(x).backward(grad)
        for p in block.parameters():
            p.grad = None

    return run


def gemm_floor_fn(block: torch.nn.Module, x0: torch.Tensor, trainable: bool) -> Callable[[], None]:
    """Only the per-expert matrix products of a forward + backward for x0's routing, in the
    order the data flow allows (every expert's forward products, then every expert's backward
    products), on random inputs into preallocated outputs: the work every sorted
    implementation must do, without the cost of fresh memory or anything element-wise."""
    from upcycle.kernels.experts import compute_dtype
    from upcycle.kernels.reference import sort_by_expert

    x = x0.reshape(-1, H)
    with torch.no_grad():
        _, _, ids = block.gate(x)
    counts = [n for n in sort_by_expert(ids, E)[2] if n]
    cd = compute_dtype(x)
    w1 = [w.to(cd) for w in block.experts.gate_up_proj.detach()]
    w2 = [w.to(cd) for w in block.experts.down_proj.detach()]
    dims = (H, INTER, 2 * INTER)
    rows = {n: [torch.randn(c, n, dtype=cd) for c in counts] for n in dims}
    outs = {n: [torch.empty(c, n, dtype=cd) for c in counts] for n in dims}
    dw1, dw2 = torch.empty(E, 2 * INTER, H, dtype=cd), torch.empty(E, H, INTER, dtype=cd)

    def run() -> None:
        for e in range(len(counts)):  # forward: gate/up, then down
            torch.mm(rows[H][e], w1[e].t(), out=outs[2 * INTER][e])
            torch.mm(rows[INTER][e], w2[e].t(), out=outs[H][e])
        for e in range(len(counts)):  # backward: through down, then through gate/up
            torch.mm(rows[H][e], w2[e], out=outs[INTER][e])
            torch.mm(rows[2 * INTER][e], w1[e], out=outs[H][e])
            if trainable:
                torch.mm(rows[H][e].t(), rows[INTER][e], out=dw2[e])
                torch.mm(rows[2 * INTER][e].t(), rows[H][e], out=dw1[e])

    return run


def timed(variants: dict[str, Callable[[], None]], reps: int) -> dict[str, dict]:
    """Interleaved timing: a warm-up round, then `reps` rounds of one call per variant, in
    an order rotated every round. Per variant: median and min wall ms, all wall/CPU ms."""
    names = list(variants)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps + 1):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            variants[n]()
            t1, c1 = time.perf_counter(), time.process_time()
            if r:
                wall[n].append((t1 - t0) * 1e3)
                cpu[n].append((c1 - c0) * 1e3)
    return {
        n: {
            "median_ms": statistics.median(wall[n]),
            "min_ms": min(wall[n]),
            "wall_ms": wall[n],
            "cpu_ms": cpu[n],
        }
        for n in names
    }


def _close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-4) -> dict:
    """Max abs difference relative to want's max abs; raises past rtol."""
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item() or 1.0
    if err > rtol * scale:
        sys.exit(f"check FAILED: {name}: max abs diff {err:.3g} vs max abs {scale:.3g}")
    return {"max_abs_diff": err, "max_abs": scale}


def run_step(block, x0, grad) -> tuple[torch.Tensor, torch.Tensor]:
    x = x0.clone().requires_grad_()
    y = block(x)
    y.backward(grad)
    return y.detach(), x.grad


def check_equal_work() -> dict:
    """fp32, CHECK_TOKENS tokens: the timed variants compute the same outputs and gradients."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, CHECK_TOKENS, H, generator=gen)
    grad = torch.randn(1, CHECK_TOKENS, H, generator=gen)
    report = {}
    # MoE block: upcycle vs grouped_mm and eager, trainable weights (router included)
    runs = {}
    for impl in IMPLS:
        block = make_block(impl, torch.float32)
        y, dx = run_step(block, x0, grad)
        runs[impl] = (y, dx, {n: p.grad for n, p in block.named_parameters()})
    y, dx, grads = runs["upcycle"]
    for impl in ("grouped_mm", "eager"):
        y2, dx2, grads2 = runs[impl]
        report[f"block upcycle vs {impl}: output"] = _close(impl, y, y2)
        report[f"block upcycle vs {impl}: input grad"] = _close(impl, dx, dx2)
        for n in grads:
            report[f"block upcycle vs {impl}: {n} grad"] = _close(n, grads[n], grads2[n])
    # LoRA step: ours vs peft with the same non-zero LoRA factors
    base = make_block("grouped_mm", torch.float32)
    ours, theirs = ours_block(base), peft_block(base)
    with torch.no_grad():
        for name, t in lora_stacks(theirs).items():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
            lora_stacks(ours)[name].copy_(t)
    y, dx = run_step(ours, x0, grad)
    y2, dx2 = run_step(theirs, x0, grad)
    report["lora ours vs peft: output"] = _close("lora output", y, y2)
    report["lora ours vs peft: input grad"] = _close("lora input grad", dx, dx2)
    g1, g2 = lora_stacks(ours, grads=True), lora_stacks(theirs, grads=True)
    for name in g1:
        report[f"lora ours vs peft: {name} grad"] = _close(name, g1[name], g2[name])
    return report


def bench_lora(dtype: torch.dtype, tokens: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, tokens, H, generator=gen).to(dtype)
    grad = torch.randn(1, tokens, H, generator=gen).to(dtype)
    frozen = make_block("grouped_mm", dtype).requires_grad_(False)
    variants = {
        "frozen base (grouped_mm)": step_fn(frozen, x0, grad),
        "peft target_parameters": step_fn(peft_block(frozen), x0, grad),
        "ours (experts-lora)": step_fn(ours_block(frozen), x0, grad),
    }
    return timed(variants, reps)


def bench_block(dtype: torch.dtype, tokens: int, trainable: bool, reps: int) -> dict:
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, tokens, H, generator=gen).to(dtype)
    grad = torch.randn(1, tokens, H, generator=gen).to(dtype)
    blocks = {impl: make_block(impl, dtype) for impl in IMPLS}
    for block in blocks.values():
        block.experts.requires_grad_(trainable)
        block.gate.requires_grad_(False)
    variants = {impl: step_fn(block, x0, grad) for impl, block in blocks.items()}
    variants["gemm floor"] = gemm_floor_fn(blocks["upcycle"], x0, trainable)
    return timed(variants, reps)


def git_rev() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "kernels", "bench", "adapters"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return out.stdout.strip() + (" + uncommitted changes" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", default="4096,128", help="token counts for the block rows")
    ap.add_argument("--lora-tokens", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernels.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import upcycle.kernels  # noqa: F401  (registers experts_implementation="upcycle")

    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    started = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "git": git_rev(),
        "threads": args.threads,
        "reps": args.reps,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "shapes": dict(H=H, INTER=INTER, E=E, top_k=K, r=R, lora_alpha=ALPHA),
    }
    print(f"checks (fp32, {CHECK_TOKENS} tokens) ...", flush=True)
    checks = check_equal_work()
    print(f"  {len(checks)} outputs/gradients equal within 2e-4 of their max abs value")
    results, lines, verdicts = [], [], []
    lines.append("| case | dtype | tokens | variant | median ms | min ms | ratio |")
    lines.append("|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")
        print(f"LoRA step, {dname}, {args.lora_tokens} tokens ...", flush=True)
        res = bench_lora(dtype, args.lora_tokens, args.reps)
        floor = res["frozen base (grouped_mm)"]["median_ms"]
        for name, r in res.items():
            ratio = r["median_ms"] / floor
            results.append(dict(case="lora step", dtype=dname, tokens=args.lora_tokens,
                                variant=name, ratio_to_frozen=ratio, **r))  # fmt: skip
            lines.append(
                f"| LoRA step | {dname} | {args.lora_tokens} | {name} | {r['median_ms']:.0f} "
                f"| {r['min_ms']:.0f} | {ratio:.2f}x frozen |"
            )
        ours = res["ours (experts-lora)"]["median_ms"] / floor
        peft = res["peft target_parameters"]["median_ms"] / floor
        verdicts.append(
            f"{'PASS' if ours <= TARGETS['lora'] else 'FAIL'}: LoRA step {dname}: ours "
            f"{ours:.2f}x the frozen-base step (target <= {TARGETS['lora']}x; peft {peft:.2f}x)"
        )
        for t in tokens:
            for trainable in (True, False):
                mode = "trainable" if trainable else "frozen"
                print(f"MoE block, {dname}, {t} tokens, {mode} experts ...", flush=True)
                res = bench_block(dtype, t, trainable, args.reps)
                ours_ms = res["upcycle"]["median_ms"]
                for name, r in res.items():
                    speedup = r["median_ms"] / ours_ms
                    results.append(dict(case=f"block {mode}", dtype=dname, tokens=t,
                                        variant=name, time_over_upcycle=speedup, **r))  # fmt: skip
                    lines.append(
                        f"| block fwd+bwd, {mode} experts | {dname} | {t} | {name} "
                        f"| {r['median_ms']:.0f} | {r['min_ms']:.0f} | {speedup:.2f}x upcycle |"
                    )
                target = TARGETS["block"].get(t)
                if target is not None:
                    gain = res["grouped_mm"]["median_ms"] / ours_ms
                    verdicts.append(
                        f"{'PASS' if gain >= target else 'FAIL'}: block {mode} {dname} {t} "
                        f"tokens: upcycle {gain:.2f}x faster than grouped_mm "
                        f"(target >= {target}x; eager "
                        f"{res['eager']['median_ms'] / ours_ms:.2f}x upcycle's time)"
                    )
    meta["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    print()
    print("\n".join(lines))
    print()
    print("\n".join(verdicts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"meta": meta, "checks": checks, "results": results, "verdicts": verdicts},
            indent=1,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
