"""`upcycle train` on a GPU: steady tokens/s and peak memory, MixLoRA, LoRA and LoRA experts.

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/gpu_train.py [--out bench/results/gpu_train.json]
        [--runs mixlora,lora,experts-lora,mixlora-lean] [--workdir DIR] [--steps 10] [--seq-len 1024] [--batch-size 8]
        [--dtype bfloat16] [--timeout 300] [--model-dir DENSE | --tokenizer DIR]
        [--train-args="--gradient-checkpointing --r 8"] [--env [RUN:]KEY=VALUE ...]
    .venv/bin/python bench/gpu_train.py --smoke   # tiny model, fp32, CPU: checks the script

Model: a random-weight llama of about 1.1B parameters (hidden 2048, intermediate 8192, 16
layers, 32 heads, 8 KV heads, tied embeddings, bf16), built here in a child process with the
tokenizer files of --tokenizer (default: the cached default model that `upcycle fetch-default`
prints) and that tokenizer's vocabulary (49152 for the default). --model-dir takes an existing
dense model instead. --smoke: hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, fp32,
--seq-len 64 --batch-size 2 --steps 3, OMP_NUM_THREADS=1 unless set. Models and runs live in a
temporary folder that is removed at the end (the 1.1B model's MoE takes about 13 GB of disk
while it exists).

Runs, each `python -m upcycle train MODEL RUN --data builtin --dtype D --seq-len S
--batch-size B --max-steps N --max-eval-blocks 4 -q [--train-args]` in a subprocess started
from the repository root, as a user would:
- mixlora: `--adapter mixlora -E 8 -k 2` on the dense model;
- lora: `--adapter lora` on the dense model;
- experts-lora: `--adapter experts-lora` on the Mixtral checkpoint that
  `upcycle convert DENSE MOE -E 8 -k 2 -q` makes from the same model (copy upcycling);
- mixlora-lean: mixlora on the lean sorted Function instead of the dense CUDA path
  (UPCYCLE_MIXLORA=lean; see upcycle.kernels.dispatch), for the comparison in one run.
--workdir: where the commands start; the repository root suits an editable install, any other
folder an installed upcycle (from the root, Python would import the source tree instead).

Measured per run, from its metrics.jsonl: steady tokens/s = (tokens_last - tokens_1) /
(elapsed_last - elapsed_1), i.e. without the first step (kernel compilation, allocator
warm-up), and the steady seconds per step over the same steps; the held-out loss before and
after training. Peak memory: on CUDA the highest `nvidia-smi memory.used` (whole GPU, MiB)
sampled every 500 ms during the run; on the CPU the train process's peak RSS (ru_maxrss from
os.wait4; this script imports no torch, so the child's high-water mark is its own).
meta.peak_memory_kind says which. A run that fails or passes --timeout is recorded with its
status and the last lines of its stderr, and the next run starts; the exit code is then 1.

Output: JSON at --out, {"meta": {command, started_utc, git, device, torch, transformers, dtype,
seq_len, batch_size, steps, peak_memory_kind}, "runs": [{adapter, tokens_per_s,
peak_memory_mib, step_time_s, eval_loss_before, eval_loss, status[, error]}]}, and a markdown
table on stdout whose "vs lora" column is lora's tokens/s over the run's (its step time
relative to plain LoRA's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from measure import log

ROOT = Path(__file__).resolve().parent.parent
RUNS = ("mixlora", "lora", "experts-lora", "mixlora-lean")
# Runs that are an adapter on another implementation (upcycle.kernels.dispatch's overrides)
VARIANTS = {"mixlora-lean": ("mixlora", {"UPCYCLE_MIXLORA": "lean"})}
BIG = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
# Only the tokenizer's files: the default model's folder also holds its config and weights.
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "*.jinja")
GPU_MEMORY = "gpu memory.used (nvidia-smi, whole GPU, 500 ms samples)"
CPU_MEMORY = "train process ru_maxrss (os.wait4)"


def probe() -> dict:
    """Versions and the device `upcycle train` will use (run in a child process: see prepare)."""
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": cuda,
    }


def build_model(tokenizer: str, out: str, shape: dict, dtype: str) -> int:
    """A random-weight llama of `shape` with the tokenizer files of `tokenizer`, saved to `out`
    in `dtype`; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    dest = Path(out)
    dest.mkdir(parents=True)
    for pattern in TOKENIZER_FILES:
        for f in Path(tokenizer).glob(pattern):
            shutil.copy(f, dest / f.name)
    tok = AutoTokenizer.from_pretrained(dest)
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **shape,
    )
    torch.manual_seed(0)
    # Random init of 1.1B parameters is much faster on the GPU; the child exits afterwards, so
    # none of its memory is left on the device during the runs.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(dest)
    return sum(p.numel() for p in model.parameters())


