"""BTX and BAM from three domain branches of the default model: quality and inference speed.

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/btx_bam.py                        # everything (1 thread: 28-52 min)
    .venv/bin/python bench/btx_bam.py --skip-bam             # the BTX part only
    .venv/bin/python bench/btx_bam.py --mode experts-lora    # train the MoEs with LoRA experts

1. Branches: one per domain (builtin:prose, builtin:code, builtin:manual), each
   `upcycle train default RUN --data builtin:X --adapter lora ...` then `upcycle merge RUN
   BRANCH` (a merged LoRA is a dense model). They are cached in bench/work/btx_bam/ (git-ignored)
   with the settings that made them; a rerun with the same settings reuses them and their
   held-out losses (and the seed's).
2. Mix: `upcycle convert default OUT --method btx --experts-from BRANCH...` and the same with
   `--method bam` (attention experts too). Router init: `hidden` from a few training-split
   prompts of each domain by default (`--router-init`).
3. Train each MoE with the same budget (steps, batch, sequence length, lr, seed) on the union of
   the domains (`--data builtin:all`) with `upcycle train --adapter MODE` (`--mode`: `full` by
   default, `experts-lora` or `router`), then `upcycle merge`. If a merge is refused, the run
   itself (base + adapter, loaded with peft) is evaluated and the refusal is recorded.
4. Held-out loss per domain of the seed, the branches, BTX and BAM before and after training:
   each model is loaded once by a worker process that evaluates every domain exactly like
   `upcycle eval MODEL --data builtin:X --seq-len L --max-tokens N` (same texts, blocks and
   loss, the seed's tokenizer, which every model here carries; each run checks one loss
   against the CLI).
5. Inference speed: a worker loads the seed, BTX and BAM (as converted) and times a no-grad
   forward pass over the same (batch, seq_len) block of held-out tokens, interleaved in rotating
   order after a warm-up round; median tokens/s.

Steps that need BAM are skipped with a message when `upcycle convert --help` has no
`--attention-experts` (BAM not available in this checkout). All subprocesses run with
OMP_NUM_THREADS=MKL_NUM_THREADS=--threads. Results: tables on stdout and
bench/results/btx_bam-MODE.json (written after every stage).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import log, thread_env

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
WORK = ROOT / "bench" / "work" / "btx_bam"
RESULTS = ROOT / "bench" / "results" / "btx_bam-{mode}.json"  # one file per --mode
DOMAINS = ("prose", "code", "manual")
MODES = ("experts-lora", "full", "router")
DEFAULT_LR = {"experts-lora": 1e-3, "router": 1e-3, "full": 5e-5}
PROMPTS_PER_DOMAIN, PROMPT_CHARS = 16, 400


def set_paths(work: Path, results: Path) -> None:
    global WORK, RESULTS
    WORK, RESULTS = work, results


def env(threads: int) -> dict:
    return thread_env(threads)


def sh(args: list, threads: int, check: bool = True) -> tuple[str, float]:
    """Run a command; (stdout, seconds). Exits with the command's stderr tail on failure, or with
    check=False raises CommandFailed carrying its last stderr line."""
    args = [str(a) for a in args]
    t = time.perf_counter()
    p = subprocess.run(
        args, env=env(threads), capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    seconds = time.perf_counter() - t
    if p.returncode:
        if not check:
            lines = p.stderr.strip().splitlines()
            raise CommandFailed(lines[-1] if lines else f"exit code {p.returncode}")
        shown = " ".join(a if " " not in a else repr(a) for a in args)
        sys.exit(f"FAILED ({p.returncode}): {shown}\n{p.stderr[-3000:]}")
    return p.stdout, seconds


class CommandFailed(Exception):
    pass


def upcycle(*args) -> list:
    return [PY, "-m", "upcycle", *args]


def git_state() -> str:
    """Short HEAD hash, "+ uncommitted changes" when the tree differs (read-only git calls)."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return head + (" + uncommitted changes" if git("status", "--porcelain").strip() else "")


def bam_available() -> bool:
    out = subprocess.run(upcycle("convert", "--help"), capture_output=True, text=True).stdout
    return "--attention-experts" in out


def adapter_available(mode: str) -> bool:
    """Whether `upcycle train --help` lists `mode` in the help of --adapter."""
    out = subprocess.run(upcycle("train", "--help"), capture_output=True, text=True).stdout
    help_text = re.search(r"^\s+--adapter \w+(.*?)^\s+-", out, re.S | re.M)
    return bool(help_text and re.search(rf"\b{re.escape(mode)}\b", help_text.group(1)))


