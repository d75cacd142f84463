"""Resident memory of `upcycle prune` by phase, against issue 19's target.

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/prune_memory.py MOE [prune options]
    # e.g. the default model's 8-expert copy (692M parameters):
    .venv/bin/python -m upcycle convert default bench/work/smol8 -E 8 -k 2 --expert-noise 0.05
    .venv/bin/python bench/prune_memory.py bench/work/smol8 --experts 4 --by merge --width 0.5

A worker process runs the prune in-process (`upcycle.cli.main`) with the phases of the
layer-at-a-time statistics wrapped: around each, it reads VmRSS and the peak VmHWM from
/proc/self/status. The peak is reset (/proc/self/clear_refs) twice, when the statistics start
and when the writing starts; a phase's peak is the highest resident memory since the last
reset, so the phase where it rises is the one that set it. The target: the resident memory
just before the statistics start (Python, torch, transformers, tokenizer, tokens, the empty
model) plus 1.5 x one layer's experts in float32 (as the statistics hold them) plus the
calibration activations (tokens x hidden x 4 bytes).
Prints a table and writes bench/results/prune_memory.json. Linux only (procfs).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "prune_memory.json"

WORKER = r"""
import json, sys, time

def status():
    d = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            d[key] = int(value.split()[0]) * 1024
    return d

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

phases = []
def wrap(owner, name, label, reset=False):
    inner = getattr(owner, name)
    def measured(*args, **kwargs):
        before = status()["VmRSS"]
        if reset:
            reset_peak()
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            s = status()
            phases.append(dict(phase=label, before=before, peak=s["VmHWM"], after=s["VmRSS"],
                               seconds=time.perf_counter() - start))
    setattr(owner, name, measured)

from upcycle.train.memory import uncached_blas
uncached_blas()  # as `upcycle prune` does, before torch is imported
import upcycle.prune.layerwise as layerwise
import upcycle.prune.run as run
wrap(layerwise.LayerRunner, "_capture", "capture", reset=True)
wrap(layerwise.LayerRunner, "load", "load layer")
wrap(run, "_decide", "decide layer")
wrap(layerwise.LayerRunner, "run", "run layer")
wrap(run, "write", "write", reset=True)
from upcycle.cli import main
start = time.perf_counter()
code = 0
try:
    main(["prune", *sys.argv[2:]])
except SystemExit as e:
    code = e.code or 0
json.dump(dict(phases=phases, code=code, seconds=time.perf_counter() - start,
               peak=status()["VmHWM"]), open(sys.argv[1], "w"))
"""


def layer_sizes(model: str, max_tokens: int, seq_len: int) -> dict:
    """One MoE layer's experts (float32 bytes) and the calibration activations' bytes."""
    sys.path.insert(0, str(ROOT))
    from upcycle.io.checkpoint import Checkpoint
    from upcycle.prune.plan import read_layout

    layout = read_layout(Checkpoint(model))
    experts = layout.num_experts * 3 * layout.width * layout.hidden * 4
    tokens = (max_tokens // seq_len) * seq_len
    return dict(
        layer_experts=experts,
        activations=tokens * layout.hidden * 4,
        tokens=tokens,
        num_layers=layout.num_layers,
    )


def option(args: list[str], name: str, default: int) -> int:
    return int(args[args.index(name) + 1]) if name in args else default


def summarise(phases: list[dict]) -> list[dict]:
    """One row per phase name: its highest peak, total time and how often it ran."""
    rows: dict[str, dict] = {}
    for p in phases:
        row = rows.setdefault(p["phase"], dict(phase=p["phase"], peak=0, seconds=0.0, calls=0))
        row["peak"] = max(row["peak"], p["peak"])
        row["seconds"] += p["seconds"]
        row["calls"] += 1
    return list(rows.values())


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    model, options = sys.argv[1], sys.argv[2:]
    out = ROOT / "bench" / "work" / "prune_memory_out"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    raw = ROOT / "bench" / "work" / "prune_memory.raw.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    args = [model, str(out), *options, "--force", "-q"]
    if "--data" not in options:
        args += ["--data", "builtin"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", WORKER, str(raw), *args], check=True, cwd=ROOT)
    measured = json.loads(raw.read_text())
    sizes = layer_sizes(
        model, option(options, "--max-tokens", 32768), option(options, "--seq-len", 256)
    )
    phases = measured["phases"]
    baseline = phases[0]["before"]  # just before the capture: everything but the statistics
    stats_peak = max(p["peak"] for p in phases if p["phase"] != "write")
    target = baseline + 1.5 * sizes["layer_experts"] + sizes["activations"]
    result = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command=" ".join(["bench/prune_memory.py", *sys.argv[1:]]),
        wall_seconds=round(time.perf_counter() - start, 1),
        exit_code=measured["code"],
        baseline_bytes=baseline,
        statistics_peak_bytes=stats_peak,
        writing_peak_bytes=measured["peak"],  # the peak was reset when the writing started
        process_peak_bytes=max(stats_peak, measured["peak"]),
        target_bytes=int(target),
        **sizes,
        phases=summarise(phases),
    )
    RESULTS.write_text(json.dumps(result, indent=2))
    mb = 1 << 20
    print("| phase | calls | peak RSS (MB) | seconds |\n|---|---|---|---|")
    for row in result["phases"]:
        print(
            f"| {row['phase']} | {row['calls']} | {row['peak'] / mb:.0f} | {row['seconds']:.1f} |"
        )
    print(
        f"\nbefore the statistics: {baseline / mb:.0f} MB; statistics peak {stats_peak / mb:.0f} MB "
        f"(+{(stats_peak - baseline) / mb:.0f} MB); one layer's experts (fp32) "
        f"{sizes['layer_experts'] / mb:.0f} MB, activations ({sizes['tokens']} tokens) "
        f"{sizes['activations'] / mb:.0f} MB; target {target / mb:.0f} MB "
        f"(+{(target - baseline) / mb:.0f} MB); writing peak {measured['peak'] / mb:.0f} MB"
    )


if __name__ == "__main__":
    main()
