"""Read-ME on the default model: perplexity, router accuracy, lookahead expert caching.

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/readme.py                           # everything (~30 min, 1 thread)
    .venv/bin/python bench/readme.py --model-dir /tmp/readme   # reuse a conversion (~20 min)
    .venv/bin/python bench/readme.py --skip-train              # (i)-(iii) only

0. Convert: `upcycle convert default OUT --method readme --calibration-data builtin:prose
   --calibration-data builtin:code [--calibration-data builtin:manual]` (manual where
   upcycle.data has it). Cached in bench/work/readme/ with the command that made it; a rerun
   with the same command reuses it (~5 min otherwise).
1. Perplexity of the dense model and of the conversion per domain, on held-out text:
   `upcycle eval MODEL --data builtin:D --max-tokens N --json` (seq_len 512).
2. Router accuracy: on held-out blocks of each domain (2048 tokens each), the top-1 agreement
   of `model.plan_experts(ids)` with the activation labels (argmax of
   `upcycle.methods.readme.activation_scores` of the dense model with the conversion's
   neuron membership). Baselines: the commonest label's share (a constant answer), and for all
   domains together the answer "each domain's commonest label" (a router told the domain).
3. Lookahead caching: a stream of 64 held-out requests of every domain (16 prompt + 48
   decoded tokens), planned by `plan_experts`, replayed through the simulated expert cache of
   examples/readme_lookahead.py (its docstring defines the serving and timing model) for
   batch sizes 1 and 8, windows of 16 requests, caches of 25/50/75% of the blocks.
4. If `upcycle train --help` offers `--router-steps` (Read-ME's alternating training), a
   short `upcycle train CONVERTED RUN --data builtin:all --method readme --rounds 2
   --router-steps 10 --backbone-steps 6 --seq-len 256 --batch-size 4 --max-eval-blocks 4`
   (options to change each), `upcycle merge RUN MERGED`, then 1-3 again on MERGED (the
   activation labels stay those of the dense model); skipped with a message otherwise.

All subprocesses run with OMP_NUM_THREADS=MKL_NUM_THREADS=--threads, and torch in this process
uses as many threads. Results: tables on stdout and bench/results/readme.json (written after
every stage).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from measure import log, thread_env

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import readme_lookahead as la  # noqa: E402

PY = sys.executable
WORK = ROOT / "bench" / "work" / "readme"
RESULTS = ROOT / "bench" / "results" / "readme.json"
T0 = time.perf_counter()


def env(threads: int) -> dict:
    return thread_env(threads)


def upcycle(*args) -> list[str]:
    return [PY, "-m", "upcycle", *map(str, args)]


def sh(args: list[str], threads: int) -> tuple[str, float]:
    """Run a command; (stdout, seconds). Exits with the command's stderr tail on failure."""
    t = time.perf_counter()
    p = subprocess.run(
        args, env=env(threads), capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if p.returncode:
        sys.exit(f"FAILED ({p.returncode}): {shlex.join(args)}\n{p.stderr[-3000:]}")
    return p.stdout, time.perf_counter() - t


def save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, RESULTS)


def domains() -> list[str]:
    from upcycle.data import DATA_ALIASES

    return [d for d in ("prose", "code", "manual") if f"builtin:{d}" in DATA_ALIASES]


# ------------------------------------------------------------------ stages


def convert(args, doms: list[str]) -> tuple[str, dict]:
    """The conversion (cached under WORK with its command), or --model-dir as given."""
    if args.model_dir:
        record = Path(args.model_dir) / "upcycle.json"
        info = json.loads(record.read_text()) if record.exists() else {}
        return args.model_dir, {"given": args.model_dir, "upcycle.json": info}
    data = [a for d in doms for a in ("--calibration-data", f"builtin:{d}")]
    out = WORK / "converted"
    cmd = ["convert", "default", out, "--method", "readme", *data, "--force", "-q"]
    stamp = WORK / "converted.cmd.json"
    key = [str(c) for c in cmd]
    if out.joinpath("config.json").exists() and stamp.exists():
        if json.loads(stamp.read_text()) == key:
            log(f"reusing {out}")
            return str(out), {"command": shlex.join(["upcycle", *key]), "reused": True}
    WORK.mkdir(parents=True, exist_ok=True)
    log("converting: upcycle " + shlex.join(key))
    _, seconds = sh(upcycle(*cmd), args.threads)
    stamp.write_text(json.dumps(key))
    return str(out), {"command": shlex.join(["upcycle", *key]), "seconds": round(seconds, 1)}


def perplexities(model: str, doms: list[str], args) -> dict:
    out = {}
    for d in doms:
        cmd = ["eval", model, "--data", f"builtin:{d}", "--max-tokens", args.eval_tokens]
        stdout, seconds = sh(upcycle(*cmd, "--json", "-q"), args.threads)
        rep = json.loads(stdout)
        out[d] = {
            "perplexity": rep["perplexity"],
            "loss": rep["loss"],
            "tokens": rep["tokens"],
            "seconds": round(seconds, 1),
        }
        log(f"  {Path(model).name} {d}: perplexity {rep['perplexity']:.3f}")
    return out