# ------------------------------------------------------------------ results file


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, RESULTS)


# ------------------------------------------------------------------ stages


def train_args(steps: int, batch: int, seq_len: int, lr: float, warmup: int, seed: int) -> list:
    return [
        "--max-steps", steps, "--batch-size", batch, "--seq-len", seq_len, "--lr", lr,
        "--warmup-steps", warmup, "--seed", seed, "--max-eval-blocks", 2, "--force", "-q",
    ]  # fmt: skip


def run_record(run: Path) -> dict:
    """Tokens, tokens/s and the run's own held-out loss before/after (2 blocks) from its files."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    last = steps[-1]
    return {
        "tokens": last["tokens"],
        "train_seconds": round(last["elapsed_s"], 1),
        "tokens_per_s": round(last["tokens"] / last["elapsed_s"], 1),
        "final_train_loss": round(last["lm_loss"], 4),
        "run_eval_loss": [round(x, 4) for x in evals],
    }


def branch(domain: str, a, threads: int) -> dict:
    """bench/work/btx_bam/branch-DOMAIN: LoRA-trained on builtin:DOMAIN and merged (cached)."""
    settings = {
        "domain": domain,
        "steps": a.branch_steps,
        "batch": a.branch_batch,
        "seq_len": a.seq_len,
        "lr": a.branch_lr,
        "warmup": a.warmup,
        "seed": a.seed,
        "r": 16,
        "alpha": 32,
    }
    out, run = WORK / f"branch-{domain}", WORK / f"run-branch-{domain}"
    stamp = out / "bench_branch.json"
    if stamp.exists() and (out / "config.json").exists():
        cached = json.loads(stamp.read_text())
        if cached["settings"] == settings:
            log(f"branch {domain}: cached ({out})")
            return cached
    log(f"branch {domain}: upcycle train --adapter lora ({a.branch_steps} steps) ...")
    shutil.rmtree(out, ignore_errors=True)
    cmd = upcycle(
        "train", "default", run, "--data", f"builtin:{domain}", "--adapter", "lora",
        *train_args(a.branch_steps, a.branch_batch, a.seq_len, a.branch_lr, a.warmup, a.seed),
    )  # fmt: skip
    _, train_s = sh(cmd, threads)
    _, merge_s = sh(upcycle("merge", run, out, "--force", "-q"), threads)
    record = {
        "settings": settings,
        "command": " ".join(map(str, cmd[2:])).replace(str(ROOT) + "/", ""),
        **run_record(run),
        "train_wall_s": round(train_s, 1),
        "merge_wall_s": round(merge_s, 1),
    }
    stamp.write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(run, ignore_errors=True)  # the merged model is what the next steps use
    log(
        f"branch {domain}: trained in {train_s / 60:.1f} min ({record['tokens_per_s']} tok/s), "
        f"merged in {merge_s:.0f} s"
    )
    return record


def prompt_files() -> list[Path]:
    """One file per domain: short one-line prompts from its training (calibration) split."""
    sys.path.insert(0, str(ROOT))
    from upcycle.data import builtin_corpus

    files = []
    for domain in DOMAINS:
        docs = builtin_corpus("calibration", domain)
        step = max(1, len(docs) // PROMPTS_PER_DOMAIN)
        lines = [re.sub(r"\s+", " ", d).strip()[:PROMPT_CHARS] for d in docs[::step]]
        path = WORK / f"prompts-{domain}.txt"
        path.write_text("\n".join(lines[:PROMPTS_PER_DOMAIN]) + "\n")
        files.append(path)
    return files


def convert(method: str, a, branches: list[Path], threads: int) -> dict:
    out = WORK / method
    cmd = ["convert", "default", out, "--method", method, "--top-k", a.top_k, "--force", "-q"]
    for b in branches:
        cmd += ["--experts-from", b]
    cmd += ["--router-init", a.router_init]
    if a.router_init == "hidden":
        for p in prompt_files():
            cmd += ["--expert-prompts", f"@{p}"]
    if method == "bam":
        cmd += ["--attention-experts", a.attention_experts]
        if a.parallel_attention:
            cmd.append("--parallel-attention")
    log(f"{method}: upcycle convert ...")
    _, seconds = sh(upcycle(*cmd), threads)
    log(f"{method}: converted in {seconds:.0f} s")
    shown = " ".join(map(str, cmd)).replace(str(ROOT) + "/", "")
    return {"path": str(out), "convert_s": round(seconds, 1), "command": f"upcycle {shown}"}


def train_moe(method: str, a, threads: int) -> dict:
    src, run, out = WORK / method, WORK / f"run-{method}", WORK / f"{method}-trained"
    cmd = upcycle(
        "train", src, run, "--data", "builtin:all", "--adapter", a.mode,
        *train_args(a.moe_steps, a.moe_batch, a.seq_len, a.moe_lr, a.warmup, a.seed),
    )  # fmt: skip
    log(f"{method}: upcycle train --adapter {a.mode} ({a.moe_steps} steps) ...")
    _, train_s = sh(cmd, threads)
    record = {
        "path": str(out),
        "command": " ".join(map(str, cmd[2:])).replace(str(ROOT) + "/", ""),
        **run_record(run),
        "train_wall_s": round(train_s, 1),
    }
    try:
        _, merge_s = sh(upcycle("merge", run, out, "--force", "-q"), threads, check=False)
        record["merge_wall_s"] = round(merge_s, 1)
        shutil.rmtree(run, ignore_errors=True)
        merged = f"merged in {merge_s:.0f} s"
    except CommandFailed as e:  # evaluate the run itself: base + adapter, loaded with peft
        record.update(path=str(run), merge_error=str(e))
        merged = f"NOT MERGED ({e}); evaluating the run (base + adapter) instead"
    log(f"{method}: trained in {train_s / 60:.1f} min ({record['tokens_per_s']} tok/s), {merged}")
    return record


def evaluate(model: str, a, threads: int, cached: bool = False) -> dict:
    """{domain: {loss, tokens, expert_load?}} from one worker process.

    cached: reuse an earlier result for the same model files and evaluation settings (the seed,
    and branches, whose folders change only when retrained), from WORK/eval-cache.json.
    """
    cache_file = WORK / "eval-cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    folder = Path(model)
    stamp = max((f.stat().st_mtime for f in folder.iterdir()), default=0) if folder.is_dir() else 0
    key = f"{model}|{stamp}|seq_len={a.seq_len}|tokens={a.eval_tokens}"
    if cached and key in cache:
        log(f"  eval {folder.name}: cached")
        return cache[key]
    out, seconds = sh(
        [PY, __file__, "_worker", "eval", model, a.seq_len, a.eval_tokens, threads], threads
    )
    res = json.loads(out.strip().splitlines()[-1])
    losses = ", ".join(f"{d} {r['loss']:.4f}" for d, r in res.items())
    log(f"  eval {Path(model).name}: {losses} ({seconds:.0f} s)")
    if cached:
        cache[key] = res
        cache_file.write_text(json.dumps(cache, indent=1) + "\n")
    return res


def check_against_cli(model: str, domain: str, worker_loss: float, a, threads: int) -> dict:
    out, _ = sh(
        upcycle("eval", model, "--data", f"builtin:{domain}", "--seq-len", a.seq_len,
                "--max-tokens", a.eval_tokens, "--json", "-q"),
        threads,
    )  # fmt: skip
    cli = json.loads(out)["loss"]
    log(f"  check: upcycle eval {domain} loss {cli:.6f}, worker {worker_loss:.6f}")
    if abs(cli - worker_loss) > 1e-4:
        sys.exit(f"worker eval differs from upcycle eval: {worker_loss} vs {cli}")
    return {"model": model, "domain": domain, "cli_loss": cli, "worker_loss": worker_loss}


def speed(models: dict[str, str], a, threads: int) -> dict:
    log(f"speed: {', '.join(models)}, {a.speed_reps} interleaved rounds ...")
    args = [PY, __file__, "_worker", "speed", json.dumps(models)]
    out, _ = sh([*args, a.speed_batch, a.seq_len, a.speed_reps, threads], threads)
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------ workers (own processes)


def _load(path: str):
    """A model folder, or a training run (base + peft adapter) that `upcycle merge` refused."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    try:
        import upcycle.modeling  # noqa: F401  (registers upcycle_bam where it exists)
    except ImportError:
        pass
    hf_logging.disable_progress_bar()
    adapter = Path(path) / "adapter_config.json"
    if not adapter.exists():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    import upcycle.adapters  # noqa: F401  (registers the LoRA-expert tuners with peft)
    from peft import PeftModel

    base_path = json.loads(adapter.read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, path).eval()


