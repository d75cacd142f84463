"""Read and write safetensors files without mmap and without holding whole files in memory.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, then
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
(padded with spaces to a multiple of 8), then the raw little-endian tensor bytes.

Reading with plain ``readinto`` (no mmap) keeps the pages of a multi-GB shard out of the
process's resident set; writing a header computed from the plan lets tensors stream to disk
one at a time.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from upcycle.errors import InputError
from upcycle.io.arrays import STORAGE, nbytes_of

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name: F32, BF16, ...
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; raise InputError on any inconsistency."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise InputError(
                    f"{path}: corrupted safetensors header (length {n}, file {size} bytes)"
                )
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path}: corrupted safetensors header (not JSON)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupted safetensors header")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            if dtype not in STORAGE:
                raise KeyError(dtype)
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: corrupted entry for tensor {name!r}") from None
        if end - begin != nbytes_of(dtype, shape) or begin < 0:
            raise InputError(
                f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}"
            )
        if base + end > size:
            raise InputError(f"{path}: truncated (tensor {name!r} ends past the end of the file)")
        infos[name] = TensorInfo(name, dtype, shape, base + begin, base + end)
    return infos, meta


def read_tensor(path: str, info: TensorInfo) -> np.ndarray:
    """Read one tensor into fresh memory (no mmap), as an array of its storage dtype."""
    out = np.empty(info.shape, dtype=STORAGE[info.dtype])
    with open(path, "rb") as f:
        f.seek(info.begin)
        got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != info.nbytes:
        raise InputError(f"{path}: truncated while reading {info.name!r}")
    return out


def read_rows(path: str, info: TensorInfo, rows: np.ndarray, chunk_bytes: int = 4 << 20):
    """Rows `rows` (sorted, unique) of a tensor's first dimension, as an array of its storage
    dtype: the file is read a chunk of rows at a time, from the next row wanted, so a few rows
    of an embedding cost a few chunks rather than the whole matrix."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows[0] < 0 or rows[-1] >= info.shape[0]):
        raise InputError(f"{path}: rows outside {info.name!r} (first dimension {info.shape[0]})")
    dtype = STORAGE[info.dtype]
    row_bytes = info.nbytes // max(info.shape[0], 1)
    out = np.empty((len(rows), *info.shape[1:]), dtype=dtype)
    buf = np.empty((max(1, chunk_bytes // max(row_bytes, 1)), *info.shape[1:]), dtype=dtype)
    at = 0
    with open(path, "rb") as f:
        while at < len(rows):
            first = int(rows[at])
            n = min(len(buf), info.shape[0] - first)
            f.seek(info.begin + first * row_bytes)
            if f.readinto(memoryview(buf[:n].reshape(-1).view(np.uint8))) != n * row_bytes:
                raise InputError(f"{path}: truncated while reading {info.name!r}")
            end = at + int(np.searchsorted(rows[at:], first + n))
            out[at:end] = buf[rows[at:end] - first]
            at = end
    return out


class StreamingFile:
    """A safetensors file whose header is fixed up front; tensors are appended in header order."""

    def __init__(
        self,
        path: str,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = path
        self._order = [name for name, _, _ in entries]
        self._expect: dict[str, tuple[str, tuple[int, ...]]] = {}
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in entries:
            nb = nbytes_of(dtype, shape)
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + nb],
            }
            self._expect[name] = (dtype, tuple(shape))
            offset += nb
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._next = 0

    def write(self, name: str, a: np.ndarray) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            want = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise RuntimeError(f"writer expected {want}, got {name}")
        dtype, shape = self._expect[name]
        if a.dtype != STORAGE[dtype] or tuple(a.shape) != shape:
            raise RuntimeError(
                f"{name}: planned {dtype} {list(shape)}, got {a.dtype} {list(a.shape)}"
            )
        if a.size:
            self._f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self._order)

    def close(self, sync: bool = True) -> None:
        if self._f.closed:
            return
        if sync and self.complete:
            self._f.flush()
            os.fsync(self._f.fileno())
        self._f.close()
