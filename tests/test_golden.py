"""Golden outputs: fixed conversions, calibrations, trainings and merges on tiny models write
the same bytes as when tests/golden/outputs.json was recorded ("behaviour is unchanged").

Every case in CASES runs its CLI calls in-process on the same tiny inputs (random llama and
qwen2 checkpoints from conftest.save_tiny, small text and JSONL files from other test modules'
helpers); the sha256 of each file of each output folder must equal the recorded one. A mismatch
names the case and the file.

Re-record with

    UPCYCLE_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

only when an output byte legitimately changes (a fix, a new field, a new case), and say in the
commit message which outputs changed and why. A refactor must pass without re-recording.

What is hashed, and what is normalised first (found by running every case twice, in separate
processes, and comparing every file):

- Absolute paths: the outputs name their inputs and runs by absolute path (upcycle.json
  `source.path`, `options.experts_from` and `calibration_data`, a merge's `run` and `adapter`,
  adapter_config.json `base_model_name_or_path`), which is pytest's tmp folder: the root all
  cases run under is replaced by `<tmp>` in every file before hashing.
- upcycle's own version (`"upcycle_version": "..."` in upcycle.json and `upcycle X.Y.Z` in the
  model card README.md) is replaced by `<version>`, so that a release bump alone does not fail
  the test. Other libraries' versions (`transformers_version`, `peft_version`) stay: the inputs
  come from those libraries, and the recorded ones are in the golden file's `environment`.
- `target_modules` of a plain LoRA adapter: peft stores them as a Python set, so their order in
  adapter_config.json (and in the merge's copy in upcycle.json) follows PYTHONHASHSEED, i.e.
  changes from process to process. JSON files with a `target_modules` key are hashed re-dumped
  (indent 2, key order kept) with every such list sorted (MixLoRA's too, for one rule).
- Train run folders: only adapter_model.safetensors and adapter_config.json are hashed (the
  merge then checks the rest of the run's effect). metrics.jsonl, upcycle_train.json and
  checkpoints/*/trainer_state.json hold elapsed seconds and tokens/s; checkpoints/ otherwise
  repeats the final adapter plus resume state, and peft's README.md is its own boilerplate.
  Merged and converted folders are hashed in full, and so are the inputs (golden `inputs`).

Determinism: torch runs on one thread during the test. `upcycle calibrate` writes other router
bits with 1 and with 2 intra-op threads (reduction order), and torch's default thread count is
the machine's core count; one thread gives the same bits on any machine of the same kind. The
training and merge outputs were the same with 1 and 2 threads, with PYTHONHASHSEED 0, 1 and
777, and with each case run alone in its own process (no state carries from one case to the
next); two recordings in a row were identical.

CPU: recorded on an x86-64 AMD EPYC with AVX-512 (torch CPU capability AVX512, OpenBLAS
kernels SkylakeX; `environment` in the golden file). Forcing narrower kernels on that machine
changed the bytes of the fitted outputs only: torch's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2)
changed granular-kmeans-activation and calibrate, OpenBLAS's Haswell kernels changed
granular-kmeans-activation; MKL and oneDNN limited to AVX2 changed nothing, and the training,
merge and other conversion cases were unchanged under all of these (CPU_SENSITIVE). Torch
without vector kernels changes the random inputs themselves. So on another kind of CPU a
mismatch, above all in those cases or in the trained adapters, is to be checked (run this test
at the parent commit there) before anything is re-recorded; the failure message names the
environment differences. The inputs are hashed too: if they differ, torch or transformers
(constraints.txt) changed, not upcycle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli, save_tiny
from test_calibrate import _corpus
from test_readme_train import write_words
from test_train import write_data

from upcycle import __version__

GOLDEN = Path(__file__).parent / "golden" / "outputs.json"
RECORD = os.environ.get("UPCYCLE_RECORD_GOLDEN") == "1"
RERECORD = "UPCYCLE_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py"

GRANULAR = "--method granular -G 8 -k 2"
MEMBERS = "--experts-from {llama_a} --experts-from {llama_b}"
TRAIN = (
    "--data {jsonl} --max-steps 2 --seq-len 16 --batch-size 2 --r 4 --num-experts 4 "
    "--max-eval-blocks 2 --seed 0 -q"
)

# case -> CLI calls, split on spaces. "{name}" is an input of make_inputs, "{case}" the case's
# own folder. The third word of every call (OUT of convert, calibrate, train and merge) is an
# output folder.
CASES: dict[str, list[str]] = {
    "copy-mixtral": ["convert {llama} {case}/moe -E 4 -k 2 -q"],
    "copy-qwen2_moe": ["convert {llama} {case}/moe -E 4 -k 2 --target qwen2_moe -q"],
    "granular-shared": [f"convert {{qwen2}} {{case}}/moe {GRANULAR} -S 2 --target qwen2_moe -q"],
    "granular-kmeans-activation": [
        f"convert {{llama}} {{case}}/moe {GRANULAR} --partition kmeans --router-init activation "
        "--calibration-data {text} --calibration-tokens 512 -q"
    ],
    "btx": [f"convert {{llama}} {{case}}/moe --method btx {MEMBERS} -k 1 -q"],
    "bam": [f"convert {{llama}} {{case}}/moe --method bam {MEMBERS} --attention-experts full -q"],
    "readme": [
        "convert {llama} {case}/moe --method readme --calibration-data {text} "
        "--calibration-data {words} --calibration-tokens 512 -q"
    ],
    "calibrate": [
        f"convert {{llama}} {{case}}/moe {GRANULAR} -q",
        "calibrate {case}/moe {case}/cal --data {text} --max-tokens 512 --seq-len 64 -q",
    ],
    "train-mixlora-merge": [
        f"train {{llama}} {{case}}/run {TRAIN}",
        "merge {case}/run {case}/merged -q",
    ],
    "train-lora-merge": [
        f"train {{llama}} {{case}}/run --adapter lora {TRAIN}",
        "merge {case}/run {case}/merged -q",
    ],
}
TRAIN_RUN_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Cases whose bytes changed here under torch's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) or
# OpenBLAS's Haswell ones (OPENBLAS_CORETYPE=Haswell): their fits round differently.
CPU_SENSITIVE = ("granular-kmeans-activation", "calibrate")


def make_inputs(folder: Path) -> dict[str, str]:
    """Tiny checkpoints and data files the cases read: name -> path."""
    folder.mkdir(parents=True)
    return {
        "llama": save_tiny(str(folder / "llama"), "llama", seed=0, tokenizer=True),
        "llama_a": save_tiny(str(folder / "llama-a"), "llama", seed=1),
        "llama_b": save_tiny(str(folder / "llama-b"), "llama", seed=2),
        "qwen2": save_tiny(str(folder / "qwen2"), "qwen2", seed=3, tokenizer=True),
        "text": _corpus(folder / "text.txt", n=60, seed=0),
        "words": write_words(folder / "words.jsonl", n=40, seed=1),
        "jsonl": write_data(folder, n=60, seed=2),
    }


def environment() -> dict[str, str]:
    """What the hashes depend on besides upcycle (named in a failure when it differs)."""
    import numpy
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "openblas_core": _openblas_core(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": numpy.__version__,
    }


def _openblas_core() -> str:
    """The kernels numpy's OpenBLAS picked for this CPU (its wheels' library), or "?"."""
    import ctypes
    import glob

    import numpy

    for lib in glob.glob(os.path.join(os.path.dirname(numpy.__file__) + ".libs", "*openblas*")):
        for name in ("scipy_openblas_get_corename64_", "openblas_get_corename"):
            f = getattr(ctypes.CDLL(lib), name, None)
            if f is not None:
                f.restype = ctypes.c_char_p
                return f().decode()
    return "?"


def environment_note(golden: dict) -> str:
    """Empty when this machine matches the recording's environment; else what differs."""
    now, then = environment(), golden.get("environment", {})
    changed = [f"{k} {now[k]} (recorded: {then.get(k)})" for k in now if now[k] != then.get(k)]
    if not changed:
        return ""
    return (
        "\nThis environment differs from the recording's: " + ", ".join(changed) + ". "
        f"{', '.join(CPU_SENSITIVE)} change with the CPU's vector kernels (module docstring): "
        "compare with the parent commit here before re-recording."
    )