def worker_eval(model: str, seq_len: int, max_tokens: int, threads: int) -> None:
    import torch
    from transformers import AutoTokenizer

    from upcycle.data import resolve_texts, token_blocks
    from upcycle.evaluate.perplexity import evaluate as evaluate_blocks
    from upcycle.io.default_model import resolve_model

    torch.set_num_threads(threads)
    # every model here carries the seed's tokenizer files; the seed's needs no custom code
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    lm = _load(resolve_model(model))
    out = {}
    for domain in DOMAINS:
        blocks = token_blocks(resolve_texts(f"builtin:{domain}", "heldout"), tokenizer, seq_len,
                              max_tokens)  # fmt: skip
        r = evaluate_blocks(lm, blocks, batch_size=4)
        out[domain] = {"loss": r["loss"], "tokens": r["tokens"]}
        if r["routing"]:  # mean share of the FFN routing slots each expert takes, over layers
            loads = [layer["load"] for layer in r["routing"]["layers"]]
            out[domain]["expert_load"] = [
                round(sum(x) / len(loads), 4) for x in zip(*loads, strict=True)
            ]
    print(json.dumps(out))


def worker_speed(models: dict[str, str], batch: int, seq_len: int, reps: int, threads: int):
    import torch
    from transformers import AutoTokenizer

    from upcycle.data import resolve_texts, token_blocks
    from upcycle.io.default_model import resolve_model

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    ids = token_blocks(resolve_texts("builtin:all", "heldout"), tokenizer, seq_len,
                       batch * seq_len)  # fmt: skip
    lms = {name: _load(resolve_model(path)) for name, path in models.items()}
    names = list(lms)
    times: dict[str, list[float]] = {n: [] for n in names}

    def once(name):
        with torch.inference_mode():
            t = time.perf_counter()
            lms[name](input_ids=ids, use_cache=False)
            return time.perf_counter() - t

    for name in names:  # warm-up round
        once(name)
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(once(name))
    tokens = ids.numel()
    out = {
        name: {
            "seconds_median": statistics.median(ts),
            "seconds_all": [round(t, 3) for t in ts],
            "tokens": tokens,
            "tokens_per_s": tokens / statistics.median(ts),
            "params": sum(p.numel() for p in lms[name].parameters()),
        }
        for name, ts in times.items()
    }
    print(json.dumps(out))