def prepare(args, work: Path) -> tuple[dict, Path]:
    """probe() and, without --model-dir, build_model() in one fresh (spawned) process, so that
    this script never imports torch: no CUDA context of ours on the GPU during the runs, and a
    small RSS that the train processes' ru_maxrss cannot inherit. Returns (probe, dense model)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        info = pool.submit(probe).result()
        if not info["cuda"] and not args.smoke:
            sys.exit("no CUDA device: run with --smoke to check the script on the CPU")
        if args.model_dir is not None:
            return info, args.model_dir
        dense = work / "dense"
        tokenizer = str(args.tokenizer or default_tokenizer())
        shape = TINY if args.smoke else BIG
        log(f"building a random llama ({'tiny' if args.smoke else '1.1B'}) in {dense}")
        params = pool.submit(build_model, tokenizer, str(dense), shape, args.dtype).result()
        log(f"built: {params / 1e9:.3f}B parameters")
        return info, dense


def default_tokenizer() -> str:
    """The cached default model's folder: the last line `upcycle fetch-default` prints."""
    r = subprocess.run(
        [sys.executable, "-m", "upcycle", "fetch-default"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 or not r.stdout.strip():
        sys.exit(f"upcycle fetch-default failed; pass --tokenizer DIR\n{r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def git_rev() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def child_env(env_args: list[str], run: str, smoke: bool) -> dict:
    """This environment, offline, plus the --env settings for every run and for `run`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if smoke:  # the tiny model gains nothing from threads, which a busy machine makes slow
        env.setdefault("OMP_NUM_THREADS", "1")
    for item in env_args:
        key, _, value = item.partition("=")
        target, _, key = key.rpartition(":")
        if target in ("", run):
            env[key] = value
    return env


class GpuMonitor:
    """`nvidia-smi memory.used` sampled every 500 ms into a file while the block runs (the
    query gpu-check.sh makes); .peak_mib is the highest sample over all GPUs."""

    def __init__(self, path: Path):
        self.path, self.peak_mib = path, None

    def __enter__(self) -> GpuMonitor:
        cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        self.file = open(self.path, "w")
        self.proc = subprocess.Popen([*cmd, "-lms", "500"], stdout=self.file)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.file.close()
        samples = [float(s) for s in self.path.read_text().split() if s.replace(".", "").isdigit()]
        self.peak_mib = max(samples, default=None)


def run_command(cmd: list[str], env: dict, logs: Path, timeout: float, cwd: Path) -> dict:
    """Run cmd from `cwd` (--workdir), stdout and stderr to files under `logs`; returns rc,
    timed_out, the child's ru_maxrss in MiB and the last lines of its stderr."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout.txt", "w") as out, open(logs / "stderr.txt", "w") as err:
        # Its own session, so that a timeout kills whatever it started too.
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
        timed_out, deadline = False, time.monotonic() + timeout
        try:
            # os.wait4 rather than proc.wait: it also gives this child's own peak RSS.
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    os.killpg(proc.pid, signal.SIGKILL)
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.2)
        except BaseException:  # Ctrl-C here: the child is in another session and would live on
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss_mib = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    tail = (logs / "stderr.txt").read_text(errors="replace").strip().splitlines()[-15:]
    return {
        "rc": proc.returncode,
        "timed_out": timed_out,
        "rss_mib": rss_mib,
        "stderr_tail": "\n".join(tail),
    }


def read_metrics(path: Path) -> dict:
    """Steady tokens/s and step time (first step left out) and held-out losses of a run."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "tokens" in r and "elapsed_s" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if len(steps) < 3:  # the first step is left out, and a rate needs two more
        raise ValueError(f"{path}: {len(steps)} logged steps; steady rates need at least 3")
    a, b = steps[1], steps[-1]
    seconds = b["elapsed_s"] - a["elapsed_s"]
    if seconds <= 0:
        raise ValueError(f"{path}: no time between steps {a['step']} and {b['step']}")
    return {
        "tokens_per_s": round((b["tokens"] - a["tokens"]) / seconds, 1),
        "step_time_s": round(seconds / (b["step"] - a["step"]), 4),
        "eval_loss_before": evals[0]["eval_loss"] if evals and evals[0]["step"] == 0 else None,
        "eval_loss": evals[-1]["eval_loss"] if evals and evals[-1]["step"] > 0 else None,
    }


def failure(cmd: list[str], res: dict, timeout: float) -> tuple[str, str]:
    """(status, error) of a command that did not succeed."""
    if res["timed_out"]:
        status, why = "timeout", f"timed out after {timeout:g} s"
    else:
        status, why = "failed", f"exit code {res['rc']}"
    return status, f"{why}: {shlex.join(cmd)}\n{res['stderr_tail']}"


def convert(dense: Path, moe: Path, args, work: Path) -> str | None:
    """`upcycle convert DENSE MOE -E 8 -k 2 -q`; None when it worked, else the error."""
    cmd = [sys.executable, "-m", "upcycle", "convert", str(dense), str(moe), "-E", "8", "-k", "2"]
    cmd.append("-q")
    log(f"converting to MoE: {shlex.join(['python', *cmd[1:]])}")
    env = child_env(args.env, "convert", args.smoke)
    res = run_command(cmd, env, work / "logs-convert", args.timeout, args.workdir)
    if res["rc"] == 0 and not res["timed_out"]:
        return None
    return "convert " + ": ".join(failure(cmd, res, args.timeout))


def new_record(adapter: str) -> dict:
    """A run's JSON record, nothing measured yet."""
    keys = ("tokens_per_s", "peak_memory_mib", "step_time_s", "eval_loss_before", "eval_loss")
    return {"adapter": adapter, **dict.fromkeys(keys), "status": "ok"}


def train_run(adapter: str, model: Path, args, work: Path, gpu: bool) -> dict:
    """One `upcycle train` run, measured; its record for the JSON."""
    record = new_record(adapter)
    out = work / f"run-{adapter}"
    name, extra_env = VARIANTS.get(adapter, (adapter, {}))
    cmd = [sys.executable, "-m", "upcycle", "train", str(model), str(out), "--data", "builtin"]
    cmd += ["--adapter", name] + (["-E", "8", "-k", "2"] if name == "mixlora" else [])
    cmd += ["--dtype", args.dtype, "--seq-len", str(args.seq_len)]
    cmd += ["--batch-size", str(args.batch_size), "--max-steps", str(args.steps)]
    cmd += ["--max-eval-blocks", "4", "-q", *shlex.split(args.train_args)]
    log(f"{adapter}: {shlex.join(['python', *cmd[1:]])}")
    env = child_env(args.env, adapter, args.smoke) | extra_env
    logs = work / f"logs-{adapter}"
    if gpu:
        with GpuMonitor(work / f"gpu-memory-{adapter}.txt") as mon:
            res = run_command(cmd, env, logs, args.timeout, args.workdir)
        record["peak_memory_mib"] = mon.peak_mib
    else:
        res = run_command(cmd, env, logs, args.timeout, args.workdir)
        record["peak_memory_mib"] = round(res["rss_mib"], 1)
    if res["rc"] != 0 or res["timed_out"]:
        record["status"], record["error"] = failure(cmd, res, args.timeout)
        return record
    try:
        record |= read_metrics(out / "metrics.jsonl")
    except (OSError, ValueError, KeyError) as exc:
        record["status"], record["error"] = "failed", f"metrics: {type(exc).__name__}: {exc}"
    # A 1.1B run leaves adapter weights and optimizer state behind: free the disk.
    shutil.rmtree(out, ignore_errors=True)
    return record


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(runs: list[dict]) -> str:
    """Markdown: one row per run; "vs lora" = lora's tokens/s over the run's."""
    lora = next((r["tokens_per_s"] for r in runs if r["adapter"] == "lora"), None)
    lines = [
        "| run | status | tokens/s | s/step | peak memory MiB | held-out loss before | after "
        "| vs lora |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        tps = r["tokens_per_s"]
        vs = f"{lora / tps:.2f}x" if lora and tps else ""
        lines.append(
            f"| {r['adapter']} | {r['status']} | {fmt(tps, '.0f')} "
            f"| {fmt(r['step_time_s'], '.3f')} | {fmt(r['peak_memory_mib'], '.0f')} "
            f"| {fmt(r['eval_loss_before'], '.4f')} | {fmt(r['eval_loss'], '.4f')} | {vs} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny llama, fp32, CPU")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated, of " + ",".join(RUNS))
    ap.add_argument("--steps", type=int, default=None, help="--max-steps (default 10; smoke 3)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 1024 (smoke: 64)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (smoke: 2)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 (smoke: float32)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run (and convert)")
    ap.add_argument("--model-dir", type=Path, default=None, help="an existing dense model")
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: the default model's")
    ap.add_argument(
        "--train-args",
        default="",
        help='extra options for every upcycle train; write --train-args="--r 8" (with "=")',
    )
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="[RUN:]KEY=VALUE",
        help="environment for every run, or only for RUN (mixlora, lora, experts-lora, convert)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_train.json")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=ROOT,
        help="where upcycle commands start (default: the repository root, for an editable "
        "install; elsewhere for an installed upcycle)",
    )
    args = ap.parse_args()
    defaults = (3, 64, 2, "float32") if args.smoke else (10, 1024, 8, "bfloat16")
    for name, default in zip(("steps", "seq_len", "batch_size", "dtype"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.runs = args.runs.split(",")  # mixlora-lean: MixLoRA on the lean sorted Function
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {','.join(RUNS)}")
    if args.steps < 3:
        ap.error("--steps must be at least 3: the first step is left out of the steady rates")
    return args


def main() -> None:
    args = parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="gpu_train-") as tmp:
        work = Path(tmp)
        info, dense = prepare(args, work)
        # GPU memory needs nvidia-smi; without it, the train process's RSS is all there is.
        gpu = info["cuda"] and shutil.which("nvidia-smi") is not None
        meta = {
            "command": " ".join(["python", *sys.argv]),
            "started_utc": started,
            "git": git_rev(),
            "device": info["device"],
            "torch": info["torch"],
            "transformers": info["transformers"],
            "dtype": args.dtype,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "peak_memory_kind": GPU_MEMORY if gpu else CPU_MEMORY,
        }
        runs, convert_error = [], None
        if "experts-lora" in args.runs:
            convert_error = convert(dense, work / "moe", args, work)
        for adapter in args.runs:
            if adapter == "experts-lora" and convert_error:
                runs.append(new_record(adapter) | {"status": "failed", "error": convert_error})
                continue
            model = work / "moe" if adapter == "experts-lora" else dense
            record = train_run(adapter, model, args, work, gpu)
            done = f"{record['tokens_per_s']:.0f} tokens/s" if record["status"] == "ok" else ""
            log(f"{adapter}: {record['status']} {done}")
            runs.append(record)
    print()
    print(table(runs))
    for r in runs:
        if r["status"] != "ok":
            print(f"\n{r['adapter']} {r['status']}:\n{r['error']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print(f"\nwrote {args.out}")
    sys.exit(0 if all(r["status"] == "ok" for r in runs) else 1)


if __name__ == "__main__":
    main()
