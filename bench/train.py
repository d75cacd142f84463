"""Training benchmark: our MixLoRA vs MoE-PEFT 2.0.2, our plain LoRA, a naive MixLoRA; quality.

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/train.py [--reps 3] [--threads 1,2] [--tools a,b] [--skip-moe-peft]
                                    [--skip-speed] [--skip-quality]

Part 1 (speed and memory, one run, alternating tools): the default model in fp32 on CPU,
8 experts, top-2, r=16, alpha 32, dropout 0.05, LoRA on all seven projections; 64 short
prompt/response pairs from bench/anchors/make_pairs.py, batch 8, at most 256 tokens, padded
to the longest row of each batch, gradient checkpointing (MoE-PEFT's trainer recomputes
too), AdamW lr 2e-4, constant schedule. 9 steps: the first warms up, the next 8 are timed.
Tokens/s counts padded tokens (rows x padded length) of the timed steps, for every tool.
Tools: `upcycle train --adapter mixlora` (also with `--trim-memory`), `--adapter lora` (peft's
LoRA, same dropout), a naive MixLoRA (bench/naive_mixlora.py: same loop, experts materialized as W + BA), and
MoE-PEFT's MixLoRA and LoRA (bench/anchors/moe_peft_train.py, venv from
bench/anchors/setup_moe_peft.sh). OMP_NUM_THREADS and torch threads = 1 and 2.

Peak RSS: each run is spawned and reaped by a tiny helper process (os.wait4 -> ru_maxrss),
so this script's memory never counts.

Part 2 (quality): a three-domain set built here (standard-library prose, standard-library
code, and a synthetic task: reversing word lists), MixLoRA vs plain LoRA with about the same
number of trainable parameters (LoRA rank chosen to match), the same steps and data;
held-out loss per domain of the merged models (`upcycle merge` then `upcycle eval`).

Output: markdown tables on stdout and bench/results/train.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from measure import measure

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "train"
RESULTS = ROOT / "bench" / "results" / "train.json"
MP_VENV = ROOT / "bench" / ".venvs" / "moe-peft"
PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
STEPS, WARMUP = 9, 1
COMMON = [
    "--no-packing", "--batch-size", "8", "--seq-len", "256", "--eval-fraction", "0",
    "--max-steps", str(STEPS), "--lr", "2e-4", "--schedule", "constant", "--r", "16",
    "--alpha", "32", "--dropout", "0.05", "--gradient-checkpointing", "--dtype", "float32",
    "--force", "-q",
]  # fmt: skip


def ours_throughput(run: Path) -> dict:
    """Tokens/s over the timed steps, from the run's metrics.jsonl."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "loss" in r}
    first, last = steps[WARMUP], steps[STEPS]
    tokens = last["tokens"] - first["tokens"]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def moe_peft_throughput(log: Path) -> dict:
    line = [x for x in log.read_text().splitlines() if x.startswith("{")][-1]
    r = json.loads(line)
    return {k: r[k] for k in ("tokens", "seconds", "tokens_per_s")}


