"""Loading a model folder with transformers: one rule for custom architectures, one-line errors.

A folder whose config.json has `auto_map` names custom code shipped next to its weights (for
example a BAM model that `upcycle convert` wrote). `import upcycle.modeling` registers upcycle's
own architectures with AutoConfig/AutoModelForCausalLM, so those load from the installed
package; `trust_remote_code=True` is passed only for an `auto_map` folder whose model_type is
registered nowhere locally. Every command that loads a model (train, eval, calibrate) goes
through `load_causal_lm` and `load_tokenizer`.
"""

from __future__ import annotations

import json
import os

from upcycle.errors import InputError

LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError)


def read_config(path: str) -> dict:
    """config.json of a model folder (one-line errors; see `upcycle.io.checkpoint.Checkpoint`)."""
    cfg = os.path.join(path, "config.json")
    try:
        with open(cfg) as f:
            config = json.load(f)
    except OSError:
        raise InputError(f"{path}: not a model directory (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{cfg}: not valid JSON") from None
    if not isinstance(config, dict):
        raise InputError(f"{cfg}: not a JSON object")
    return config


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


def load_causal_lm(path: str, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` with custom code handled."""
    import warnings

    from transformers import AutoModelForCausalLM

    remote = needs_remote_code(path)
    try:
        with warnings.catch_warnings():  # zero-width shared experts (copy-upcycled qwen2_moe)
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, **kwargs)
    except LOAD_ERRORS as e:
        raise InputError(f"{path}: transformers cannot load it ({_first_line(e)})") from None


def load_tokenizer(path: str):
    """`AutoTokenizer.from_pretrained(path)` with custom code handled (one-line errors)."""
    from transformers import AutoTokenizer

    remote = needs_remote_code(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
    except LOAD_ERRORS as e:
        raise InputError(f"{path}: cannot load the tokenizer ({_first_line(e)})") from None
