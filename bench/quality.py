"""Granular upcycling quality before training: perplexity ratio to the dense model.

Run from the repository root:

    .venv/bin/python bench/quality.py              # every group, 2 workers (~2 h on 2 CPUs)
    .venv/bin/python bench/quality.py --quick      # dense, exactness, the G=64 target cell
    .venv/bin/python bench/quality.py --only grid  # one group: exact, target, target25, grid, virtual
    .venv/bin/python bench/quality.py --table      # the markdown tables of docs/benchmarks.md

Groups:

- exact: G=8, top-8 of 8, zero router: must equal the dense model.
- target / target25: the issue's G=64 cells with 16 (8) shared parts, 50% (25%) of the FFN's
  neurons active per token, co-activation partition, activation router, then `upcycle calibrate`
  with its defaults.
- grid: G=8 and G=32 (mixtral, no shared parts), top-k at 50% and 25% of the routed experts,
  every partition x the random, centroid and activation router inits; the activation cell of
  each (G, k, partition) is also calibrated (`--max-tokens 8192`) and gets both oracles.
  `calibrate` fits every router from scratch (it keeps the old one only where the fit ranks
  worse), so one calibration per partition stands for all router inits.
- virtual: G=8 with every part replicated twice (E=16), random vs virtual-group routers.

Conversions and calibrations run through the CLI (`upcycle convert`, `upcycle calibrate`), one
thread each. Perplexity is measured in the worker process with the model loaded by transformers
(fp32): `upcycle.evaluate.perplexity` on the held-out split of `builtin`, 8 blocks of 512 tokens
(4088 predicted tokens, the same for every model and the same as
`upcycle eval MODEL --data builtin --max-tokens 4096`).

Oracles: a forward hook on every MoE block's `.gate` replaces the router's choice with
uniform weights 1/k. by="norm": each token's k experts with the largest output norms; by="error":
the k experts whose sum comes closest to all routed experts' output (`error_oracle`, what
`calibrate` fits by default). With uniform weights the converter's K / R down-projection scale
makes the block output exactly the sum of the chosen parts plus the shared expert, so an oracle
depends on the partition only, not on the router.

Results go to bench/results/quality.json after every cell (a rerun skips the cells already
there; delete the file to start over). Models live in /tmp/quality-work and are deleted after use.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
UPCYCLE = os.path.join(ROOT, ".venv", "bin", "upcycle")
RESULTS = os.path.join(ROOT, "bench", "results", "quality.json")
HEATMAP = os.path.join(ROOT, "bench", "results", "quality_heatmap.png")
WORK = "/tmp/quality-work"
MAX_TOKENS = 4096
SEQ_LEN = 512  # upcycle eval's default
DATA = "builtin"
GRID_CALIBRATION_TOKENS = 4096
GRID_EVAL_TOKENS = 2048  # the grid's cells: the first 4 of the 8 held-out blocks
PARTITIONS = ("contiguous", "random", "kmeans", "coactivation")
GRID_ROUTERS = ("activation", "random", "centroid")
GRID_SHAPES = ((8, 4), (32, 16), (8, 2), (32, 8))  # (G, k): 50% and 25% of the routed experts
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(args: list[str]) -> str:
    t = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, env=ENV)
    if p.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    log(f"  {args[1]} {os.path.basename(args[2])} done in {time.perf_counter() - t:.0f} s")
    return p.stdout


# ---- results file -----------------------------------------------------------------------------


def load_results() -> dict:
    if os.path.isfile(RESULTS):
        with open(RESULTS) as f:
            return json.load(f)
    return {"meta": {}, "runs": {}}


def save(results: dict) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    os.replace(tmp, RESULTS)


# ---- measurements (in the worker process) -----------------------------------------------------

_BLOCKS = {}


def _blocks(tokenizer_dir: str, max_tokens: int):
    """The held-out eval blocks; every model here shares the default model's tokenizer."""
    if max_tokens not in _BLOCKS:
        from transformers import AutoTokenizer

        from upcycle.data import resolve_texts, token_blocks

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        texts = resolve_texts(DATA, "heldout")
        _BLOCKS[max_tokens] = token_blocks(texts, tok, SEQ_LEN, max_tokens)
    return _BLOCKS[max_tokens]


