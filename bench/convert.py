"""Conversion benchmark: `upcycle convert` vs `mergekit-moe`, plus streaming on a large model.

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/convert.py [--reps 3] [--skip-mergekit] [--skip-large]

Part 1 converts SmolLM2-135M-Instruct (`upcycle fetch-default`) into 4 experts, top-2, with
both tools in alternating runs (ours, mergekit, ours, ...) and reports medians, min-max and
the ratios ours/mergekit. mergekit 0.1.5 lives in its own venv, bench/.venvs/mergekit, made
here when missing (torch==2.13.0 first, so pip takes the local CPU wheel, not a CUDA build).
Part 2 builds a synthetic ~1.5B llama (random bf16, 2 GB shards) once under bench/work/,
converts it into 8 experts (one run as specified, plus one with `--fsync` where the CLI has
it) and compares the write rate with `dd ... conv=fdatasync` measured in the same run.

Peak RSS: each tool runs under a tiny helper process that reaps it with os.wait4 and reports
ru_maxrss (the largest RSS of the tool or of any descendant it reaped). The helper matters: a
child spawned straight from a big parent inherits the parent's RSS high-water mark at exec,
so this script's own memory would leak into the number. For the same reason this process
never imports torch; the synthetic model is built in a subprocess.

Output: a markdown table on stdout and bench/results/convert.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from measure import measure

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results" / "convert.json"
MK_VENV = ROOT / "bench" / ".venvs" / "mergekit"
_ep = Path(sys.executable).with_name("upcycle")
UPCYCLE = [str(_ep)] if _ep.exists() else [sys.executable, "-m", "upcycle"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
QUIET = dict(env=ENV, check=True, capture_output=True, text=True)
MK_FLAGS = "--quiet --i-understand-this-is-not-useful-without-training --random-seed 0".split()
SYNTH = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=22,  # 22 rather than 20 layers: 1.52B params instead of 1.39B
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=32000,
    tie_word_embeddings=False,
)
SHARD_BYTES = 2 * 10**9


def run(cmd: list, **kw) -> str:
    return subprocess.run([str(c) for c in cmd], **QUIET, **kw).stdout


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(path: Path) -> dict:
    """Architecture and tensor count of a checkpoint (config.json and safetensors headers)."""
    cfg = json.loads((path / "config.json").read_text())
    n = 0
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        n += len(header.keys() - {"__metadata__"})
    keys = ("architectures", "num_local_experts", "num_experts_per_tok")
    return {k: cfg.get(k) for k in keys} | {"tensors": n}


def versions(python: Path, pkgs: list[str]) -> dict:
    code = "import importlib.metadata as m, json, sys\n"
    code += "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    return json.loads(run([python, "-c", code, *pkgs]))


def ensure_mergekit_venv() -> Path:
    exe = MK_VENV / "bin" / "mergekit-moe"
    if not exe.exists():
        pip = [MK_VENV / "bin" / "python", "-m", "pip", "install", "-q"]
        steps = [
            [sys.executable, "-m", "venv", MK_VENV],
            [*pip, "torch==2.13.0"],  # first, so pip takes the CPU wheel, not a CUDA build
            [*pip, "mergekit==0.1.5", "torch==2.13.0"],
        ]
        for cmd in steps:
            print("[setup]", " ".join(map(str, cmd)), flush=True)
            subprocess.run([str(c) for c in cmd], check=True)
    return exe


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def compare(model: Path, reps: int, with_mergekit: bool) -> dict:
    mk_cfg = WORK / "mergekit-moe.yml"
    expert = f'  - source_model: {model}\n    positive_prompts: ["hello"]\n'
    head = f"base_model: {model}\ngate_mode: random\ndtype: bfloat16\nexperts_per_token: 2\n"
    mk_cfg.write_text(head + "experts:\n" + expert * 4)
    ours = [*UPCYCLE, "convert", model, WORK / "out-upcycle", "--method", "copy"]
    cmds = {"upcycle": [*ours, "--num-experts", "4", "--top-k", "2", "--quiet", "--force"]}
    fixed = {"upcycle": [*cmds["upcycle"], "--dry-run"]}  # start-up and planning, no tensors
    if with_mergekit:
        mk = ensure_mergekit_venv()
        cmds["mergekit"] = [mk, mk_cfg, WORK / "out-mergekit", *MK_FLAGS]
        fixed["mergekit"] = [mk, "--help"]  # start-up (imports) only
    runs: dict[str, list[dict]] = {t: [] for t in cmds}
    checks = {}
    for i in range(reps):
        for tool, cmd in cmds.items():
            out = WORK / f"out-{tool}"
            shutil.rmtree(out, ignore_errors=True)
            r = measure(cmd, WORK / f"{tool}.log", ENV) | {"out_bytes": dir_bytes(out)}
            checks.setdefault(tool, describe(out))
            shutil.rmtree(out)
            runs[tool].append(r)
            print(f"  {i + 1}/{reps} {tool:8s} {r['wall_s']:6.2f} s {r['rss_mib']:5.0f} MiB")
    keys = ("wall_s", "rss_mib")
    tools = {t: {k: stats([r[k] for r in rs]) for k in keys} for t, rs in runs.items()}
    for t, rs in runs.items():
        tools[t]["out_bytes"] = rs[0]["out_bytes"]
    res = {"model": str(model), "reps": reps, "check": checks, "tools": tools}
    res["commands"] = {t: " ".join(map(str, c)) for t, c in cmds.items()}
    res["fixed_cost"] = {t: measure(c, WORK / f"{t}-fixed.log", ENV) for t, c in fixed.items()}
    if with_mergekit:
        ours, theirs = tools["upcycle"], tools["mergekit"]
        res["ratio"] = {k: ours[k]["median"] / theirs[k]["median"] for k in keys}
    return res


def build_synth(dest: Path) -> None:
    """Write a random bf16 llama checkpoint shard by shard (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SYNTH, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.save_pretrained(tmp)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    layer = {"input_layernorm": (h,), "post_attention_layernorm": (h,)}
    layer |= {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h)}
    layer |= {"self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h)}
    layer |= {"mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    specs = [("model.embed_tokens", (v, h))]
    for i in range(cfg.num_hidden_layers):
        specs += [(f"model.layers.{i}.{name}", shape) for name, shape in layer.items()]
    specs += [("model.norm", (h,)), ("lm_head", (v, h))]

    gen = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]  # names per shard; only the last one still holds tensors
    size = params = 0

    def flush():
        save_file(shards[-1], tmp / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
        shards[-1] = dict.fromkeys(shards[-1])

    for name, shape in specs:
        t = torch.empty(shape, dtype=torch.bfloat16)
        t = t.fill_(1.0) if len(shape) == 1 else t.normal_(0, 0.02, generator=gen)
        if shards[-1] and size + 2 * t.numel() > SHARD_BYTES:
            flush()
            shards.append({})
            size = 0
        shards[-1][name + ".weight"] = t
        size, params = size + 2 * t.numel(), params + t.numel()
    flush()
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.rename(tmp / f"part-{i}.safetensors", tmp / fname)
        weight_map.update(dict.fromkeys(names, fname))
    meta = {"total_size": 2 * params, "total_parameters": params}
    index = {"metadata": meta, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    assert 1.4e9 < params < 1.6e9, params
    os.rename(tmp, dest)
    print(f"[synth] {params / 1e9:.3f}B params in {len(shards)} shards", flush=True)


def dd_speed(path: Path) -> dict:
    cmd = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", "count=2048", "conv=fdatasync"]
    err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    path.unlink()
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", err)
    nbytes, secs = int(m[1]), float(m[2])
    res = {"command": " ".join(cmd), "output": err.strip().splitlines()[-1]}
    return res | {"bytes": nbytes, "seconds": secs, "mb_s": nbytes / secs / 1e6}


def large() -> dict:
    synth = WORK / "synth-1.5b"
    if not (synth / "model.safetensors.index.json").exists():
        print(f"[synth] building {synth} (once)", flush=True)
        subprocess.run([sys.executable, __file__, "--_build-synth", str(synth)], check=True)
    meta = json.loads((synth / "model.safetensors.index.json").read_text())["metadata"]
    need = 8 * meta["total_size"] + 3 * 10**9  # upper bound: experts copy only the MLPs
    free = shutil.disk_usage(WORK).free
    print(f"[large] disk free {free / 1e9:.1f} GB, need <= {need / 1e9:.1f} GB", flush=True)
    if free < need:
        sys.exit("not enough free disk for part 2 (use --skip-large)")
    os.sync()  # start from a clean page cache writeback state
    dd = dd_speed(WORK / "dd.tmp")
    print(f"[large] dd: {dd['output']}", flush=True)
    out = WORK / "out-large"
    cmd = [*UPCYCLE, "convert", synth, out, "--num-experts", "8", "--top-k", "2"]
    cmd += ["--max-shard-size", "2GB", "--quiet", "--force"]
    # Without --fsync the last GBs may still sit in the page cache at exit; dd above does
    # fdatasync, so the --fsync run (when the CLI has that flag) is the like-for-like one.
    variants = [[]] + ([["--fsync"]] if "--fsync" in run([*UPCYCLE, "convert", "--help"]) else [])
    results = []
    for extra in variants:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        r = measure(cmd + extra, WORK / "large.log", ENV) | {
            "command": " ".join(map(str, cmd + extra))
        }
        r |= {"out_bytes": dir_bytes(out), "out_shards": len(list(out.glob("*.safetensors")))}
        r |= {"check": describe(out), "mb_s": r["out_bytes"] / r["wall_s"] / 1e6}
        r["variant"] = " ".join(extra) or "default"
        shutil.rmtree(out)
        results.append(r)
        print(f"[large] {r['variant']}: {r['wall_s']:.1f} s, {r['rss_mib']:.0f} MiB, "
              f"{r['mb_s']:.0f} MB/s", flush=True)  # fmt: skip
    res = {"runs": "1 per variant", "config": SYNTH, "dd": dd, "results": results}
    return res | {"source_params": meta["total_parameters"], "source_bytes": meta["total_size"]}


def targets(res: dict) -> list[dict]:
    out = []

    def add(target: str, measured: str, ok: bool) -> None:
        out.append({"target": target, "measured": measured, "pass": ok})

    if ratio := res.get("compare", {}).get("ratio"):
        w, m = ratio["wall_s"], ratio["rss_mib"]
        add("default model: wall time <= 0.5x mergekit", f"{w:.2f}x", w <= 0.5)
        add("default model: peak RSS <= 0.5x mergekit", f"{m:.2f}x", m <= 0.5)
    for r in res.get("large", {}).get("results", []):
        gb, frac = r["rss_mib"] * 2**20 / 1e9, r["mb_s"] / res["large"]["dd"]["mb_s"]
        add(f"1.5B model ({r['variant']}): peak RSS <= 1.5 GB", f"{gb:.2f} GB", gb <= 1.5)
        add(f"1.5B model ({r['variant']}): write rate >= 50% of dd", f"{frac:.0%}", frac >= 0.5)
    return out


def report(res: dict) -> str:
    def span(s: dict, fmt: str) -> str:
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    def row(*cells) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    out = [f"{res['date']} · {res['host']} · `{res['command']}` · git {res['git']}", ""]
    if c := res.get("compare"):
        out += [f"{Path(c['model']).name} -> 4 experts, top-2; {c['reps']} alternating runs", ""]
        out += [row("tool", "wall time, s", "peak RSS, MiB", "output, MB", "architectures")]
        out += [row(*["---"] * 5)]
        for tool, t in c["tools"].items():
            arch = ",".join(c["check"][tool]["architectures"])
            wall, rss, mb = (
                span(t["wall_s"], ".2f"),
                span(t["rss_mib"], ".0f"),
                t["out_bytes"] / 1e6,
            )
            out += [row(f"{tool}, median (min-max)", wall, rss, f"{mb:.0f}", arch)]
        if r := c.get("ratio"):
            out += [
                row("ratio upcycle/mergekit", f"{r['wall_s']:.2f}", f"{r['rss_mib']:.2f}", "", "")
            ]
        for tool, f in c["fixed_cost"].items():
            how = f"{tool} `{'convert --dry-run' if tool == 'upcycle' else '--help'}` (1 run)"
            out += [row(how, f"{f['wall_s']:.2f}", f"{f['rss_mib']:.0f}", 0, "")]
        out += [""]
    if g := res.get("large"):
        dd, params = g["dd"]["mb_s"], g["source_params"] / 1e9
        out += [f"Synthetic llama, {params:.2f}B params, bf16 -> 8 experts, top-2; 1 run each", ""]
        out += [row("run", "wall, s", "peak RSS, MiB", "output, GB", "write, MB/s", "dd, MB/s")]
        out += [row(*["---"] * 6)]
        for r in g["results"]:
            cells = (r["wall_s"], ".1f"), (r["rss_mib"], ".0f"), (r["out_bytes"] / 1e9, ".2f")
            cells += (r["mb_s"], ".0f"), (dd, ".0f")
            out += [row(r["variant"], *(format(x, fmt) for x, fmt in cells))]
        out += [""]
    out += [row("target", "measured", "result"), row(*["---"] * 3)]
    for t in res["targets"]:
        out += [row(t["target"], t["measured"], "PASS" if t["pass"] else "FAIL")]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="runs of each tool on the default model")
    ap.add_argument("--skip-mergekit", action="store_true", help="time upcycle only")
    ap.add_argument("--skip-large", action="store_true", help="skip the synthetic 1.5B model")
    ap.add_argument("--_build-synth", dest="build_synth", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_synth:
        return build_synth(Path(args.build_synth))
    WORK.mkdir(parents=True, exist_ok=True)
    git = run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).strip()
    if run(["git", "status", "--porcelain", "upcycle"], cwd=ROOT).strip():
        git += " + uncommitted changes in upcycle/"
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    res = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python bench/convert.py", *sys.argv[1:]]),
        "host": f"{os.cpu_count()} CPUs, {ram:.0f} GiB RAM",
        "git": git,
    }
    pkgs = ["upcycle", "torch", "transformers", "safetensors"]
    res["versions"] = {"upcycle_venv": versions(sys.executable, pkgs)}
    model = Path(run([*UPCYCLE, "fetch-default"]).strip().splitlines()[-1])
    print(f"[compare] {model}, {args.reps} reps", flush=True)
    res["compare"] = compare(model, args.reps, not args.skip_mergekit)
    if not args.skip_mergekit:
        pkgs = ["mergekit", "torch", "transformers", "safetensors", "accelerate"]
        res["versions"]["mergekit_venv"] = versions(MK_VENV / "bin" / "python", pkgs)
    if not args.skip_large:
        res["large"] = large()
    res["targets"] = targets(res)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print("\n" + report(res) + f"\n\nJSON: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
