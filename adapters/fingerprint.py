"""A short fingerprint of a base model, stored with adapters to catch the wrong base early.

It hashes the architecture sizes and the first rows of the input embeddings rounded to
bfloat16, so the same model loaded in float32 or bfloat16 (or read from its safetensors files
without torch) gives the same fingerprint, and a different model almost surely does not.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

ROWS = 16
_SIZES = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")


def _digest(config: dict, rows_bf16_bits: np.ndarray) -> str:
    sizes = json.dumps({k: config.get(k) for k in _SIZES}, sort_keys=True)
    h = hashlib.sha256(sizes.encode())
    h.update(np.ascontiguousarray(rows_bf16_bits, dtype=np.uint16).tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """Fingerprint of a loaded transformers model."""
    import torch

    rows = model.get_input_embeddings().weight[:ROWS].detach().to("cpu", torch.bfloat16)
    return _digest(model.config.to_dict(), rows.view(torch.int16).numpy().view(np.uint16))


def checkpoint_fingerprint(ckpt, embed_name: str) -> str:
    """Fingerprint of a checkpoint on disk (an `upcycle.io.checkpoint.Checkpoint`)."""
    from upcycle.io.arrays import cast

    info = ckpt.infos[embed_name]
    rows = cast(ckpt.get(embed_name)[:ROWS], info.dtype, "BF16")
    return _digest(ckpt.config, rows)