# ------------------------------------------------------------------ tables


def print_tables(results: dict) -> None:
    ev = results.get("eval", {})
    rows = [("seed (dense)", "seed")]
    rows += [(f"branch {d} (dense)", f"branch-{d}") for d in DOMAINS]
    for m in ("btx", "bam"):
        rows += [(f"{m.upper()}, converted", m), (f"{m.upper()}, trained", f"{m}-trained")]
    print("\nHeld-out loss (mean token NLL, lower is better)\n")
    print("| model | " + " | ".join(DOMAINS) + " | mean |")
    print("|---" * (len(DOMAINS) + 2) + "|")
    for label, key in rows:
        if key not in ev:
            continue
        losses = [ev[key][d]["loss"] for d in DOMAINS]
        cells = " | ".join(f"{x:.4f}" for x in losses)
        print(f"| {label} | {cells} | {sum(losses) / len(losses):.4f} |")
    loads = [(label, key) for label, key in rows if key in ev and "expert_load" in ev[key]["prose"]]
    if loads:
        print("\nMean FFN expert load per domain: share of routing slots per expert, averaged")
        print("over layers; experts in --experts-from order (prose/code/manual)\n")
        print("| model | " + " | ".join(DOMAINS) + " |\n" + "|---" * (len(DOMAINS) + 1) + "|")
        for label, key in loads:
            cells = " | ".join(
                "/".join(f"{x:.2f}" for x in ev[key][d]["expert_load"]) for d in DOMAINS
            )
            print(f"| {label} | {cells} |")
    sp = results.get("speed")
    if sp:
        print("\nInference (no-grad forward, fp32, same block; median of interleaved rounds)\n")
        print("| model | params | s per forward: median | tokens/s | vs BTX |")
        print("|---|---|---|---|---|")
        base = sp.get("btx", {}).get("tokens_per_s")
        for name, r in sp.items():
            rel = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
            print(
                f"| {name} | {r['params'] / 1e6:.1f}M | {r['seconds_median']:.3f} | "
                f"{r['tokens_per_s']:.0f} | {rel} |"
            )