def evaluate(model_dir: str, oracles: tuple[str, ...] = (), max_tokens: int = MAX_TOKENS) -> dict:
    """{"ppl": router perplexity, "<by>_oracle_ppl": ...} of one checkpoint, loaded once.

    by="norm" / "error": see the module docstring; by="router" keeps the router's own top-k
    choice and only makes its weights uniform (how much of a router's loss is its mixing weights).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from upcycle.calibrate import error_oracle, expert_output_norms
    from upcycle.evaluate.perplexity import perplexity
    from upcycle.io.default_model import resolve_model

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    path = resolve_model(model_dir)
    blocks = _blocks(path, max_tokens)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t = time.perf_counter()
    out = {"ppl": perplexity(model, blocks, batch_size=4)["perplexity"]}
    moe = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    k = getattr(model.config, "num_experts_per_tok", 0)

    def hook(block, by):
        def replace(gate, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            if by == "norm":
                index = expert_output_norms(block.experts, x).topk(k, dim=-1).indices
            elif by == "error":
                index = error_oracle(block.experts, x, k).float().topk(k, dim=-1).indices
            else:
                index = output[2]
            return output[0], torch.full(index.shape, 1.0 / k, dtype=output[1].dtype), index

        return replace

    for by in oracles:
        handles = [b.gate.register_forward_hook(hook(b, by)) for b in moe]
        try:
            out[f"{by}_oracle_ppl"] = perplexity(model, blocks, batch_size=4)["perplexity"]
        finally:
            for h in handles:
                h.remove()
    log(
        f"  eval {os.path.basename(model_dir)} ({1 + len(oracles)} runs) in {time.perf_counter() - t:.0f} s"
    )
    return out


def oracle_eval(model_dir: str, by: str = "norm") -> dict:
    """Perplexity of `model_dir` routed by the oracle `by` (kept for one-off use from a shell)."""
    return {"perplexity": evaluate(model_dir, (by,))[f"{by}_oracle_ppl"]}


def calibrate(src: str, out: str, max_tokens: int | None) -> dict:
    args = [UPCYCLE, "calibrate", src, out, "--data", DATA, "--json", "-q", "--force"]
    if max_tokens:
        args += ["--max-tokens", str(max_tokens)]
    t = time.perf_counter()
    r = json.loads(sh(args))
    layers = r["layers"] if isinstance(r, dict) and "layers" in r else r
    before = [x["oracle_overlap_before"] for x in layers]
    after = [x["oracle_overlap_after"] for x in layers]
    return {
        "calibrate_seconds": round(time.perf_counter() - t, 1),
        "calibration_tokens": max_tokens or "default",
        "overlap_before": sum(before) / len(before),
        "overlap_after": sum(after) / len(after),
    }


# ---- the plan ---------------------------------------------------------------------------------


def cell(g, k, partition, router, group, s=0, e=None, target="mixtral", **extra) -> dict:
    e = e if e is not None else g - s
    c = dict(g=g, s=s, e=e, k=k, partition=partition, router=router, target=target, group=group)
    c["key"] = f"G{g}-S{s}-E{e}-k{k}-{partition}-{router}-{target}"
    c.update(calibrate=None, oracles=(), plot=False, eval_tokens=MAX_TOKENS)
    c.update(extra)
    return c


def plan() -> list[dict]:
    """Every cell, in the order they are started (most telling first)."""
    target = dict(target="qwen2_moe", calibrate="default", oracles=("norm", "error"))
    grid = dict(eval_tokens=GRID_EVAL_TOKENS)
    cells = [
        cell(8, 8, "contiguous", "zeros", "exact", oracles=("norm",)),
        cell(64, 16, "coactivation", "activation", "target", s=16, e=48, plot=True, **target),
    ]
    for g, k in GRID_SHAPES:
        for part in PARTITIONS:
            extra = dict(calibrate=GRID_CALIBRATION_TOKENS, oracles=("norm", "error"), **grid)
            cells.append(cell(g, k, part, "activation", "grid", **extra))
    for router in GRID_ROUTERS[1:]:
        for g, k in GRID_SHAPES:
            for part in PARTITIONS:
                cells.append(cell(g, k, part, router, "grid", **grid))
    for router in ("random", "virtual-group"):  # top-8 of 16: one whole copy of the 8 parts
        cells.append(cell(8, 8, "kmeans", router, "virtual", e=16, **grid))
    cells.append(cell(8, 4, "kmeans", "random", "virtual", e=16, **grid))
    cells.append(cell(64, 8, "coactivation", "activation", "target25", s=8, e=56, **target))
    return cells


def run_cell(c: dict, dense: dict) -> dict:
    """Convert, evaluate, calibrate and evaluate again one cell; returns its record."""
    t0 = time.perf_counter()
    out = os.path.join(WORK, c["key"])
    needs_data = (
        c["partition"] == "coactivation"
        or c["router"] == "activation"
        or (c["s"] and c["partition"] != "contiguous")
    )
    args = [UPCYCLE, "convert", "default", out, "--method", "granular", "-G", str(c["g"])]
    args += ["-E", str(c["e"]), "-k", str(c["k"]), "--partition", c["partition"]]
    args += ["--router-init", c["router"], "-q", "--force"]
    if c["s"]:
        args += ["-S", str(c["s"])]
    if c["target"] != "mixtral":
        args += ["--target", c["target"]]
    if needs_data:
        args += ["--calibration-data", DATA]
    rec = {k: c[k] for k in ("g", "s", "e", "k", "partition", "router", "target", "group")}
    rec["calibration_data"] = needs_data
    # fraction of the FFN's neurons a token uses (replicas of one part counted once per pick)
    rec["active_fraction"] = (c["s"] + (c["g"] - c["s"]) * c["k"] / c["e"]) / c["g"]
    try:
        t = time.perf_counter()
        sh(args)
        rec["convert_seconds"] = round(time.perf_counter() - t, 1)
        r = evaluate(out, c["oracles"], c["eval_tokens"])
        rec["router_ppl"] = r["ppl"]
        for by in c["oracles"]:
            rec[f"{by}_oracle_ppl"] = r[f"{by}_oracle_ppl"]
        if c["calibrate"]:
            cal = out + "-cal"
            tokens = None if c["calibrate"] == "default" else c["calibrate"]
            rec.update(calibrate(out, cal, tokens))
            shutil.rmtree(out, ignore_errors=True)
            r = evaluate(cal, ("router",), c["eval_tokens"])
            rec["calibrated_ppl"] = r["ppl"]
            rec["calibrated_uniform_ppl"] = r["router_oracle_ppl"]
            if c["plot"]:
                sh(
                    [
                        UPCYCLE,
                        "eval",
                        cal,
                        "--data",
                        DATA,
                        "--max-tokens",
                        str(MAX_TOKENS),
                        "--plot",
                        HEATMAP,
                        "-q",
                    ]
                )
            shutil.rmtree(cal, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - record and go on with the other cells
        import traceback

        rec["error"] = f"{type(e).__name__}: {str(e)[-1000:]}"
        log(f"  {c['key']} FAILED:\n{traceback.format_exc()}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out + "-cal", ignore_errors=True)
    rec["eval_tokens"] = c["eval_tokens"]
    for name in [n for n in rec if n.endswith("_ppl")]:
        rec[name.replace("_ppl", "_ratio")] = rec[name] / dense[str(c["eval_tokens"])]
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rec["done"] = "error" not in rec
    return rec


# ---- tables -----------------------------------------------------------------------------------


def _r(rec: dict, name: str) -> str:
    v = rec.get(f"{name}_ratio")
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.3g}")


def table(results: dict) -> str:
    """The markdown tables of docs/benchmarks.md from quality.json."""
    runs = results["runs"]
    dense = results["meta"]["dense_ppl"]
    out = [
        f"Ratios to the dense model's perplexity on the same tokens: {dense:.3f} on "
        f"{MAX_TOKENS} (exact and target cells), "
        f"{results['meta']['dense_ppl_by_eval_tokens'][str(GRID_EVAL_TOKENS)]:.3f} on "
        f"{GRID_EVAL_TOKENS} (grid).",
        "",
        "| cell | active | converter's router | calibrated (tokens) | calibrated choice, weights 1/k "
        "| oracle norm | oracle error | calibrated / error oracle | overlap before / after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs.values():
        if r.get("group") not in ("exact", "target", "target25"):
            continue
        shared = f" S={r['s']}" if r["s"] else ""
        cfg = f"G={r['g']}{shared} E={r['e']} k={r['k']} {r['target']}, {r['partition']}, {r['router']}"
        cal = "-"
        if "calibrated_ratio" in r:
            cal = f"{_r(r, 'calibrated')} ({r['calibration_tokens']})"
        gap = "-"
        if "calibrated_ppl" in r and "error_oracle_ppl" in r:
            gap = f"{r['calibrated_ppl'] / r['error_oracle_ppl']:.2f}"
        ov = (
            f"{r['overlap_before']:.2f} / {r['overlap_after']:.2f}" if "overlap_after" in r else "-"
        )
        out.append(
            f"| {cfg} | {100 * r['active_fraction']:.0f}% | {_r(r, 'router')} | {cal} "
            f"| {_r(r, 'calibrated_uniform')} | {_r(r, 'norm_oracle')} | {_r(r, 'error_oracle')} "
            f"| {gap} | {ov} |"
        )
    for g, k in GRID_SHAPES:
        e = g
        out += [
            "",
            f"G={g} E={e} k={k} (mixtral, {100 * k // e}% active): perplexity ratio to dense",
            "",
            f"| partition | random | centroid | activation | calibrated ({GRID_CALIBRATION_TOKENS} tokens) "
            "| oracle norm | oracle error | calibrated / error oracle |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for part in PARTITIONS:
            rec = {r: runs.get(f"G{g}-S0-E{e}-k{k}-{part}-{r}-mixtral", {}) for r in GRID_ROUTERS}
            a = rec["activation"]
            gap = "-"
            if "calibrated_ppl" in a and "error_oracle_ppl" in a:
                gap = f"{a['calibrated_ppl'] / a['error_oracle_ppl']:.2f}"
            out.append(
                f"| {part} | {_r(rec['random'], 'router')} | {_r(rec['centroid'], 'router')} "
                f"| {_r(a, 'router')} | {_r(a, 'calibrated')} | {_r(a, 'norm_oracle')} "
                f"| {_r(a, 'error_oracle')} | {gap} |"
            )
    out += [
        "",
        "| G=8, parts replicated twice (E=16), kmeans | random | virtual-group |",
        "| --- | --- | --- |",
    ]
    for k in (8, 4):
        rec = {
            r: runs.get(f"G8-S0-E16-k{k}-kmeans-{r}-mixtral", {})
            for r in ("random", "virtual-group")
        }
        out.append(
            f"| k={k} | {_r(rec['random'], 'router')} | {_r(rec['virtual-group'], 'router')} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="dense, exactness, the G=64 target cell")
    ap.add_argument("--only", help="one group: exact, target, target25, grid, virtual")
    ap.add_argument("--jobs", type=int, default=2, help="cells run at once (one thread each)")
    ap.add_argument("--table", action="store_true", help="print the markdown tables and exit")
    opts = ap.parse_args()
    if opts.table:
        print(table(load_results()))
        return
    os.makedirs(WORK, exist_ok=True)
    results = load_results()
    results["meta"].update(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        data=f"{DATA} heldout",
        max_tokens=MAX_TOKENS,
        seq_len=SEQ_LEN,
        oracle_weights="uniform 1/k",
        git=subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
    )
    dense = results["meta"].setdefault("dense_ppl_by_eval_tokens", {})
    if "dense_ppl" in results["meta"]:
        dense.setdefault(str(MAX_TOKENS), results["meta"]["dense_ppl"])
    for tokens in (MAX_TOKENS, GRID_EVAL_TOKENS):
        if str(tokens) not in dense:
            log(f"dense baseline on {tokens} tokens")
            dense[str(tokens)] = evaluate("default", max_tokens=tokens)["ppl"]
            save(results)
    results["meta"]["dense_ppl"] = dense[str(MAX_TOKENS)]
    log(f"dense perplexity {dense}")
    cells = plan()
    if opts.quick:
        cells = [c for c in cells if c["group"] in ("exact", "target")]
    if opts.only:
        cells = [c for c in cells if c["group"] == opts.only]
    cells = [c for c in cells if not results["runs"].get(c["key"], {}).get("done")]
    log(f"{len(cells)} cells to run with {opts.jobs} workers")
    with cf.ProcessPoolExecutor(opts.jobs) as pool:
        futures = {pool.submit(run_cell, c, dense): c for c in cells}
        for fut in cf.as_completed(futures):
            c = futures[fut]
            try:
                rec = fut.result()
            except Exception as e:  # noqa: BLE001 - a worker died or the record did not pickle
                rec = {"error": f"{type(e).__name__}: {e}", "seconds": 0.0}
            results["runs"][c["key"]] = rec
            save(results)
            ratios = {k: round(v, 3) for k, v in rec.items() if k.endswith("_ratio")}
            log(f"{c['key']}: {rec.get('error') or ratios} ({rec['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