def speed(
    reps: int, threads: list[int], with_moe_peft: bool, pairs: Path, only: set | None = None
) -> dict:
    ours = [PY, "-m", "upcycle", "train", "default"]
    naive = [PY, str(ROOT / "bench" / "naive_mixlora.py"), "default"]
    tools = {
        "upcycle-mixlora": lambda out: [
            *ours,
            out,
            "--data",
            pairs,
            "--adapter",
            "mixlora",
            *COMMON,
        ],
        "upcycle-mixlora-trim": lambda out: [
            *ours,
            out,
            "--data",
            pairs,
            "--adapter",
            "mixlora",
            "--trim-memory",
            *COMMON,
        ],
        "upcycle-lora": lambda out: [*ours, out, "--data", pairs, "--adapter", "lora", *COMMON],
        "naive-mixlora": lambda out: [
            *naive,
            out,
            "--data",
            pairs,
            "--adapter",
            "mixlora",
            *COMMON,
        ],
    }
    if with_moe_peft:
        subprocess.run(["bash", ROOT / "bench" / "anchors" / "setup_moe_peft.sh"], check=True)
        anchor = [
            MP_VENV / "bin" / "python",
            ROOT / "bench" / "anchors" / "moe_peft_train.py",
            pairs,
        ]
        for adapter in ("mixlora", "lora"):
            tools[f"moe-peft-{adapter}"] = lambda out, a=adapter, t=None: [
                *anchor,
                "--adapter",
                a,
                "--steps",
                str(STEPS - WARMUP),
                "--warmup",
                str(WARMUP),
            ]
    if only:
        unknown = only - set(tools)
        if unknown:
            sys.exit(f"unknown tools: {', '.join(sorted(unknown))} (known: {', '.join(tools)})")
        tools = {name: make for name, make in tools.items() if name in only}
    results: dict = {}
    for t in threads:
        env = {**ENV, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
        runs: dict[str, list] = {name: [] for name in tools}
        for rep in range(reps):
            for name, make in tools.items():
                out = WORK / f"run-{name}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = make(out)
                if name.startswith("moe-peft"):
                    cmd = [*cmd, "--threads", str(t)]
                log = WORK / f"{name}-{t}.log"
                res = measure(cmd, log, env)
                tp = (
                    moe_peft_throughput(log)
                    if name.startswith("moe-peft")
                    else ours_throughput(out)
                )
                runs[name].append({**res, **tp})
                print(
                    f"  threads={t} rep={rep} {name}: {tp['tokens_per_s']:.1f} tok/s, "
                    f"{res['rss_mib']:.0f} MiB",
                    flush=True,
                )
        results[str(t)] = {
            name: {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                "tokens_per_s_all": [round(r["tokens_per_s"], 2) for r in rs],
                "rss_mib": statistics.median(r["rss_mib"] for r in rs),
                "step_s": statistics.median(r["seconds"] / (STEPS - WARMUP) for r in rs),
            }
            for name, rs in runs.items()
        }
    return results


# ------------------------------------------------------------------ quality


def synthetic_task(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud amber north quiet ember lunar".split()
    out = []
    for _ in range(n):
        items = rng.sample(words, rng.randint(3, 6))
        out.append(
            {
                "prompt": "Reverse the list: " + " ".join(items),
                "response": " ".join(reversed(items)),
            }
        )
    return out


def domains() -> dict[str, tuple[list[dict], list[dict]]]:
    sys.path.insert(0, str(ROOT))
    from upcycle.data import builtin_corpus

    def texts(split, dom, n):
        return [{"text": t} for t in builtin_corpus(split, dom)[:n]]

    return {
        "prose": (texts("calibration", "prose", 400), texts("heldout", "prose", 60)),
        "code": (texts("calibration", "code", 150), texts("heldout", "code", 30)),
        "reverse": (synthetic_task(600, 1), synthetic_task(80, 2)),
    }


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def lora_rank_matching(mixlora_params: int, lora_r16_params: int) -> int:
    return max(1, round(16 * mixlora_params / lora_r16_params))


def heldout_loss(model, path: Path) -> float:
    """Mean held-out token loss of a model on a JSONL file (`upcycle eval --json`)."""
    cmd = [PY, "-m", "upcycle", "eval", model, "--data", path, "--seq-len", "128", "--json", "-q"]
    r = subprocess.run(cmd, env=ENV, check=True, capture_output=True, text=True)
    return json.loads(r.stdout)["loss"]


def quality(steps: int) -> dict:
    data = domains()
    train = [r for tr, _ in data.values() for r in tr]
    random.Random(0).shuffle(train)
    train_path = write_jsonl(WORK / "mix-train.jsonl", train)
    held = {d: write_jsonl(WORK / f"heldout-{d}.jsonl", h) for d, (_, h) in data.items()}
    args = ["--data", train_path, "--eval-fraction", "0", "--max-steps", str(steps),
            "--batch-size", "4", "--seq-len", "256", "--lr", "2e-4", "--warmup-steps", "5",
            "--force", "-q"]  # fmt: skip
    # trainable parameters: from a 1-step probe of each adapter's record
    out: dict = {"steps": steps, "train_records": len(train)}
    probes = {}
    for adapter in ("mixlora", "lora"):
        probe = WORK / f"probe-{adapter}"
        subprocess.run(
            [
                PY,
                "-m",
                "upcycle",
                "train",
                "default",
                probe,
                *args[:-6],
                "--max-steps",
                "1",
                "--adapter",
                adapter,
                "--force",
                "-q",
            ],
            env=ENV,
            check=True,
            capture_output=True,
        )
        probes[adapter] = json.loads((probe / "upcycle_train.json").read_text())["trainable_params"]
    rank = lora_rank_matching(probes["mixlora"], probes["lora"])
    configs = {
        "mixlora": ["--adapter", "mixlora"],
        "lora": ["--adapter", "lora", "--r", str(rank), "--alpha", str(2 * rank)],
    }
    for name, extra in configs.items():
        run, merged = WORK / f"q-{name}", WORK / f"q-{name}-merged"
        subprocess.run(
            [PY, "-m", "upcycle", "train", "default", run, *args, *extra], env=ENV, check=True
        )
        subprocess.run(
            [PY, "-m", "upcycle", "merge", run, merged, "--force", "-q"], env=ENV, check=True
        )
        record = json.loads((run / "upcycle_train.json").read_text())
        out[name] = {"trainable_params": record["trainable_params"], "extra": extra}
        out[name]["heldout"] = {dom: heldout_loss(merged, path) for dom, path in held.items()}
        shutil.rmtree(merged, ignore_errors=True)
    out["base"] = {dom: heldout_loss("default", path) for dom, path in held.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--skip-moe-peft", action="store_true")
    ap.add_argument("--tools", help="comma-separated subset of the tools (default: all)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--quality-steps", type=int, default=60)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    pairs = WORK / "pairs64.jsonl"
    subprocess.run([PY, ROOT / "bench" / "anchors" / "make_pairs.py", pairs], check=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["date"] = datetime.date.today().isoformat()
    results["command"] = " ".join(["bench/train.py", *sys.argv[1:]])
    if not args.skip_speed:
        threads = [int(t) for t in args.threads.split(",")]
        only = set(args.tools.split(",")) if args.tools else None
        fresh = speed(args.reps, threads, not args.skip_moe_peft, pairs, only)
        if only:  # a partial run replaces only its own rows
            results.setdefault("speed", {})
            for t, rows in fresh.items():
                results["speed"].setdefault(t, {}).update(rows)
        else:
            results["speed"] = fresh
        print(
            "\n| threads | tool | tokens/s (median) | step s | peak RSS MiB |\n|---|---|---|---|---|"
        )
        for t, tools in results["speed"].items():
            for name, r in tools.items():
                print(
                    f"| {t} | {name} | {r['tokens_per_s']:.1f} | {r['step_s']:.2f} | {r['rss_mib']:.0f} |"
                )
            if "upcycle-mixlora" not in tools:
                continue
            m = tools["upcycle-mixlora"]
            if "upcycle-lora" in tools:
                ratio = m["step_s"] / tools["upcycle-lora"]["step_s"]
                print(f"| {t} | MixLoRA / LoRA step time | {ratio:.2f}x | | |")
            if "moe-peft-mixlora" in tools:
                mp = tools["moe-peft-mixlora"]
                print(
                    f"| {t} | ours / MoE-PEFT tokens/s | {m['tokens_per_s'] / mp['tokens_per_s']:.2f}x "
                    f"| | RSS {m['rss_mib'] / mp['rss_mib']:.2f}x |"
                )
    if not args.skip_quality:
        results["quality"] = quality(args.quality_steps)
        q = results["quality"]
        print("\n| domain | base | MixLoRA | LoRA (r matched) |\n|---|---|---|---|")
        for dom in q["base"]:
            print(
                f"| {dom} | {q['base'][dom]:.4f} | {q['mixlora']['heldout'][dom]:.4f} | "
                f"{q['lora']['heldout'][dom]:.4f} |"
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