def _sorted_sets(obj):
    """obj with every `target_modules` list sorted (peft writes a set in hash order)."""
    if isinstance(obj, dict):
        return {
            k: sorted(v) if k == "target_modules" and isinstance(v, list) else _sorted_sets(v)
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_sorted_sets(v) for v in obj]
    return obj


def normalised(path: Path, root: Path) -> bytes:
    """The file's bytes with the run's tmp root, upcycle's version and set order taken out."""
    data = path.read_bytes()
    for prefix in sorted({str(root), os.path.realpath(root)}, key=len, reverse=True):
        data = data.replace(prefix.encode(), b"<tmp>")
    if path.suffix == ".json":
        data = data.replace(
            f'"upcycle_version": "{__version__}"'.encode(), b'"upcycle_version": "<version>"'
        )
        if b'"target_modules"' in data:
            data = json.dumps(_sorted_sets(json.loads(data)), indent=2).encode()
    elif path.suffix == ".md":
        data = data.replace(f"upcycle {__version__}".encode(), b"upcycle <version>")
    return data


def digests(folder: Path, root: Path, base: Path, only: tuple[str, ...] = ()) -> dict[str, str]:
    """{path relative to base: sha256 of the file normalised for tmp root `root`} for every
    file under folder (or the files named in `only`)."""
    files = [folder / name for name in only] if only else folder.rglob("*")
    return {
        p.relative_to(base).as_posix(): hashlib.sha256(normalised(p, root)).hexdigest()
        for p in sorted(files)
        if p.is_file()
    }


