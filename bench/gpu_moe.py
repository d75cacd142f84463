"""MoE experts on a CUDA GPU: correctness and speed of ours vs transformers' implementations.

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/gpu_moe.py [--out bench/results/gpu_moe.json] [--reps 20]
                                      [--tokens 1,16,64,4096,16384] [--configs mixtral,fine]
    .venv/bin/python bench/gpu_moe.py --smoke   # tiny shapes, fp32, CPU: checks the script

Configs: "mixtral" H=4096, I=14336, E=8, top-2 and "fine" (fine-grained) H=2048, I=1408,
E=64, top-6; with --smoke, tiny versions of both. Random routing (softmax of N(0, 1) logits,
top-k, renormalized), weights N(0, 0.02), bf16 (fp32 with --smoke). Token counts 1-64 are
decode sizes, 4096-16384 prefill/training sizes.

Variants, each where it can run:
- upcycle: transformers' experts module with `experts_implementation="upcycle"` (our torch
  path, `upcycle.kernels.experts`); in the LoRA mode `routed_experts_lora`, which
  `--adapter experts-lora` runs;
- upcycle triton: `upcycle.kernels.ops.experts_swiglu(..., force_triton=True)`, when that
  module imports and the device is CUDA;
- grouped_mm (transformers' default) and eager: the same module with those implementations;
- scattermoe (`scattermoe.mlp.GLUMLP`) and grouped_gemm (megablocks' grouped GEMM,
  `grouped_gemm.ops.gmm`, tokens sorted here), when importable.

Modes: "fwd" (inference, no grad); "fwd+bwd" (trainable expert weights, gradient to the input
too); "lora fwd+bwd" (frozen experts plus r=16 LoRA on gate_up and down: ours; grouped_mm
without LoRA is the frozen-base floor).

Before timing, each variant's output and gradients (input, expert weights or LoRA factors) are
compared with an fp32 autograd computation on the same weights (LoRA folded as W + s B A), at
the smallest decode and the smallest prefill token count; a variant that disagrees is reported
and not timed in that mode.

Ceilings, measured in the same run: a square matmul in the benchmark dtype (TFLOP/s) and a
device-to-device copy (GB/s, bytes read + written). Achieved rates count useful work only:
FLOPs = 6 T k H I forward (projections 2I and I wide), 3x with weight gradients, 2x plus the
LoRA products with frozen weights; bytes = the weights of experts that get tokens (read once
forward; read twice and, when trainable, written once as gradients in forward+backward) plus
the (T, H) activations (input and output; their gradients too with backward). Timing: CUDA
events (perf_counter on the CPU), median of --reps calls after --warmup, variants interleaved.
Output: a markdown table on stdout and JSON at --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
R, ALPHA = 16, 32
SCALING = ALPHA / R
MODES = ("fwd", "fwd+bwd", "lora fwd+bwd")
FLOOR = "ran (frozen-base floor without LoRA: not compared)"

Variant = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Config:
    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int


CONFIGS = {
    "mixtral": Config("mixtral", 4096, 14336, 8, 2),
    "fine": Config("fine", 2048, 1408, 64, 6),
}
SMOKE_CONFIGS = {
    "mixtral": Config("mixtral-tiny", 64, 224, 8, 2),
    "fine": Config("fine-tiny", 32, 24, 16, 4),
}


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call's time in ms: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def ceilings(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    """Measured matmul TFLOP/s (an n x n by n x n product) and copy GB/s (read + write)."""
    n = 512 if smoke else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    src = torch.empty((16 if smoke else 1024) << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):  # warm-up
        a @ b
        dst.copy_(src)
    mm = statistics.median(time_ms(lambda: a @ b, device) for _ in range(10))
    cp = statistics.median(time_ms(lambda: dst.copy_(src), device) for _ in range(10))
    return {
        "matmul_tflops": 2 * n**3 / mm / 1e9,
        "copy_gbps": 2 * src.numel() / cp / 1e6,
        "matmul_n": n,
        "copy_bytes": src.numel(),
    }


def make_experts(cfg: Config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' MixtralExperts at cfg's shapes, N(0, 0.02) weights (seeded); its
    experts_implementation is chosen per call through its config."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.inter,
        num_local_experts=cfg.experts,
        num_experts_per_tok=cfg.top_k,
    )
    config._experts_implementation = "grouped_mm"
    experts = MixtralExperts(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return experts.to(device=device, dtype=dtype)


def make_inputs(cfg: Config, tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    """x (T, H), Mixtral routing of random logits (index (T, k), fp32 weights (T, k)), an
    output gradient (T, H) and LoRA factors (A (E, r, in), B (E, out, r), B non-zero)."""
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cfg.hidden, generator=gen)
    logits = torch.randn(tokens, cfg.experts, generator=gen)
    weights, index = torch.topk(logits.softmax(-1), cfg.top_k, dim=-1)
    grad = torch.randn(tokens, cfg.hidden, generator=gen)
    dims = {"gate_up": (cfg.hidden, 2 * cfg.inter), "down": (cfg.inter, cfg.hidden)}
    lora = {
        role: tuple(
            (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype)
            for shape in ((cfg.experts, R, fan_in), (cfg.experts, fan_out, R))
        )
        for role, (fan_in, fan_out) in dims.items()
    }
    return {
        "x": x.to(device=device, dtype=dtype),
        "index": index.to(device),
        "weights": (weights / weights.sum(-1, keepdim=True)).to(device),
        "grad": grad.to(device=device, dtype=dtype),
        "lora": lora,
    }


def make_variants(experts: torch.nn.Module, cfg: Config, mode: str, lora: dict) -> dict:
    """name -> f(x, index, weights) for every variant that runs in `mode` on this device."""
    from upcycle.kernels.dispatch import routed_experts_lora

    def module(impl: str) -> Variant:
        def run(x, index, weights):
            experts.config._experts_implementation = impl
            return experts(x, index, weights)

        return run

    if mode == "lora fwd+bwd":
        out = {
            "upcycle": lambda x, index, weights: routed_experts_lora(
                x,
                experts.gate_up_proj,
                experts.down_proj,
                experts.act_fn,
                weights,
                index,
                lora,
                SCALING,
            ),  # fmt: skip
        }
    else:
        out = {"upcycle": module("upcycle")}
    if experts.gate_up_proj.is_cuda:
        try:
            from upcycle.kernels import ops
        except ImportError:
            ops = None
        if ops is not None:
            out["upcycle triton"] = lambda x, index, weights: ops.experts_swiglu(
                x, experts.gate_up_proj, experts.down_proj, index, weights,
                lora if mode == "lora fwd+bwd" else None, SCALING, force_triton=True,
            )  # fmt: skip
    out["grouped_mm"] = module("grouped_mm")
    if mode != "lora fwd+bwd":
        out["eager"] = module("eager")
        for name, factory in (("scattermoe", scattermoe_variant), ("grouped_gemm", gmm_variant)):
            variant = factory(experts, cfg)
            if variant is not None:
                out[name] = variant
    return out


def scattermoe_variant(experts: torch.nn.Module, cfg: Config) -> Variant | None:
    """scattermoe's GLUMLP holding the same weights ([up; gate] in its first projection,
    which it splits as (h, gates)), if scattermoe imports."""
    try:
        from scattermoe.mlp import GLUMLP
    except ImportError:
        return None
    w = experts.gate_up_proj
    mlp = GLUMLP(cfg.hidden, cfg.inter, cfg.experts, cfg.top_k).to(device=w.device, dtype=w.dtype)
    gate, up = w.detach().chunk(2, dim=1)
    with torch.no_grad():
        mlp.experts.weight.copy_(torch.cat([up, gate], dim=1))
        mlp.output_experts.weight.copy_(experts.down_proj.detach())
    mlp.requires_grad_(w.requires_grad)

    def run(x, index, weights):
        return mlp(x, weights.to(x.dtype), index)

    run.own_weights = True  # its weight gradients land on its own copy: not compared
    return run


def gmm_variant(experts: torch.nn.Module, cfg: Config) -> Variant | None:
    """Tokens sorted by expert through megablocks' grouped GEMM (`grouped_gemm.ops.gmm`),
    if grouped_gemm imports."""
    try:
        from grouped_gemm import ops as gg
    except ImportError:
        return None
    from upcycle.kernels.reference import sort_by_expert

    def run(x, index, weights):
        order, tokens, counts = sort_by_expert(index, cfg.experts)
        sizes = torch.tensor(counts, dtype=torch.int64)
        gate, up = gg.gmm(x[tokens], experts.gate_up_proj, sizes, trans_b=True).chunk(2, dim=-1)
        y = gg.gmm(F.silu(gate) * up, experts.down_proj, sizes, trans_b=True)
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(y).index_copy(0, order, y).view(len(x), cfg.top_k, -1).sum(1)

    return run


def reference(experts: torch.nn.Module, inp: dict, mode: str) -> dict:
    """fp32 autograd on the same weights, one loop over experts: the output and, with
    backward, the gradients of x and of the expert weights (fwd+bwd) or LoRA factors."""
    x = inp["x"].float().requires_grad_(mode != "fwd")
    w1 = experts.gate_up_proj.detach().float().requires_grad_(mode == "fwd+bwd")
    w2 = experts.down_proj.detach().float().requires_grad_(mode == "fwd+bwd")
    lora = {k: [t.detach().float().requires_grad_() for t in ab] for k, ab in inp["lora"].items()}
    gu_w, down_w = w1, w2
    if mode == "lora fwd+bwd":
        gu_w = w1 + SCALING * lora["gate_up"][1] @ lora["gate_up"][0]
        down_w = w2 + SCALING * lora["down"][1] @ lora["down"][0]
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        t, k = torch.where(inp["index"] == e)
        if t.numel():
            gate, up = F.linear(x[t], gu_w[e]).chunk(2, dim=-1)
            h = F.linear(F.silu(gate) * up, down_w[e]) * inp["weights"][t, k, None]
            y = y.index_add(0, t, h)
    out = {"y": y.detach()}
    if mode != "fwd":
        y.backward(inp["grad"].float())
        out["x grad"] = x.grad
        if mode == "fwd+bwd":
            out["gate_up_proj grad"], out["down_proj grad"] = w1.grad, w2.grad
        else:
            out |= {
                f"{k}_{n} grad": t.grad
                for k, ab in lora.items()
                for n, t in zip("AB", ab, strict=True)
            }
    return out


def leaves(experts: torch.nn.Module, inp: dict, mode: str) -> dict[str, torch.Tensor]:
    """The tensors that get gradients in `mode`, by the names `reference` uses."""
    if mode == "fwd+bwd":
        return {"gate_up_proj grad": experts.gate_up_proj, "down_proj grad": experts.down_proj}
    if mode == "lora fwd+bwd":
        return {
            f"{k}_{n} grad": t
            for k, ab in inp["lora"].items()
            for n, t in zip("AB", ab, strict=True)
        }
    return {}


def prepare(experts: torch.nn.Module, inp: dict, mode: str) -> None:
    """Set requires_grad for the mode and drop old gradients."""
    experts.requires_grad_(mode == "fwd+bwd")
    for ab in inp["lora"].values():
        for t in ab:
            t.requires_grad_(mode == "lora fwd+bwd")
            t.grad = None
    for p in experts.parameters():
        p.grad = None


def call(f: Variant, inp: dict, mode: str) -> dict:
    """One call of f in `mode`; returns its output and gradients (mode's leaves and x)."""
    if mode == "fwd":
        with torch.no_grad():
            return {"y": f(inp["x"], inp["index"], inp["weights"])}
    x = inp["x"].detach().requires_grad_()
    y = f(x, inp["index"], inp["weights"])
    y.backward(inp["grad"])
    return {"y": y.detach(), "x grad": x.grad}


def check(experts, variants: dict, inp: dict, mode: str, rtol: float) -> dict[str, str]:
    """'ok' or the first mismatch per variant: max abs difference from the fp32 reference
    relative to the reference's max abs value, for the output and every gradient."""
    want = reference(experts, inp, mode)
    verdicts = {}
    for name, f in variants.items():
        prepare(experts, inp, mode)
        try:
            got = call(f, inp, mode)
        except Exception as exc:  # a kernel that cannot run on this device or shape
            verdicts[name] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        if name == "grouped_mm" and mode == "lora fwd+bwd":
            verdicts[name] = FLOOR
            continue
        got |= {k: t.grad for k, t in leaves(experts, inp, mode).items()}
        verdicts[name] = "ok"
        for key, ref in want.items():
            if getattr(f, "own_weights", False) and key.endswith("proj grad"):
                continue
            scale = ref.abs().max().item() or 1.0
            err = (got[key].float() - ref).abs().max().item() if got.get(key) is not None else None
            if err is None or err > rtol * scale:
                verdicts[name] = f"mismatch in {key}: max abs diff {err} vs max abs {scale:.3g}"
                break
    prepare(experts, inp, mode)
    return verdicts


def work(cfg: Config, inp: dict, mode: str, elem: int) -> tuple[float, float]:
    """(useful FLOPs, useful bytes) of one call; see the module docstring."""
    T, k, H, inter = inp["x"].shape[0], cfg.top_k, cfg.hidden, cfg.inter
    active = int(torch.unique(inp["index"]).numel())
    flops = 6.0 * T * k * H * inter
    weights = active * 3.0 * H * inter * elem
    acts = 2.0 * T * H * elem
    if mode == "fwd":
        return flops, weights + acts
    if mode == "fwd+bwd":
        return 3 * flops, 3 * weights + 2 * acts
    lora = 2.0 * T * k * R * (2 * H + 3 * inter)
    return 2 * flops + 3 * lora, 2 * weights + 2 * acts


def run_case(experts, cfg, inp, mode, names, reps, warmup, device) -> dict[str, list[float]]:
    """Interleaved timing of the variants `names`: per variant the ms of each timed call."""
    variants = make_variants(experts, cfg, mode, inp["lora"])
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + reps):
        for n in names:
            prepare(experts, inp, mode)
            ms = time_ms(lambda n=n: call(variants[n], inp, mode), device)
            if i >= warmup:
                times[n].append(ms)
    prepare(experts, inp, mode)
    return times