def heldout_blocks(tok, doms: list[str], args) -> dict:
    from upcycle.data import resolve_texts, token_blocks

    return {
        d: token_blocks(
            resolve_texts(f"builtin:{d}", split="heldout"),
            tok,
            seq_len=args.label_seq_len,
            max_tokens=args.label_tokens,
        )
        for d in doms
    }


def activation_labels(converted: str, blocks: dict, threads: int) -> dict:
    """Per domain, the dense model's activation label of every held-out token."""
    import torch

    from upcycle.io.default_model import resolve_model
    from upcycle.methods.calibration import load_for_calibration
    from upcycle.methods.readme import activation_scores, load_membership

    torch.set_num_threads(threads)
    member = load_membership(converted)
    dense = load_for_calibration(resolve_model("default"))
    labels = {
        d: activation_scores(dense, ids, member).argmax(1).numpy() for d, ids in blocks.items()
    }
    del dense
    return labels


def router_accuracy(model, blocks: dict, labels: dict) -> dict:
    """Top-1 agreement of plan_experts with the activation labels, per domain and overall."""
    E = model.config.num_local_experts
    out, agree, total, all_labels = {}, 0, 0, []
    confusion = np.zeros((E, E), dtype=np.int64)  # [label, planned]
    for i, (d, ids) in enumerate(blocks.items()):
        plan = model.plan_experts(ids)[0, ..., 0].reshape(-1).numpy()
        lab = labels[d]
        np.add.at(confusion, (lab, plan), 1)
        hits = int((plan == lab).sum())
        agree, total = agree + hits, total + len(lab)
        all_labels.append(lab)
        out[d] = {
            "tokens": len(lab),
            "accuracy": hits / len(lab),
            "majority_label_share": float(np.bincount(lab, minlength=E).max() / len(lab)),
            "planned_share": (np.bincount(plan, minlength=E) / len(plan)).round(4).tolist(),
            "label_share": (np.bincount(lab, minlength=E) / len(lab)).round(4).tolist(),
            "planned_is_domain_expert": float((plan == i).mean()),
            "label_is_domain_expert": float((lab == i).mean()),
        }
    lab = np.concatenate(all_labels)
    per_domain = sum(out[d]["majority_label_share"] * out[d]["tokens"] for d in blocks)
    out["all"] = {
        "tokens": total,
        "accuracy": agree / total,
        "majority_label_share": float(np.bincount(lab, minlength=E).max() / len(lab)),
        # a router that knows each token's domain and answers that domain's commonest label
        "domain_majority_share": per_domain / total,
        "confusion_label_by_planned": confusion.tolist(),
    }
    return out


def lookahead(model, tok, args) -> dict:
    cfg = model.config
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    stream = la.request_stream(tok, args.requests, args.prompt_tokens + args.gen_tokens)
    plans = la.plan_requests(model, [ids for _, ids in stream])
    out = {
        "requests": len(stream),
        "domains": [d for d, _ in stream],
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "window": args.window,
        "blocks": L * E,
        "by_batch_size": {},
    }
    for b in args.batch_sizes:
        rows = la.simulate(
            plans,
            E,
            la.capacities_for(L, E),
            batch_size=b,
            window=args.window,
            prompt_tokens=args.prompt_tokens,
        )
        out["by_batch_size"][str(b)] = rows
        log(f"  lookahead simulation, batch size {b}: done")
    return out


