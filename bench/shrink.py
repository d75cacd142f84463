"""Shrinking MoE models: expert pruning and Drop-Upcycling on the default model (issue 19).

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/shrink.py                 # all three parts (2 jobs: 75-115 min)
    .venv/bin/python bench/shrink.py --part c        # one part: a, b or c
    .venv/bin/python bench/shrink.py --table         # the tables (and plot) from the JSON

(a) Prune a trained MixLoRA MoE. `upcycle train default RUN --data builtin:all --adapter
    mixlora -E 8 -k 2 --max-steps 200 --batch-size 2 --seq-len 128`, `upcycle merge RUN M`
    (a stock mixtral with 8 experts), then `upcycle prune M OUT --data builtin:all --experts N
    --by X --max-tokens 8192` for N in 6, 4, 2 and X in frequency, uncurl, merge, and `--by
    random --seed S` for S in 0, 1, 2 as the floor. Held-out loss per domain of every model;
    plot against the number of kept experts (bench/results/shrink.png).
(b) Task-aware pruning of the three-domain BTX model of bench/btx_bam.py (its branches and its
    `upcycle convert --method btx` with its defaults, imported from it; the converted model,
    without the MoE training stage): `upcycle prune BTX OUT --data builtin:code --experts N`
    for N = 1 (`--top-k 1`) and 2 with each criterion; held-out loss on code and the others.
(c) Drop-Upcycling against plain copies: `upcycle convert default OUT -E 4 -k 2 --method copy
    --seed S [--drop-ratio R]` for R in 0.5 and 0.25, then the same `upcycle train OUT RUN
    --data builtin:all --adapter full --max-steps 40 --lr 1e-4 --eval-steps 10 --seed S` for
    each, seeds 0, 1, 2; the run's held-out loss curve (metrics.jsonl) and the final held-out
    loss per domain of `upcycle merge RUN M`. Four experts, not eight, keep full training
    (about 8 GB of memory and 6 GB of disk per run) within this machine's means.

Held-out loss: the held-out split of each built-in domain (prose, code, manual), computed by
btx_bam.py's worker (one process per model, every domain) exactly like `upcycle eval MODEL
--data builtin:D --seq-len 256 --max-tokens 2048`; each run checks one value against the CLI.

Every step is a subprocess of the real CLI with OMP_NUM_THREADS=--threads, at most --jobs at
once (longest chains first; a job starts only when the disk has room for what it writes).
Expensive artefacts are cached in bench/work/shrink/ (git-ignored) with the settings that made
them, and every measured cell in bench/results/shrink.json with its settings (prunes also with
a hash of upcycle/prune/): a rerun with the same settings reuses them. Pruned and trained
models are deleted once measured. The JSON is written after every stage; tables go to stdout.
The prune stages need `upcycle prune --by random`; without it they are skipped with a
message (rerun later: everything else is reused).

The file, in order: helpers (subprocess, stamps), the results file (cells keyed by settings),
the scheduler (`Job`s run at most --jobs at once), evaluation (btx_bam.py's worker), one
section of job builders per part (a, b, c), the tables, targets and plot, and `main`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import btx_bam
from measure import log

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
WORK = ROOT / "bench" / "work" / "shrink"
RESULTS = ROOT / "bench" / "results" / "shrink.json"
PLOT = ROOT / "bench" / "results" / "shrink.png"
DOMAINS = btx_bam.DOMAINS  # prose, code, manual
CRITERIA = ("frequency", "uncurl", "merge")
DISK_MARGIN_GB = 1.5

_lock = threading.RLock()  # guards the results dict and its file


# ------------------------------------------------------------------ helpers


class StepFailed(Exception):
    """A CLI command failed: the command line and its last stderr line."""

    def __init__(self, command: str, error: str):
        super().__init__(f"{command}: {error}")
        self.command, self.error = command, error


def shown(args: list) -> str:
    """A command line as recorded: `upcycle ...`, paths relative to the repository."""
    args = [str(a) for a in args]
    if args[:3] == [PY, "-m", "upcycle"]:
        args = ["upcycle", *args[3:]]
    text = " ".join(a if " " not in a else repr(a) for a in args)
    return text.replace(str(ROOT) + "/", "")


def run(args: list, threads: int) -> tuple[str, float]:
    """Run a command with `threads` threads; (stdout, seconds). StepFailed on a non-zero exit."""
    try:
        return btx_bam.sh(args, threads, check=False)
    except btx_bam.CommandFailed as e:
        raise StepFailed(shown(args), str(e)) from None


def upcycle(*args) -> list:
    return [PY, "-m", "upcycle", *args]


def help_has(command: str, text: str) -> bool:
    out = subprocess.run(upcycle(command, "--help"), capture_output=True, text=True).stdout
    return text in out


def random_available() -> bool:
    return help_has("prune", "random")


def prune_code_hash() -> str:
    """Fingerprint of upcycle/prune/*.py: cached prune results are reused only for this code."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "upcycle" / "prune").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def disk_free_gb() -> float:
    WORK.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(WORK).free / 1e9


def rm(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def read_stamp(folder: Path, settings: dict) -> dict | None:
    """The record cached with a model folder, if it was made with these settings."""
    stamp = folder / "bench_shrink.json"
    if stamp.exists() and (folder / "config.json").exists():
        cached = json.loads(stamp.read_text())
        if cached.get("settings") == settings:
            return cached
    return None


def write_stamp(folder: Path, record: dict) -> None:
    (folder / "bench_shrink.json").write_text(json.dumps(record, indent=2) + "\n")


# ------------------------------------------------------------------ results file


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save(results: dict) -> None:
    with _lock:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, RESULTS)


def cell(results: dict, *keys: str) -> dict:
    """results[k1][k2]..., created as dicts on the way."""
    with _lock:
        d = results
        for k in keys:
            d = d.setdefault(k, {})
        return d


def cached_cell(results: dict, keys: tuple, settings: dict) -> dict | None:
    with _lock:
        d = results
        for k in keys:
            d = d.get(k, {})
        return d if d and d.get("settings") == settings else None


def put(results: dict, keys: tuple, value: dict) -> None:
    with _lock:
        cell(results, *keys[:-1])[keys[-1]] = value
    save(results)


# ------------------------------------------------------------------ scheduler


@dataclass
class Job:
    name: str
    fn: Callable[[], None]
    deps: tuple[str, ...] = ()
    disk_gb: float = 0.0  # what it writes at most (freed by itself or kept)
    note: str = field(default="")


def schedule(jobs: list[Job], workers: int, results: dict) -> None:
    """Run the jobs on `workers` threads, in list order among those whose dependencies are done
    and for which the disk has room (free space less what the running jobs may still write).
    A failed job is recorded in results["failures"]; the jobs that need it are skipped."""
    cond = threading.Condition()
    pending, running, done, failed = list(jobs), {}, set(), set()

    def pick():
        for j in list(pending):
            if any(d in failed for d in j.deps):
                pending.remove(j)
                failed.add(j.name)
                log(f"{j.name}: skipped (needs a failed step)")
        if not pending:
            return None
        room = disk_free_gb() - sum(r.disk_gb for r in running.values()) - DISK_MARGIN_GB
        for j in pending:
            if all(d in done for d in j.deps) and (not running or room >= j.disk_gb):
                return j
        return "wait"

    def worker():
        while True:
            with cond:
                while (j := pick()) == "wait":
                    cond.wait(timeout=20)
                if j is None:
                    cond.notify_all()
                    return
                pending.remove(j)
                running[j.name] = j
            ok = False
            try:
                j.fn()
                ok = True
            except StepFailed as e:
                log(f"{j.name}: FAILED: {e.command}\n    {e.error}")
                with _lock:
                    results.setdefault("failures", []).append(
                        {"job": j.name, "command": e.command, "error": e.error}
                    )
                save(results)
            except (Exception, SystemExit) as e:  # btx_bam's helpers exit on a failed command
                text = str(e).strip().splitlines()
                log(f"{j.name}: FAILED: {text[0] if text else type(e).__name__}")
                with _lock:
                    results.setdefault("failures", []).append(
                        {"job": j.name, "error": " | ".join(text[:1] + text[-1:])}
                    )
                save(results)
            with cond:
                del running[j.name]
                (done if ok else failed).add(j.name)
                cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ------------------------------------------------------------------ evaluation


def eval_settings(a) -> dict:
    return {"seq_len": a.eval_seq_len, "max_tokens": a.eval_tokens}


def btx_args(a) -> argparse.Namespace:
    """btx_bam.py's defaults (branches, BTX conversion), with this run's eval settings."""
    ba = btx_bam.parser().parse_args([])
    ba.threads = a.threads
    ba.eval_tokens = a.eval_tokens
    if ba.seq_len != a.eval_seq_len:  # btx_bam trains and evaluates with one --seq-len
        sys.exit(f"--eval-seq-len must be btx_bam.py's --seq-len ({ba.seq_len})")
    return ba


def evaluate(model: Path | str, a) -> dict:
    """{domain: {loss, tokens, expert_load?}} from btx_bam.py's worker (one process)."""
    return btx_bam.evaluate(str(model), btx_args(a), a.threads)


def mean_loss(ev: dict) -> float:
    return sum(ev[d]["loss"] for d in DOMAINS) / len(DOMAINS)


def dense_job(a, results: dict) -> Job:
    def fn():
        settings = eval_settings(a)
        if cached_cell(results, ("dense",), settings):
            log("dense: cached")
            return
        log("dense: held-out loss of the default model ...")
        put(results, ("dense",), {"settings": settings, "eval": evaluate("default", a)})

    return Job("dense", fn, disk_gb=0)


# ------------------------------------------------------------------ part (a)


def mix_settings(a) -> dict:
    return {
        "steps": a.mix_steps,
        "batch": a.mix_batch,
        "seq_len": a.train_seq_len,
        "lr": a.mix_lr,
        "seed": a.seed,
        "experts": 8,
        "top_k": 2,
        "max_eval_blocks": a.max_eval_blocks,
    }


def mix_train_job(a, results: dict) -> Job:
    merged, run_dir = WORK / "mix" / "merged", WORK / "mix" / "run"

    def fn():
        settings = mix_settings(a)
        record = read_stamp(merged, settings)
        if record:
            log(f"a: MixLoRA run cached ({merged})")
        else:
            rm(merged)
            cmd = upcycle(
                "train", "default", run_dir, "--data", "builtin:all", "--adapter", "mixlora",
                "-E", 8, "-k", 2, "--max-steps", a.mix_steps, "--batch-size", a.mix_batch,
                "--seq-len", a.train_seq_len, "--lr", a.mix_lr, "--seed", a.seed,
                "--max-eval-blocks", a.max_eval_blocks, "--force", "-q",
            )  # fmt: skip
            log(f"a: {shown(cmd)} ...")
            _, train_s = run(cmd, a.threads)
            merge_cmd = upcycle("merge", run_dir, merged, "--force", "-q")
            _, merge_s = run(merge_cmd, a.threads)
            config = json.loads((merged / "config.json").read_text())
            record = {
                "settings": settings,
                "command": shown(cmd),
                "merge_command": shown(merge_cmd),
                **btx_bam.run_record(run_dir),
                "train_wall_s": round(train_s, 1),
                "merge_wall_s": round(merge_s, 1),
                "model_type": config.get("model_type"),
                "architectures": config.get("architectures"),
            }
            write_stamp(merged, record)
            rm(run_dir)
            log(
                f"a: trained in {train_s / 60:.1f} min ({record['tokens_per_s']} tok/s), merged "
                f"in {merge_s:.0f} s: {record['architectures']}"
            )
        put(results, ("a", "train"), record)

    return Job("a:train", fn, disk_gb=3.5)


def mix_eval_job(a, results: dict) -> Job:
    merged = WORK / "mix" / "merged"

    def fn():
        settings = {"model": mix_settings(a), **eval_settings(a)}
        if cached_cell(results, ("a", "cells", "unpruned"), settings):
            log("a: unpruned eval cached")
            return
        log("a: held-out loss of the unpruned 8-expert model ...")
        ev = evaluate(merged, a)
        put(results, ("a", "cells", "unpruned"), {"settings": settings, "experts": 8, "eval": ev})
        check = btx_bam.check_against_cli(
            str(merged), "manual", ev["manual"]["loss"], btx_args(a), a.threads
        )
        check["model"] = shown([check["model"]])
        put(results, ("cli_check",), check)

    return Job("a:eval-unpruned", fn, deps=("a:train",), disk_gb=0)


def prune_job(
    part: str, label: str, source: Path, source_settings: dict, extra: list, a, results: dict
) -> Job:
    """`upcycle prune SOURCE OUT ...extra`, evaluate OUT, delete it; cached in results."""
    out = WORK / "prune" / f"{part}-{label}"

    def fn():
        settings = {
            "model": source_settings,
            "args": [str(x) for x in extra],
            "max_tokens": a.prune_tokens,
            "prune_code": prune_code_hash(),
            **eval_settings(a),
        }
        keys = (part, "cells", label)
        if cached_cell(results, keys, settings):
            log(f"{part}: {label}: cached")
            return
        cmd = upcycle(
            "prune", source, out, *extra, "--max-tokens", a.prune_tokens, "--force", "--json", "-q"
        )
        log(f"{part}: {shown(cmd)} ...")
        try:
            stdout, seconds = run(cmd, a.threads)
            prune_record = summarize_prune(stdout)
            config = json.loads((out / "config.json").read_text())
            ev = evaluate(out, a)
        finally:
            rm(out)
        put(
            results,
            keys,
            {
                "settings": settings,
                "command": shown(cmd),
                "prune_wall_s": round(seconds, 1),
                "experts": config.get("num_local_experts", config.get("num_experts")),
                "top_k": config.get("num_experts_per_tok"),
                "record": prune_record,
                "eval": ev,
            },
        )

    return Job(f"{part}:{label}", fn, disk_gb=2.5)


def summarize_prune(stdout: str) -> dict:
    """The prune record, compact: per layer one string saying what was kept (compact_layer),
    without the routing shares and merge weights; per-layer expert counts only if they vary."""
    try:
        rec = json.loads(stdout)
    except json.JSONDecodeError:
        return {"raw": stdout[-2000:]}
    if isinstance(rec, dict) and isinstance(rec.get("prune"), list):  # a whole upcycle.json
        rec = rec["prune"][-1]
    if not isinstance(rec, dict):
        return {"raw": str(rec)[:2000]}
    out = {k: v for k, v in rec.items() if k not in ("layers", "layer_experts")}
    counts = rec.get("layer_experts", {}).get("to")
    if isinstance(counts, list) and len(set(counts)) > 1:
        out["layer_experts"] = rec["layer_experts"]
    layers = rec.get("layers")
    if isinstance(layers, list | dict):
        items = layers.items() if isinstance(layers, dict) else enumerate(layers)
        out["layers"] = {str(i): compact_layer(x) for i, x in items if isinstance(x, dict)}
    return out


def compact_layer(layer: dict) -> str:
    """ "0,3,4" (kept experts); uncurl "kept 2,3 of 2/0+3" (its clusters); merge "0+1/2"."""
    clusters = layer.get("clusters")
    if clusters and isinstance(clusters[0], dict):  # merge: {members, weights}
        return "/".join("+".join(map(str, c["members"])) for c in clusters)
    kept = ",".join(map(str, layer.get("kept", [])))
    if clusters:
        return f"kept {kept} of " + "/".join("+".join(map(str, c)) for c in clusters)
    return kept


def part_a_jobs(a, results: dict, prune: bool) -> list[Job]:
    jobs = [mix_train_job(a, results), mix_eval_job(a, results)]
    if not prune:
        return jobs
    merged = WORK / "mix" / "merged"
    for n in a.keep:
        for by in CRITERIA:
            extra = ["--data", "builtin:all", "--experts", n, "--by", by]
            job = prune_job("a", f"{by}-{n}", merged, mix_settings(a), extra, a, results)
            job.deps = ("a:train",)
            jobs.append(job)
        for s in a.random_seeds:
            extra = ["--data", "builtin:all", "--experts", n, "--by", "random", "--seed", s]
            job = prune_job("a", f"random-s{s}-{n}", merged, mix_settings(a), extra, a, results)
            job.deps = ("a:train",)
            jobs.append(job)
    return jobs


# ------------------------------------------------------------------ part (b)


def btx_settings(a) -> dict:
    """What btx_bam.py's branches and BTX conversion are made with (its defaults)."""
    ba = btx_args(a)
    return {
        "branch_steps": ba.branch_steps,
        "branch_batch": ba.branch_batch,
        "seq_len": ba.seq_len,
        "branch_lr": ba.branch_lr,
        "warmup": ba.warmup,
        "seed": ba.seed,
        "top_k": ba.top_k,
        "router_init": ba.router_init,
    }


def branch_job(domain: str, a, results: dict) -> Job:
    def fn():
        record = btx_bam.branch(domain, btx_args(a), a.threads)
        put(results, ("b", "branches", domain), record)

    return Job(f"b:branch-{domain}", fn, disk_gb=1.2)


def btx_job(a, results: dict) -> Job:
    model = btx_bam.WORK / "btx"

    def fn():
        settings = btx_settings(a)
        record = read_stamp(model, settings)
        if record:
            log(f"b: BTX cached ({model})")
        else:
            branches = [btx_bam.WORK / f"branch-{d}" for d in DOMAINS]
            record = {
                "settings": settings,
                **btx_bam.convert("btx", btx_args(a), branches, a.threads),
            }
            record["path"] = shown([record["path"]])
            write_stamp(model, record)
        put(results, ("b", "convert"), record)
        settings = {"model": settings, **eval_settings(a)}
        if cached_cell(results, ("b", "cells", "unpruned"), settings):
            log("b: unpruned eval cached")
            return
        ev = evaluate(model, a)
        put(results, ("b", "cells", "unpruned"), {"settings": settings, "experts": 3, "eval": ev})

    deps = tuple(f"b:branch-{d}" for d in DOMAINS)
    return Job("b:btx", fn, deps=deps, disk_gb=1.5)


def part_b_jobs(a, results: dict, prune: bool) -> list[Job]:
    jobs = [branch_job(d, a, results) for d in DOMAINS] + [btx_job(a, results)]
    if not prune:
        return jobs
    model = btx_bam.WORK / "btx"
    for n in (1, 2):
        for by in CRITERIA:
            extra = ["--data", "builtin:code", "--experts", n, "--by", by]
            if n == 1:
                extra += ["--top-k", 1]
            job = prune_job("b", f"{by}-{n}", model, btx_settings(a), extra, a, results)
            job.deps = ("b:btx",)
            jobs.append(job)
    return jobs


# ------------------------------------------------------------------ part (c)


def variant_label(ratio: float) -> str:
    return "copy" if ratio == 0 else f"drop{ratio:g}"


def drop_job(ratio: float, seed: int, a, results: dict) -> Job:
    label = f"{variant_label(ratio)}-s{seed}"
    src, run_dir, merged = (WORK / "drop" / f"{x}-{label}" for x in ("src", "run", "merged"))

    def fn():
        settings = {
            "experts": 4,
            "top_k": 2,
            "drop_ratio": ratio,
            "seed": seed,
            "steps": a.drop_steps,
            "batch": a.drop_batch,
            "seq_len": a.train_seq_len,
            "lr": a.drop_lr,
            "eval_steps": a.drop_eval_steps,
            "max_eval_blocks": a.max_eval_blocks,
            **eval_settings(a),
        }
        keys = ("c", "runs", label)
        if cached_cell(results, keys, settings):
            log(f"c: {label}: cached")
            return
        convert = ["convert", "default", src, "-E", 4, "-k", 2, "--method", "copy"]
        convert += ["--seed", seed, "--force", "-q"]
        if ratio:
            convert += ["--drop-ratio", ratio]
        train = upcycle(
            "train", src, run_dir, "--data", "builtin:all", "--adapter", "full",
            "--max-steps", a.drop_steps, "--batch-size", a.drop_batch,
            "--seq-len", a.train_seq_len, "--lr", a.drop_lr, "--seed", seed,
            "--eval-steps", a.drop_eval_steps, "--max-eval-blocks", a.max_eval_blocks,
            "--force", "-q",
        )  # fmt: skip
        merge = upcycle("merge", run_dir, merged, "--force", "-q")
        try:
            log(f"c: {label}: convert, train ({a.drop_steps} steps), merge ...")
            _, convert_s = run(upcycle(*convert), a.threads)
            _, train_s = run(train, a.threads)
            rm(src, run_dir / "checkpoints")  # the final weights at the run's root stay
            _, merge_s = run(merge, a.threads)
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            curve = [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r]
            record = btx_bam.run_record(run_dir)
            rm(run_dir)
            ev = evaluate(merged, a)
        finally:
            rm(src, run_dir, merged)
        log(
            f"c: {label}: trained in {train_s / 60:.1f} min ({record['tokens_per_s']} tok/s); "
            f"curve {' '.join(f'{s}:{x:.3f}' for s, x in curve)}; mean {mean_loss(ev):.4f}"
        )
        put(
            results,
            keys,
            {
                "settings": settings,
                "commands": [shown(upcycle(*convert)), shown(train), shown(merge)],
                "convert_wall_s": round(convert_s, 1),
                "train_wall_s": round(train_s, 1),
                "merge_wall_s": round(merge_s, 1),
                **record,
                "curve": curve,
                "eval": ev,
            },
        )

    return Job(f"c:{label}", fn, disk_gb=7.5)


def part_c_jobs(a, results: dict) -> list[Job]:
    return [drop_job(r, s, a, results) for s in a.seeds for r in (0.0, *a.ratios)]


# ------------------------------------------------------------------ tables and plot


def fmt_delta(x: float, base: float) -> str:
    return f"{x:.4f} ({100 * (x / base - 1):+.1f}%)"


def random_summary(cells: dict, n: int) -> dict | None:
    """{domain: (mean, min, max)} over the random seeds that kept n experts."""
    runs = [c for k, c in cells.items() if k.startswith("random-s") and k.endswith(f"-{n}")]
    if not runs:
        return None
    out = {}
    for d in [*DOMAINS, "mean"]:
        xs = [mean_loss(c["eval"]) if d == "mean" else c["eval"][d]["loss"] for c in runs]
        out[d] = (statistics.mean(xs), min(xs), max(xs), len(xs))
    return out


def table_a(results: dict) -> list[str]:
    cells = results.get("a", {}).get("cells", {})
    base = cells.get("unpruned")
    if not base:
        return []
    lines = [
        "\n(a) MixLoRA 8 experts, pruned with builtin:all: held-out loss (change vs unpruned)\n"
    ]
    lines.append("| kept | criterion | " + " | ".join(DOMAINS) + " | mean |")
    lines.append("|---" * (len(DOMAINS) + 3) + "|")
    b = {d: base["eval"][d]["loss"] for d in DOMAINS}
    b["mean"] = mean_loss(base["eval"])
    lines.append("| 8 | unpruned | " + " | ".join(f"{b[d]:.4f}" for d in [*DOMAINS, "mean"]) + " |")
    dense = results.get("dense", {}).get("eval")
    for n in sorted({c["settings"]["args"][3] for k, c in cells.items() if k != "unpruned"},
                    key=int, reverse=True):  # fmt: skip
        for by in CRITERIA:
            c = cells.get(f"{by}-{n}")
            if c:
                losses = [c["eval"][d]["loss"] for d in DOMAINS] + [mean_loss(c["eval"])]
                row = " | ".join(
                    fmt_delta(x, b[d]) for x, d in zip(losses, [*DOMAINS, "mean"], strict=True)
                )
                lines.append(f"| {n} | {by} | {row} |")
        r = random_summary(cells, int(n))
        if r:
            row = " | ".join(
                f"{fmt_delta(r[d][0], b[d])} [{r[d][1]:.3f}-{r[d][2]:.3f}]"
                for d in [*DOMAINS, "mean"]
            )
            lines.append(f"| {n} | random (mean of {r['mean'][3]} seeds) [min-max] | {row} |")
    if dense:
        row = " | ".join(f"{dense[d]['loss']:.4f}" for d in DOMAINS)
        lines.append(f"| - | dense default model | {row} | {mean_loss(dense):.4f} |")
    lines += targets_a(results)
    return lines


def targets_a(results: dict) -> list[str]:
    cells = results.get("a", {}).get("cells", {})
    base = cells.get("unpruned")
    r = random_summary(cells, 4)
    best = {}
    for by in CRITERIA:
        c = cells.get(f"{by}-4")
        if c:
            best[by] = max(c["eval"][d]["loss"] / base["eval"][d]["loss"] - 1 for d in DOMAINS)
    if not base or not best:
        return []
    by = min(best, key=best.get)
    c = cells[f"{by}-4"]
    within = best[by] <= 0.05
    lines = [
        f"\nTarget (a), 4 of 8 experts: best criterion {by} (worst domain {100 * best[by]:+.1f}%"
        f" vs unpruned): within 5% in every domain: {'MET' if within else 'NOT MET'}"
    ]
    if r:
        seeds = [k for k in cells if k.startswith("random-s") and k.endswith("-4")]
        beats = all(
            c["eval"][d]["loss"] < cells[k]["eval"][d]["loss"] for k in seeds for d in DOMAINS
        )
        beats_mean = all(c["eval"][d]["loss"] < r[d][0] for d in DOMAINS)
        lines.append(
            f"Target (a): {by} beats random in every domain: every seed {'MET' if beats else 'NOT MET'}"
            f", the seeds' mean {'MET' if beats_mean else 'NOT MET'}"
        )
        for k in CRITERIA:
            ck = cells.get(f"{k}-4")
            if ck:
                wins = sum(
                    ck["eval"][d]["loss"] < cells[s]["eval"][d]["loss"]
                    for s in seeds
                    for d in DOMAINS
                )
                lines.append(
                    f"  {k}-4 below random: {wins} of {len(seeds) * len(DOMAINS)} (seed, domain) cells"
                )
    return lines


def table_b(results: dict) -> list[str]:
    cells = results.get("b", {}).get("cells", {})
    base = cells.get("unpruned")
    if not base:
        return []
    lines = ["\n(b) BTX (prose/code/manual experts), pruned with builtin:code: held-out loss\n"]
    lines.append("| kept | criterion | " + " | ".join(DOMAINS) + " | experts kept: set x layers |")
    lines.append("|---" * (len(DOMAINS) + 3) + "|")
    b = {d: base["eval"][d]["loss"] for d in DOMAINS}
    lines.append("| 3 | unpruned | " + " | ".join(f"{b[d]:.4f}" for d in DOMAINS) + " | |")
    for n in (2, 1):
        for by in CRITERIA:
            c = cells.get(f"{by}-{n}")
            if c:
                row = " | ".join(fmt_delta(c["eval"][d]["loss"], b[d]) for d in DOMAINS)
                lines.append(f"| {n} | {by} | {row} | {kept_summary(c)} |")
    dense = results.get("dense", {}).get("eval")
    if dense:
        row = " | ".join(f"{dense[d]['loss']:.4f}" for d in DOMAINS)
        lines.append(f"| - | dense default model | {row} | |")
    ones = {by: cells[f"{by}-1"] for by in CRITERIA if f"{by}-1" in cells}
    if ones:
        by = min(ones, key=lambda k: ones[k]["eval"]["code"]["loss"])
        change = ones[by]["eval"]["code"]["loss"] / b["code"] - 1
        lines.append(
            f"\nTarget (b), 1 expert pruned with code data: best {by}, code {100 * change:+.2f}%"
            f" vs unpruned: within 2%: {'MET' if change <= 0.02 else 'NOT MET'}"
        )
    return lines


def kept_summary(c: dict) -> str:
    """Which source experts the pruned model keeps (0 prose, 1 code, 2 manual; merge: its
    clusters, members joined by +), counted over layers: e.g. "code x30"."""
    layers = c.get("record", {}).get("layers") or {}
    names = ("prose", "code", "manual")

    def name(x: str) -> str:
        return "+".join(names[int(m)] if int(m) < len(names) else m for m in x.split("+"))

    counts: dict[str, int] = {}
    for layer in layers.values():
        kept = layer.split(" of ")[0].removeprefix("kept ")
        key = "/".join(name(x) for x in kept.replace(",", "/").split("/") if x)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def table_c(results: dict) -> list[str]:
    runs = results.get("c", {}).get("runs", {})
    if not runs:
        return []
    lines = ["\n(c) Copy vs Drop-Upcycling, 4 experts, top-2, --adapter full on builtin:all\n"]
    steps = sorted({s for r in runs.values() for s, _ in r["curve"]})
    lines.append(
        "| variant | seed | "
        + " | ".join(f"run eval @{s}" for s in steps)
        + " | "
        + " | ".join(DOMAINS)
        + " | mean |"
    )
    lines.append("|---" * (len(steps) + len(DOMAINS) + 3) + "|")
    variants = sorted({k.rsplit("-s", 1)[0] for k in runs}, key=lambda v: (v != "copy", v))
    for v in variants:
        for k in sorted(k for k in runs if k.rsplit("-s", 1)[0] == v):
            r = runs[k]
            curve = dict(r["curve"])
            cells = [f"{curve[s]:.4f}" if s in curve else "" for s in steps]
            cells += [f"{r['eval'][d]['loss']:.4f}" for d in DOMAINS]
            cells.append(f"{mean_loss(r['eval']):.4f}")
            lines.append(f"| {v} | {k.rsplit('-s', 1)[1]} | " + " | ".join(cells) + " |")
    lines.append("\nMedian over seeds\n")
    lines.append("| variant | seeds | " + " | ".join(f"@{s}" for s in steps) + " | "
                 + " | ".join(DOMAINS) + " | mean |")  # fmt: skip
    lines.append("|---" * (len(steps) + len(DOMAINS) + 3) + "|")
    for v in variants:
        rs = [runs[k] for k in runs if k.rsplit("-s", 1)[0] == v]
        med = []
        for s in steps:
            xs = [dict(r["curve"])[s] for r in rs if s in dict(r["curve"])]
            med.append(f"{statistics.median(xs):.4f}" if xs else "")
        med += [f"{statistics.median(r['eval'][d]['loss'] for r in rs):.4f}" for d in DOMAINS]
        med.append(f"{statistics.median(mean_loss(r['eval']) for r in rs):.4f}")
        lines.append(f"| {v} | {len(rs)} | " + " | ".join(med) + " |")
    seeds = sorted({k.rsplit("-s", 1)[1] for k in runs}, key=int)
    for ratio in ("drop0.5", "drop0.25"):
        pairs = [s for s in seeds if f"{ratio}-s{s}" in runs and f"copy-s{s}" in runs]
        if not pairs:
            continue
        wins_final = sum(
            mean_loss(runs[f"{ratio}-s{s}"]["eval"]) < mean_loss(runs[f"copy-s{s}"]["eval"])
            for s in pairs
        )
        wins_run = sum(
            runs[f"{ratio}-s{s}"]["curve"][-1][1] < runs[f"copy-s{s}"]["curve"][-1][1]
            for s in pairs
        )
        verdict = "MET" if wins_final >= 2 else "NOT MET"
        extra = f" -> target (c) {verdict}" if ratio == "drop0.5" else ""
        lines.append(
            f"\n{ratio} below copy after the same steps: {wins_final} of {len(pairs)} seeds "
            f"(mean held-out loss of the 3 domains), {wins_run} of {len(pairs)} (the run's own "
            f"final eval){extra}"
        )
    return lines


def plot_a(results: dict) -> bool:
    cells = results.get("a", {}).get("cells", {})
    base = cells.get("unpruned")
    if not base or len(cells) < 2:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot: matplotlib is not installed; tables only")
        return False
    ns = sorted({int(c["settings"]["args"][3]) for k, c in cells.items() if k != "unpruned"})
    xs_all = [8, *sorted(ns, reverse=True)]
    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(4.2 * len(DOMAINS), 3.8))
    dense = results.get("dense", {}).get("eval")
    for ax, d in zip(axes, DOMAINS, strict=True):
        b = base["eval"][d]["loss"]
        ax.axhline(b, color="black", lw=1, ls="--", label="unpruned (8 experts)")
        for by, marker in zip(CRITERIA, "osD", strict=True):
            pts = [(n, cells[f"{by}-{n}"]["eval"][d]["loss"]) for n in ns if f"{by}-{n}" in cells]
            if pts:
                pts = [(8, b), *sorted(pts, reverse=True)]
                ax.plot(*zip(*pts, strict=True), marker=marker, label=by)
        rs = [(n, random_summary(cells, n)) for n in ns]
        rs = [(n, r[d]) for n, r in rs if r]
        if rs:
            rs = sorted(rs, reverse=True)
            x = [8] + [n for n, _ in rs]
            ax.plot(x, [b] + [r[0] for _, r in rs], color="grey", marker="x", label="random (mean)")
            ax.fill_between(x, [b] + [r[1] for _, r in rs], [b] + [r[2] for _, r in rs],
                            color="grey", alpha=0.2, label="random (min-max)")  # fmt: skip
        # the dense model is far above every pruned one: named in the title, not drawn
        ax.set_title(f"held-out {d}" + (f" (dense model: {dense[d]['loss']:.3f})" if dense else ""))
        ax.set_xlabel("experts kept (of 8)")
        ax.set_xticks(xs_all)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (mean token NLL)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("Pruning an 8-expert MixLoRA merge of SmolLM2-135M (upcycle prune)")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
    return True


def print_tables(results: dict) -> None:
    lines = table_a(results) + table_b(results) + table_c(results)
    print("\n".join(lines))
    if results.get("failures"):
        print("\nFailed steps:")
        for f in results["failures"]:
            print(f"- {f.get('job')}: `{f.get('command', '')}`: {f['error']}")
    if plot_a(results):
        log(f"plot: {shown([PLOT])}")


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("a", "b", "c", "all"), default="all")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads of every subprocess")
    ap.add_argument("--jobs", type=int, default=2, help="heavy subprocesses at once")
    ap.add_argument("--seed", type=int, default=0, help="(a) training seed")
    ap.add_argument("--train-seq-len", type=int, default=128, help="(a), (c) training blocks")
    ap.add_argument("--max-eval-blocks", type=int, default=16, help="the runs' own eval")
    ap.add_argument("--mix-steps", type=int, default=200)
    ap.add_argument("--mix-batch", type=int, default=2)
    ap.add_argument("--mix-lr", type=float, default=2e-4)
    ap.add_argument("--keep", type=int, nargs="+", default=[6, 4, 2], help="(a) experts kept")
    ap.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--prune-tokens", type=int, default=8192, help="calibration tokens")
    ap.add_argument("--drop-steps", type=int, default=40)
    ap.add_argument("--drop-batch", type=int, default=2)
    ap.add_argument("--drop-lr", type=float, default=1e-4)
    ap.add_argument("--drop-eval-steps", type=int, default=10)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(c) seeds")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per domain")
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--skip-prune", action="store_true", help="only the training stages")
    ap.add_argument("--table", action="store_true", help="print the tables from the JSON")
    a = ap.parse_args()

    results = load_results()
    if a.table:
        print_tables(results)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    btx_bam.set_paths(WORK / "btx", WORK / "btx" / "unused.json")
    btx_bam.WORK.mkdir(parents=True, exist_ok=True)

    prune = not a.skip_prune
    if prune and a.part in ("a", "b", "all") and not random_available():
        log(
            "prune stages SKIPPED: `upcycle prune --help` has no --by random yet "
            "(rerun when it has; the other stages are cached)"
        )
        prune = False
    with _lock:
        results.update(
            date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            command=" ".join(["bench/shrink.py", *sys.argv[1:]]),
            options=vars(a),
            git=btx_bam.git_state(),
            prune_code=prune_code_hash(),
        )
        results["failures"] = []  # this run's
    save(results)

    jobs = [dense_job(a, results)]
    # longest chains first: the MixLoRA run, the branches, then Drop-Upcycling, then prunes
    if a.part in ("a", "all"):
        jobs += part_a_jobs(a, results, prune=False)
    if a.part in ("b", "all"):
        jobs += part_b_jobs(a, results, prune=False)
    if a.part in ("c", "all"):
        jobs += part_c_jobs(a, results)
    if prune and a.part in ("a", "all"):
        jobs += part_a_jobs(a, results, prune=True)[2:]
    if prune and a.part in ("b", "all"):
        jobs += part_b_jobs(a, results, prune=True)[4:]
    t = time.perf_counter()
    schedule(jobs, a.jobs, results)
    with _lock:
        results["wall_s"] = round(time.perf_counter() - t, 1)
    save(results)
    print_tables(results)
    log(f"done; results in {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
