"""Granular upcycling quality before training: perplexity ratio to the dense model.

Run from the repository root:

    .venv/bin/python bench/quality.py            # full grid, in priority order (~1 h on 2 CPUs)
    .venv/bin/python bench/quality.py --quick    # dense, exactness, one G=64 target cell
    .venv/bin/python bench/quality.py --only target   # one group: dense, exact, target, target25, grid

Every converted model is evaluated with `upcycle eval --data builtin --max-tokens 4096 --json`
(held-out split, seq_len 512: the same 8 x 512 tokens for every model). Conversions and router
calibration go through the CLI (`upcycle convert`, `upcycle calibrate`); the oracle runs
in-process: the converted MoE is loaded with transformers (fp32) and a forward hook on every
MoE block's `.gate` replaces the router's choice by the top-k experts with the largest output
norms ||expert_e(x)|| for that token, with UNIFORM weights 1/k. With uniform weights the
converter's down-projection scale (K / R) makes the block output exactly the sum of the chosen
parts (plus the shared expert), so the oracle depends on the partition only, not on the router.

Results are written to bench/results/quality.json after every measurement (a rerun skips cells
already there; delete the file to start over). Models live in /tmp/quality-work and are
deleted after use.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPCYCLE = os.path.join(ROOT, ".venv", "bin", "upcycle")
RESULTS = os.path.join(ROOT, "bench", "results", "quality.json")
HEATMAP = os.path.join(ROOT, "bench", "results", "quality_heatmap.png")
WORK = "/tmp/quality-work"
MAX_TOKENS = 4096
SEQ_LEN = 512  # upcycle eval's default
DATA = "builtin"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(args: list[str]) -> str:
    t = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    log(f"  {args[1]} done in {time.perf_counter() - t:.0f} s")
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


# ---- measurements -------------------------------------------------------------------------------


def cli_eval(model: str, plot: str | None = None) -> dict:
    args = [UPCYCLE, "eval", model, "--data", DATA, "--max-tokens", str(MAX_TOKENS), "--json", "-q"]
    if plot:
        args += ["--plot", plot]
    r = json.loads(sh(args))
    return {"perplexity": r["perplexity"], "loss": r["loss"], "tokens": r["tokens"]}


def oracle_eval(model_dir: str, by: str = "norm") -> dict:
    """Perplexity with every MoE block routed by an oracle, weights 1/k.

    by="norm": each token's top-k experts by output norm; by="error": the k experts whose sum
    comes closest to all experts' output (`upcycle.calibrate.error_oracle`, what `calibrate`
    fits by default); by="router" keeps the router's own top-k choice and only makes the
    weights uniform (a diagnostic: how much of a calibrated router's loss comes from its
    mixing weights).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from upcycle.calibrate import error_oracle, expert_output_norms
    from upcycle.data import resolve_texts, token_blocks
    from upcycle.evaluate.perplexity import perplexity

    tok = AutoTokenizer.from_pretrained(model_dir)
    blocks = token_blocks(resolve_texts(DATA, "heldout"), tok, SEQ_LEN, MAX_TOKENS)
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    k = model.config.num_experts_per_tok

    def hook(block):
        def replace(gate, args, output):
            logits = output[0]
            x = args[0].reshape(-1, args[0].shape[-1])
            if by == "norm":
                index = expert_output_norms(block.experts, x).topk(k, dim=-1).indices
            elif by == "error":
                index = error_oracle(block.experts, x, k).float().topk(k, dim=-1).indices
            else:
                index = output[2]
            weights = torch.full(index.shape, 1.0 / k, dtype=output[1].dtype)
            return logits, weights, index

        return replace

    blocks_moe = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    handles = [b.gate.register_forward_hook(hook(b)) for b in blocks_moe]
    t = time.perf_counter()
    try:
        r = perplexity(model, blocks, batch_size=4)
    finally:
        for h in handles:
            h.remove()
    log(f"  oracle done in {time.perf_counter() - t:.0f} s")
    return {"perplexity": r["perplexity"], "loss": r["loss"], "tokens": r["tokens"]}


def calibrate(src: str, out: str) -> dict:
    r = json.loads(
        sh(
            [
                UPCYCLE,
                "calibrate",
                src,
                out,
                "--data",
                DATA,
                "--max-tokens",
                "4096",
                "--json",
                "-q",
                "--force",
            ]
        )
    )
    layers = r["layers"] if isinstance(r, dict) and "layers" in r else r
    before = [x["oracle_overlap_before"] for x in layers]
    after = [x["oracle_overlap_after"] for x in layers]
    return {"overlap_before": sum(before) / len(before), "overlap_after": sum(after) / len(after)}