# ------------------------------------------------------------------ main


def parser() -> argparse.ArgumentParser:
    """The command line; `parser().parse_args([])` gives the defaults (bench/shrink.py uses them)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256, help="training and evaluation blocks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps of every training run")
    ap.add_argument("--branch-steps", type=int, default=30)
    ap.add_argument("--branch-batch", type=int, default=2)
    ap.add_argument("--branch-lr", type=float, default=1e-3)
    ap.add_argument("--mode", choices=MODES, default="full", help="MoE training mode")
    ap.add_argument("--moe-steps", type=int, default=20)
    ap.add_argument("--moe-batch", type=int, default=2)
    ap.add_argument(
        "--moe-lr",
        type=float,
        default=None,
        help="default: 1e-3 (experts-lora, router), 5e-5 (full)",
    )
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--router-init", choices=("hidden", "random", "zeros"), default="hidden")
    ap.add_argument("--attention-experts", choices=("full", "shared-kv"), default="full")
    ap.add_argument("--parallel-attention", action="store_true")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per domain")
    ap.add_argument("--speed-batch", type=int, default=4)
    ap.add_argument("--speed-reps", type=int, default=5)
    ap.add_argument("--skip-bam", action="store_true", help="BTX only")
    ap.add_argument("--skip-train", action="store_true", help="no MoE training")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--work", type=Path, default=WORK, help="branches, models, prompts")
    ap.add_argument("--results", type=Path, help="JSON results (bench/results/btx_bam-MODE.json)")
    return ap


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "eval":
            worker_eval(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        else:
            worker_speed(
                json.loads(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4])
            )
        return
    a = parser().parse_args()
    set_paths(a.work.resolve(), (a.results or Path(str(RESULTS).format(mode=a.mode))).resolve())
    if a.moe_lr is None:
        a.moe_lr = DEFAULT_LR[a.mode]
    threads = a.threads
    WORK.mkdir(parents=True, exist_ok=True)

    methods = ["btx"]
    if a.skip_bam:
        log("BAM: skipped (--skip-bam)")
    elif bam_available():
        methods.append("bam")
    else:
        log("BAM: SKIPPED: this checkout's `upcycle convert` has no --method bam yet")
    if not a.skip_train and not adapter_available(a.mode):
        sys.exit(f"`upcycle train --help` does not list --adapter {a.mode} in this checkout")

    results = load_results()
    results.update(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join(["bench/btx_bam.py", *sys.argv[1:]]),
        options={k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        methods=methods,
        git=git_state(),
    )
    results.setdefault("eval", {})
    for stale in ("btx", "btx-trained", "bam", "bam-trained"):  # recomputed below
        results["eval"].pop(stale, None)
    results.pop("speed", None)
    results.pop("moe", None)
    save(results)

    results["branches"] = {d: branch(d, a, threads) for d in DOMAINS}
    save(results)
    branches = [WORK / f"branch-{d}" for d in DOMAINS]

    log("eval: seed and branches (held-out split of each domain) ...")
    results["eval"]["seed"] = evaluate("default", a, threads, cached=True)
    results["cli_check"] = check_against_cli(
        "default", "manual", results["eval"]["seed"]["manual"]["loss"], a, threads
    )
    for d, b in zip(DOMAINS, branches, strict=True):
        results["eval"][f"branch-{d}"] = evaluate(str(b), a, threads, cached=True)
    save(results)

    results["moe"] = {}
    for method in methods:
        results["moe"][method] = {"convert": convert(method, a, branches, threads)}
        results["eval"][method] = evaluate(str(WORK / method), a, threads)
        save(results)
        if not a.skip_train:
            results["moe"][method]["train"] = train_moe(method, a, threads)
            trained = results["moe"][method]["train"]["path"]
            results["eval"][f"{method}-trained"] = evaluate(trained, a, threads)
            save(results)

    if not a.skip_speed:
        models = {"seed (dense)": "default", **{m: str(WORK / m) for m in methods}}
        results["speed"] = speed(models, a, threads)
        save(results)
    if "bam" not in methods:
        log("BAM rows: not measured (see above)")
    print_tables(results)
    log(f"done; results in {RESULTS}")


if __name__ == "__main__":
    main()
