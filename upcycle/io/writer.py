"""Streaming sharded safetensors writer and atomic output directories.

The plan fixes every output tensor's name, dtype and shape before any data exists, so shard
boundaries and headers are known up front and each tensor goes to disk as soon as it is
computed: peak memory is the tensors of one layer, whatever the model size.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator

import numpy as np

from upcycle.errors import OutputError
from upcycle.io.arrays import nbytes_of
from upcycle.io.safetensors_io import StreamingFile

Entry = tuple[str, str, tuple[int, ...]]  # name, safetensors dtype, shape
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {
        "KIB": 1 << 10,
        "MIB": 1 << 20,
        "GIB": 1 << 30,
        "TIB": 1 << 40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    unit = next((u for u in units if s.endswith(u)), None)
    num, mult = (s[: -len(unit)], units[unit]) if unit else (s, 1)
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise ValueError(f"cannot read size {text!r} (e.g. 5GB, 500MB)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Split entries, in order, into shards of at most max_shard_bytes (one tensor may exceed it)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nb = nbytes_of(entry[1], entry[2])
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nb
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardedWriter:
    """Writes planned tensors, in plan order, into sharded safetensors plus the index."""

    def __init__(
        self, folder: str, entries: list[Entry], max_shard_bytes: int, fsync: bool = False
    ):
        self.folder = folder
        self.fsync = fsync
        self.shards = plan_shards(entries, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self.total_size = sum(nbytes_of(d, s) for _, d, s in entries)
        self._shard = -1
        self._file: StreamingFile | None = None

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close(sync=self.fsync)
        self._shard += 1
        path = os.path.join(self.folder, self.names[self._shard])
        self._file = StreamingFile(path, self.shards[self._shard])

    def write(self, name: str, tensor: np.ndarray) -> None:
        if self._file is None or self._file.complete:
            self._open_next()
        self._file.write(name, tensor)

    def finish(self) -> None:
        if self._file is None or not self._file.complete or self._shard != len(self.shards) - 1:
            raise RuntimeError("writer finished before every planned tensor was written")
        self._file.close(sync=self.fsync)
        if len(self.shards) > 1:
            weight_map = {
                name: self.names[i] for i, shard in enumerate(self.shards) for name, _, _ in shard
            }
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close(sync=False)


def check_output_dir(out: str, force: bool) -> None:
    """Refuse to overwrite a non-empty folder unless forced; refuse files outright."""
    if os.path.isfile(out):
        raise OutputError(f"{out}: exists and is a file")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise OutputError(f"{out}: exists and is not empty (use --force to replace it)")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(
        parent
    ):  # missing parents are created; the first existing one must be writable
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{parent}: exists and is a file")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: not writable")


@contextlib.contextmanager
def atomic_output_dir(out: str, force: bool = False, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary sibling folder; on success it replaces `out` in one rename.

    On any error, Ctrl-C or a full disk the temporary folder is removed and `out` is untouched,
    so nothing that looks like a finished model is ever left behind. With `fsync` the folder's
    entries are flushed before the rename as well (the files themselves are the writer's job),
    so the result also survives a power cut.
    """
    check_output_dir(out, force)
    out = os.path.abspath(out)
    parent, base = os.path.split(out)
    tmp = os.path.join(parent, f".{base}.upcycle-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # created inside the try: a Ctrl-C right after mkdir must still remove it
        os.makedirs(tmp)  # with any missing parents
        yield tmp
        if fsync:
            _fsync_dir(tmp)
        if os.path.isdir(out):
            old = os.path.join(parent, f".{base}.upcycle-old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        if fsync:
            _fsync_dir(parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _NO_SPACE:
            raise OutputError(
                f"{out}: no space left on the device while writing; nothing was kept"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
