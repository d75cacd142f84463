"""Loading a model folder with transformers: one rule for custom architectures, one-line errors.

A folder whose config.json has `auto_map` names custom code shipped next to its weights (for
example a BAM model that `upcycle convert` wrote). `import upcycle.modeling` registers upcycle's
own architectures with AutoConfig/AutoModelForCausalLM, so those load from the installed
package without running any code from the folder. An `auto_map` folder whose model_type is
registered nowhere locally would run the folder's own Python: that happens only when the user
asks (`upcycle train --trust-remote-code`); otherwise it is a one-line error. Every command
that loads a model (train, eval, calibrate) goes through `load_causal_lm` and `load_tokenizer`,
which keep the Hub's kernels off unless the user asked for them (`upcycle.io.hub`).
"""

from __future__ import annotations

import os

from upcycle.errors import InputError
from upcycle.io.jsonfile import read_json

LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError)


def read_config(path: str) -> dict:
    """config.json of a model folder (one-line errors; see `upcycle.io.checkpoint.Checkpoint`)."""
    try:
        return read_json(os.path.join(path, "config.json"))
    except OSError:
        raise InputError(f"{path}: not a model directory (no config.json)") from None


def needs_remote_code(path: str) -> bool:
    """True when `path`'s config.json has auto_map and no local class knows its model_type."""
    import upcycle.modeling  # noqa: F401  (registers upcycle's architectures)

    config = read_config(path)
    if not config.get("auto_map"):
        return False
    from transformers import CONFIG_MAPPING

    return config.get("model_type") not in CONFIG_MAPPING


def code_files(path: str) -> list[str]:
    """The Python files a custom-architecture folder carries (config.json has auto_map), else []."""
    if not read_config(path).get("auto_map"):
        return []
    return sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if name.endswith(".py") and os.path.isfile(os.path.join(path, name))
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _remote(path: str, trust_remote_code: bool) -> bool:
    """Whether loading `path` runs its own code; refused unless the user asked for it."""
    remote = needs_remote_code(path)
    if remote and not trust_remote_code:
        model_type = read_config(path).get("model_type")
        raise InputError(
            f"{path}: model_type {model_type!r} needs the Python code shipped in the folder "
            "(auto_map); pass --trust-remote-code to run it"
        )
    return remote


def load_causal_lm(path: str, trust_remote_code: bool = False, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`; a folder's own code runs only
    with `trust_remote_code` (upcycle's architectures never need it), and Hub kernels only
    after `upcycle.io.hub.enable_hub_kernels()` (`--hub-kernels`)."""
    import warnings

    from transformers import AutoModelForCausalLM

    from upcycle.io.hub import hub_kernels_enabled

    kwargs.setdefault("use_kernels", hub_kernels_enabled())
    remote = _remote(path, trust_remote_code)
    try:
        with warnings.catch_warnings():  # zero-width shared experts (copy-upcycled qwen2_moe)
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, **kwargs)
    except LOAD_ERRORS as e:
        raise InputError(f"{path}: transformers cannot load it ({_first_line(e)})") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained(path)`, custom code as in `load_causal_lm`."""
    from transformers import AutoTokenizer

    remote = _remote(path, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
    except LOAD_ERRORS as e:
        raise InputError(f"{path}: cannot load the tokenizer ({_first_line(e)})") from None


def empty_causal_lm(path: str, trust_remote_code: bool = False):
    """The model class of `path` built from its config with every parameter on the meta device
    (no memory, no data read) and real buffers (rotary frequencies are computed at init): a
    skeleton whose parts are loaded on demand (`upcycle.prune.layerwise`)."""
    import warnings

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    remote = _remote(path, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
        with init_empty_weights(include_buffers=False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            return AutoModelForCausalLM.from_config(config, trust_remote_code=remote).eval()
    except LOAD_ERRORS as e:
        raise InputError(f"{path}: transformers cannot build it ({_first_line(e)})") from None