def git_rev() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, CPU")
    ap.add_argument("--configs", default="mixtral,fine")
    ap.add_argument("--tokens", default=None, help="default 1,16,64,4096,16384 (smoke: 1,16,256)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reps", type=int, default=None, help="default 20 (smoke: 3)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_moe.json")
    args = ap.parse_args()
    import upcycle.kernels  # noqa: F401  (registers experts_implementation="upcycle")

    if args.smoke:
        device, dtype, configs, rtol = torch.device("cpu"), torch.float32, SMOKE_CONFIGS, 1e-4
        tokens = [int(t) for t in (args.tokens or "1,16,256").split(",")]
        reps = args.reps or 3
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke to check the script on the CPU")
        device, dtype, configs, rtol = torch.device("cuda"), torch.bfloat16, CONFIGS, 3e-2
        tokens = [int(t) for t in (args.tokens or "1,16,64,4096,16384").split(",")]
        reps = args.reps or 20
    modes = args.modes.split(",")
    elem = torch.finfo(dtype).bits // 8
    ceil = ceilings(device, dtype, args.smoke)
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_rev(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "reps": reps,
        "warmup": args.warmup,
        "ceilings": ceil,
    }
    print(
        f"{meta['device']}, {meta['dtype']}: matmul {ceil['matmul_tflops']:.3g} TFLOP/s, "
        f"copy {ceil['copy_gbps']:.0f} GB/s",
        flush=True,
    )
    checks, rows = {}, []
    decode = [t for t in tokens if t <= 64]
    prefill = [t for t in tokens if t > 64]
    check_at = [ts[0] for ts in (decode, prefill) if ts]
    for key in args.configs.split(","):
        cfg = configs[key]
        experts = make_experts(cfg, device, dtype)
        for mode in modes:
            usable = None
            for t in check_at:
                inp = make_inputs(cfg, t, device, dtype)
                verdicts = check(
                    experts, make_variants(experts, cfg, mode, inp["lora"]), inp, mode, rtol
                )
                checks[f"{cfg.name} {mode} {t} tokens"] = verdicts
                ok = {n for n, v in verdicts.items() if v in ("ok", FLOOR)}
                usable = ok if usable is None else usable & ok
                for n, v in verdicts.items():
                    if n not in ok:
                        print(f"  {cfg.name} {mode} {t} tokens: {n}: {v}", flush=True)
            for t in tokens:
                inp = make_inputs(cfg, t, device, dtype)
                names = [n for n in make_variants(experts, cfg, mode, inp["lora"]) if n in usable]
                print(f"{cfg.name}, {mode}, {t} tokens: {', '.join(names)}", flush=True)
                times = run_case(experts, cfg, inp, mode, names, reps, args.warmup, device)
                flops, nbytes = work(cfg, inp, mode, elem)
                base = statistics.median(times["grouped_mm"]) if "grouped_mm" in times else None
                for n, ts in times.items():
                    ms = statistics.median(ts)
                    tflops, gbps = flops / ms / 1e9, nbytes / ms / 1e6
                    rows.append(
                        dict(config=asdict(cfg), mode=mode, tokens=t, variant=n, median_ms=ms,
                             min_ms=min(ts), times_ms=ts, tflops=tflops,
                             tflops_frac=tflops / ceil["matmul_tflops"], gbps=gbps,
                             gbps_frac=gbps / ceil["copy_gbps"],
                             speedup_vs_grouped_mm=base / ms if base else None)
                    )  # fmt: skip
        del experts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(
        "| config | mode | tokens | variant | median ms | TFLOP/s (of ceiling) | GB/s (of ceiling) | vs grouped_mm |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['speedup_vs_grouped_mm']:.2f}x" if r["speedup_vs_grouped_mm"] else ""
        print(
            f"| {r['config']['name']} | {r['mode']} | {r['tokens']} | {r['variant']} "
            f"| {r['median_ms']:.3f} | {r['tflops']:.3g} ({r['tflops_frac']:.0%}) "
            f"| {r['gbps']:.3g} ({r['gbps_frac']:.0%}) | {vs} |"
        )
    meta["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "checks": checks, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