# ---- the grid -----------------------------------------------------------------------------------


def cell(
    g,
    k,
    partition,
    router,
    s=0,
    e=None,
    target="mixtral",
    calib=False,
    oracle=False,
    group="grid",
    plot=False,
):
    e = e if e is not None else g - s
    key = f"G{g}-S{s}-E{e}-k{k}-{partition}-{router}-{target}"
    return dict(
        key=key,
        g=g,
        s=s,
        e=e,
        k=k,
        partition=partition,
        router=router,
        target=target,
        calibrate=calib,
        oracle=oracle,
        group=group,
        plot=plot,
    )


def plan(quick: bool) -> list[dict]:
    cells = [cell(8, 8, "contiguous", "zeros", oracle=True, group="exact")]
    target = []
    for part in ("kmeans", "contiguous", "coactivation"):
        target.append(
            cell(
                64,
                16,
                part,
                "random",
                s=16,
                e=48,
                target="qwen2_moe",
                calib=True,
                oracle=True,
                group="target",
                plot=part == "coactivation",
            )
        )
    if quick:
        return cells + target[:1]
    cells += target
    cells.append(
        cell(
            64,
            8,
            "coactivation",
            "random",
            s=8,
            e=56,
            target="qwen2_moe",
            calib=True,
            oracle=True,
            group="target25",
        )
    )
    # grid, breadth first: every (G, k, partition) with a random router and its oracle, then
    # the data-free centroid and the calibrated activation router inits
    shapes = [(8, 4), (32, 16), (8, 2), (32, 8)]
    parts = ("contiguous", "kmeans", "coactivation")
    for router in ("random", "centroid", "activation"):
        for g, k in shapes:
            for part in parts:
                cells.append(cell(g, k, part, router, oracle=router == "random"))
    cells.append(
        cell(
            64,
            8,
            "contiguous",
            "random",
            s=8,
            e=56,
            target="qwen2_moe",
            calib=True,
            oracle=True,
            group="target25",
        )
    )
    return cells


def run_cell(c: dict, results: dict, dense_ppl: float) -> None:
    runs = results["runs"]
    rec = runs.get(c["key"], {})
    want_uniform = c["calibrate"] and c["group"].startswith("target")
    if rec.get("done") and ("calibrated_uniform_ppl" in rec or not want_uniform):
        log(f"skip {c['key']} (already measured)")
        return
    log(f"cell {c['key']}")
    out = os.path.join(WORK, c["key"])
    needs_data = (
        c["partition"] == "coactivation"
        or c["router"] == "activation"
        or (c["s"] and c["partition"] != "contiguous")
    )
    args = [
        UPCYCLE,
        "convert",
        "default",
        out,
        "--method",
        "granular",
        "-G",
        str(c["g"]),
        "-E",
        str(c["e"]),
        "-k",
        str(c["k"]),
        "--partition",
        c["partition"],
        "--router-init",
        c["router"],
        "-q",
        "--force",
    ]
    if c["s"]:
        args += ["-S", str(c["s"])]
    if c["target"] != "mixtral":
        args += ["--target", c["target"]]
    if needs_data:
        args += ["--calibration-data", DATA]
    rec.update({k: c[k] for k in ("g", "s", "e", "k", "partition", "router", "target", "group")})
    rec["calibration_data"] = needs_data
    rec["active_fraction"] = (c["s"] + (c["g"] - c["s"]) * c["k"] / c["e"]) / c["g"]
    rec.pop("error", None)
    runs[c["key"]] = rec
    t = time.perf_counter()
    sh(args)
    rec["convert_seconds"] = round(time.perf_counter() - t, 1)
    if "router_ppl" not in rec:
        rec["router_ppl"] = cli_eval(out)["perplexity"]
        rec["router_ratio"] = rec["router_ppl"] / dense_ppl
        save(results)
    if c["oracle"] and "oracle_ppl" not in rec:
        rec["oracle_ppl"] = oracle_eval(out)["perplexity"]
        rec["oracle_ratio"] = rec["oracle_ppl"] / dense_ppl
        save(results)
    if c["oracle"] and want_uniform and "error_oracle_ppl" not in rec:
        rec["error_oracle_ppl"] = oracle_eval(out, by="error")["perplexity"]
        rec["error_oracle_ratio"] = rec["error_oracle_ppl"] / dense_ppl
        save(results)
    if c["calibrate"]:
        cal = out + "-cal"
        rec.update(calibrate(out, cal))
        if "calibrated_ppl" not in rec:
            r = cli_eval(cal, plot=HEATMAP if c["plot"] else None)
            rec["calibrated_ppl"] = r["perplexity"]
            rec["calibrated_ratio"] = r["perplexity"] / dense_ppl
            save(results)
        if want_uniform:
            rec["calibrated_uniform_ppl"] = oracle_eval(cal, by="router")["perplexity"]
            rec["calibrated_uniform_ratio"] = rec["calibrated_uniform_ppl"] / dense_ppl
        shutil.rmtree(cal, ignore_errors=True)
    rec["done"] = True
    save(results)
    shutil.rmtree(out, ignore_errors=True)
    log(f"  {json.dumps({k: v for k, v in rec.items() if 'ratio' in k or 'overlap' in k})}")