def measure(name: str, model_dir: str, labels: dict, blocks: dict, args, results: dict):
    """(ii) and (iii) for one model; (i) is run by the caller."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import upcycle.modeling  # noqa: F401  (registers upcycle_readme)

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    results[name]["router"] = router_accuracy(model, blocks, labels)
    save(results)
    log(f"  {name}: router accuracy {results[name]['router']['all']['accuracy']:.3f}")
    results[name]["lookahead"] = lookahead(model, tok, args)
    save(results)


def train(converted: str, args) -> tuple[str | None, dict]:
    """Read-ME's alternating training if `upcycle train` has it, then `upcycle merge` (a
    standalone checkpoint with the tokenizer); (merged model dir or None, record)."""
    helptext = subprocess.run(upcycle("train", "--help"), capture_output=True, text=True).stdout
    if "--router-steps" not in helptext:
        return None, {
            "skipped": "`upcycle train --help` has no --router-steps (no --method readme)"
        }
    run, merged = WORK / "trained-run", WORK / "trained"
    cmd = ["train", converted, run, "--data", args.train_data, "--method", "readme"]
    cmd += ["--rounds", args.rounds, "--router-steps", args.router_steps]
    cmd += ["--backbone-steps", args.backbone_steps, *shlex.split(args.train_args)]
    cmd += ["--force", "-q"]
    key = [str(c) for c in cmd]
    log("training: upcycle " + shlex.join(key))
    _, seconds = sh(upcycle(*cmd), args.threads)
    record = {"command": shlex.join(["upcycle", *key]), "seconds": round(seconds, 1)}
    summary = run / "upcycle_train.json"
    if summary.exists():
        final = json.loads(summary.read_text())
        record["final_metrics"] = final.get("final", final.get("final_metrics"))
        record["history"] = final.get("history")
    mcmd = [str(c) for c in ("merge", run, merged, "--force", "-q")]
    _, mseconds = sh(upcycle(*mcmd), args.threads)
    record["merge"] = {"command": shlex.join(["upcycle", *mcmd]), "seconds": round(mseconds, 1)}
    return str(merged), record


# ------------------------------------------------------------------ tables


def print_tables(results: dict, doms: list[str]) -> None:
    models = [m for m in ("converted", "trained") if "perplexity" in results.get(m, {})]
    dense = results["dense"]["perplexity"]
    print("\n| model | " + " | ".join(f"{d} ppl (x dense)" for d in doms) + " |")
    print("|---|" + "---|" * len(doms))
    print("| dense | " + " | ".join(f"{dense[d]['perplexity']:.3f}" for d in doms) + " |")
    for m in models:
        ppl = results[m]["perplexity"]
        cells = [
            f"{ppl[d]['perplexity']:.3f} ({ppl[d]['perplexity'] / dense[d]['perplexity']:.2f}x)"
            for d in doms
        ]
        print(f"| {m} | " + " | ".join(cells) + " |")
    models = [m for m in ("converted", "trained") if "router" in results.get(m, {})]
    if models:
        print(
            "\n| model | domain | tokens | router accuracy | commonest label's share | "
            "each domain's commonest label |"
        )
        print("|---|---|---|---|---|---|")
        for m in models:
            for d in [*doms, "all"]:
                r = results[m]["router"][d]
                by_domain = f"{r['domain_majority_share']:.3f}" if d == "all" else "-"
                print(
                    f"| {m} | {d} | {r['tokens']} | {r['accuracy']:.3f} | "
                    f"{r['majority_label_share']:.3f} | {by_domain} |"
                )
    for m in models:
        sim = results[m].get("lookahead")
        if not sim:
            continue
        for b, rows in sim["by_batch_size"].items():
            print(
                f"\n{m}: {sim['requests']} requests ({sim['prompt_tokens']} prompt + "
                f"{sim['gen_tokens']} decoded tokens), batch size {b}, window {sim['window']}"
            )
            print(la.format_table(rows, sim["blocks"]))


def main() -> None:
    global WORK, RESULTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="a Read-ME conversion of the default model to reuse")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="upcycle eval --max-tokens")
    ap.add_argument("--label-tokens", type=int, default=2048, help="router tokens per domain")
    ap.add_argument("--label-seq-len", type=int, default=256)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--train-data", default="builtin:all")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--router-steps", type=int, default=10)
    ap.add_argument("--backbone-steps", type=int, default=6)
    ap.add_argument(
        "--train-args",
        default="--seq-len 256 --batch-size 4 --max-eval-blocks 4",
        help="more `upcycle train` options, quoted",
    )
    ap.add_argument("--work", type=Path, default=WORK, help="conversion and training outputs")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the JSON results file")
    args = ap.parse_args()
    WORK, RESULTS = args.work.resolve(), args.results.resolve()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import torch
    import transformers

    import upcycle.modeling  # noqa: F401  (registers upcycle_readme: no remote-code prompt)

    doms = domains()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    results: dict = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "git": git.stdout.strip(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "domains": doms,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    converted, results["convert"] = convert(args, doms)
    save(results)

    log("(i) perplexity, dense and converted")
    results["dense"] = {"perplexity": perplexities("default", doms, args)}
    results["converted"] = {"perplexity": perplexities(converted, doms, args)}
    save(results)

    log("(ii) activation labels of held-out tokens (dense model)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    blocks = heldout_blocks(tok, doms, args)
    labels = activation_labels(converted, blocks, args.threads)
    log("(ii)-(iii) router accuracy and lookahead caching, converted")
    measure("converted", converted, labels, blocks, args, results)

    if args.skip_train:
        results["trained"] = {"skipped": "--skip-train"}
    else:
        trained, record = train(converted, args)
        results["trained"] = {"train": record}
        if trained is None:
            log("(iv) skipped: " + record["skipped"])
        else:
            log("(iv) after training: perplexity, router accuracy, lookahead")
            results["trained"]["perplexity"] = perplexities(trained, doms, args)
            save(results)
            measure("trained", trained, labels, blocks, args, results)
    results["seconds"] = round(time.perf_counter() - T0, 1)
    save(results)
    print_tables(results, doms)
    log(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
