"""The one writer of a model folder: weights, config, tokenizer files, code, provenance, card.

Every command that writes a model folder (`upcycle convert`, `merge`, `calibrate`, and the
config of a training checkpoint) goes through here, so that each rule holds for all of them:

- the folder is claimed and appears in one rename when whole (`upcycle.io.writer`);
- config.json carries the keys transformers 4.x reads next to transformers 5's
  (`with_legacy_keys`: rope_theta, rope_scaling, torch_dtype);
- tokenizer and generation files come from the source folder, custom modeling code (auto_map)
  is copied next to the weights, provenance goes to upcycle.json.

`write_model` streams tensors into shards; `write_contents` writes the rest into a folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from upcycle.arch.config import with_legacy_keys
from upcycle.io.writer import Entry, ShardedWriter, atomic_output_dir

# Tokenizer and generation files copied verbatim from the source folder.
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
PROVENANCE = "upcycle.json"
CARD = "README.md"


@dataclass
class Contents:
    """Everything of a model folder but its weights."""

    config: dict
    files_from: str | None = None  # the folder whose tokenizer/generation files are copied
    file_names: Sequence[str] | None = AUX_FILES  # which of its files; None: every non-weight one
    code_files: Sequence[str] = ()  # custom modeling code (the config's auto_map names it)
    extra_files: Sequence[str] = ()  # further files copied as they are
    write_files: Callable[[str], None] | None = None  # writes a method's own files into a folder
    provenance: dict | None = None  # upcycle.json
    card: str | None = None  # README.md


def is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name == "model.safetensors.index.json"


def write_contents(folder: str, contents: Contents) -> None:
    """config.json (readable by transformers 4.x and 5.x), copied files, upcycle.json, README.md."""
    _dump(os.path.join(folder, "config.json"), with_legacy_keys(contents.config))
    if contents.files_from:
        names = contents.file_names
        if names is None:
            names = [n for n in sorted(os.listdir(contents.files_from)) if not is_weight_file(n)]
        for name in names:
            src = os.path.join(contents.files_from, name)
            if os.path.isfile(src) and name != "config.json":
                shutil.copyfile(src, os.path.join(folder, name))
    for src in (*contents.code_files, *contents.extra_files):
        shutil.copyfile(src, os.path.join(folder, os.path.basename(src)))
    if contents.write_files:
        contents.write_files(folder)
    if contents.provenance is not None:
        _dump(os.path.join(folder, PROVENANCE), contents.provenance)
    if contents.card is not None:
        with open(os.path.join(folder, CARD), "w") as f:
            f.write(contents.card)


def write_model(
    out: str,
    entries: list[Entry],
    tensors: Iterable[dict[str, np.ndarray]],
    contents: Contents | Callable[[], Contents],
    *,
    max_shard_bytes: int,
    force: bool = False,
    fsync: bool = False,
) -> int:
    """Write the model folder `out`; returns its size in bytes.

    `entries` fixes every tensor's name, dtype and shape, in the order `tensors` yields them
    (dicts of any size, e.g. one decoder layer each). `contents` may be a callable, evaluated
    after the last tensor (what a method reports while streaming goes into the card). `out`
    appears in one rename when whole; on any error nothing is left behind.
    """
    with atomic_output_dir(out, force=force, fsync=fsync) as tmp:
        writer = ShardedWriter(tmp, entries, max_shard_bytes, fsync=fsync)
        order = iter(entries)
        try:
            for chunk in tensors:
                for _ in range(len(chunk)):
                    name = next(order)[0]
                    writer.write(name, chunk[name])
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        write_contents(tmp, contents() if callable(contents) else contents)
        return sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _dump(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