def run_case(name: str, root: Path, inputs: dict[str, str]) -> dict[str, str]:
    """Run case `name` under root/name; digests of the files of every output folder."""
    case = root / name
    case.mkdir()
    got = {}
    for call in CASES[name]:
        args = [word.format(case=case, **inputs) for word in call.split()]
        r = run_cli(*args)
        assert r.code == 0, f"golden case {name}: upcycle {' '.join(args)} failed:\n{r.err}"
        only = TRAIN_RUN_FILES if args[0] == "train" else ()
        got.update(digests(Path(args[2]), root, case, only))
    return got


def load_golden() -> dict:
    if GOLDEN.is_file():
        return json.loads(GOLDEN.read_text())
    return {"inputs": {}, "environment": {}, "cases": {}}


def record(name: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    """Write this case's digests (and the inputs') into the golden file; drop removed cases."""
    golden = load_golden()
    golden["about"] = f"sha256 of normalised outputs: see tests/test_golden.py; {RERECORD}"
    golden["inputs"], golden["environment"] = inputs, environment()
    cases = {**golden["cases"], name: outputs}
    golden["cases"] = {k: cases[k] for k in sorted(cases) if k in CASES}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


def differences(want: dict[str, str], got: dict[str, str]) -> list[str]:
    """One line per file that changed, appeared or disappeared."""
    lines = []
    for f in sorted(want.keys() | got.keys()):
        if f not in got:
            lines.append(f"  {f}: no longer written")
        elif f not in want:
            lines.append(f"  {f}: new file")
        elif want[f] != got[f]:
            lines.append(f"  {f}: bytes differ")
    return lines


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    """The root every case runs under, the inputs and their digests; torch on one thread
    (calibrate's router fit rounds differently with more threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("golden")
        inputs = make_inputs(root / "in")
        yield root, inputs, digests(root / "in", root, root / "in")
    finally:
        torch.set_num_threads(threads)


def test_inputs_and_cases_match_the_golden_file(golden_run):
    """The inputs are what the outputs were recorded from; the file covers exactly CASES."""
    if RECORD:
        pytest.skip("recording")
    golden = load_golden()
    if not golden["cases"]:
        pytest.fail(f"no {GOLDEN}: record it with {RERECORD}")
    lines = differences(golden["inputs"], golden_run[2])
    if lines:
        pytest.fail(
            "the tiny inputs differ from the recorded ones, so no output can match: torch or "
            "transformers changed, or a helper the inputs come from did:\n"
            + "\n".join(lines)
            + environment_note(golden)
        )
    if sorted(golden["cases"]) != sorted(CASES):
        pytest.fail(f"cases added or removed since {GOLDEN.name} was recorded: {RERECORD}")


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_match_the_golden_file(golden_run, name):
    root, inputs, input_digests = golden_run
    got = run_case(name, root, inputs)
    if RECORD:
        record(name, input_digests, got)
        return
    golden = load_golden()
    if name not in golden["cases"]:
        pytest.fail(f"case {name} is not in {GOLDEN}: {RERECORD}")
    lines = differences(golden["cases"][name], got)
    if lines:
        pytest.fail(
            f"golden case {name!r} differs from {GOLDEN.name}:\n"
            + "\n".join(lines)
            + environment_note(golden)
            + f"\nIf the change is intended, re-record with {RERECORD} "
            "and say why in the commit message."
        )