def table(results: dict) -> str:
    """The markdown table of docs/benchmarks.md from quality.json."""
    runs = [r for r in results["runs"].values() if "router_ratio" in r]
    oracle = {}  # "norm" oracle ratio, or "norm / error" where both were measured
    for r in runs:
        if "oracle_ratio" in r:
            o = f"{r['oracle_ratio']:.3f}"
            if "error_oracle_ratio" in r:
                o += f" / {r['error_oracle_ratio']:.3f}"
            oracle[(r["g"], r["s"], r["e"], r["k"], r["partition"], r["target"])] = o
    dense = results["meta"]["dense_ppl"]
    rows = [
        "| config | active | partition | router | calibrated? | perplexity | ratio to dense "
        "| oracle ratio (norm / error) | router/oracle overlap |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| dense | 100% | - | - | - | {dense:.3f} | 1.000 | - | - |",
    ]
    for r in runs:
        shared = f" S={r['s']}" if r["s"] else ""
        cfg = f"G={r['g']}{shared} E={r['e']} k={r['k']} ({r['target']})"
        o = oracle.get((r["g"], r["s"], r["e"], r["k"], r["partition"], r["target"]))
        ostr = o if o is not None else "-"
        act = f"{100 * r['active_fraction']:.0f}%"
        head = f"| {cfg} | {act} | {r['partition']} | {r['router']}"
        before = f"{r['overlap_before']:.2f}" if "overlap_before" in r else "-"
        rows.append(
            f"{head} | no | {r['router_ppl']:.3f} | {r['router_ratio']:.3f} | {ostr} | {before} |"
        )
        if "calibrated_ratio" in r:
            rows.append(
                f"{head} | yes | {r['calibrated_ppl']:.3f} | {r['calibrated_ratio']:.3f} "
                f"| {ostr} | {r['overlap_after']:.2f} |"
            )
        if "calibrated_uniform_ratio" in r:
            rows.append(
                f"| {cfg} | {act} | {r['partition']} | calibrated choice, weights 1/k "
                f"| yes | {r['calibrated_uniform_ppl']:.3f} "
                f"| {r['calibrated_uniform_ratio']:.3f} | {ostr} | {r['overlap_after']:.2f} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="dense, exactness, one target cell")
    ap.add_argument("--only", help="run one group: exact, target, target25, grid")
    ap.add_argument("--table", action="store_true", help="print the markdown table and exit")
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
        oracle_weights="uniform 1/k over the top-k experts by output norm",
    )
    if "dense_ppl" not in results["meta"]:
        log("dense baseline")
        results["meta"]["dense_ppl"] = cli_eval("default")["perplexity"]
        save(results)
    dense = results["meta"]["dense_ppl"]
    log(f"dense perplexity {dense:.4f}")
    for c in plan(opts.quick):
        if opts.only and c["group"] != opts.only:
            continue
        try:
            run_cell(c, results, dense)
        except RuntimeError as e:  # record and go on
            log(f"  FAILED: {e}")
            results["runs"].setdefault(c["key"], {})["error"] = str(e)[-1000:]
            save(results)
            shutil.rmtree(os.path.join(WORK, c["key"]), ignore_errors=True)


if __name__ == "__main__":
    main()
