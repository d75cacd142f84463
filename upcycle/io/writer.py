"""Streaming sharded safetensors writer, output claims and atomic output directories.

The plan fixes every output tensor's name, dtype and shape before any data exists, so shard
boundaries and headers are known up front and each tensor goes to disk as soon as it is
computed: peak memory is the tensors of one layer, whatever the model size.

An output folder is claimed before anything is written to it (`claim_output_dir`), so that of
two upcycle processes writing the same OUT only one goes on, and it appears in one rename when
complete (`atomic_output_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import os
import shutil
import sys
import threading
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no claims (concurrent writers then race as they did before)
    fcntl = None

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


_held = threading.local()  # .claims: {output this thread has claimed: whether it is locked}
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


@contextlib.contextmanager
def claim_output_dir(out: str, force: bool = False) -> Iterator[bool]:
    """Hold the claim on `out` that every upcycle writer of `out` takes before its work.

    The claim is an exclusive advisory lock (flock) on the hidden sibling file
    `.OUT.upcycle-claim`, which names the holder's pid. The kernel drops the lock when the
    holder ends, however it ends (SIGKILL, crash), so a claim left behind never blocks a later
    run. A live claim makes a writer without `force` fail at once (OutputError, naming `out`);
    with `force` the writer waits for it and then replaces the holder's result. Once claimed,
    `out` is checked again (check_output_dir): the holder may just have finished it.
    A thread that already holds the claim on `out` (a writer called by another) re-enters.
    Yields whether `out` is locked: False where the system or file system has no locks, and
    writers then go on unclaimed, as before claims existed.
    """
    check_output_dir(out, force)  # before anything is created
    key = os.path.abspath(out)
    claims = _held.__dict__.setdefault("claims", {})
    if key in claims:
        yield claims[key]
        return
    claim = _take_claim(key, out, force) if fcntl is not None else None
    claims[key] = claim is not None
    try:
        check_output_dir(out, force)
        yield claims[key]
    finally:
        del claims[key]
        if claim is not None:
            fd, lock = claim
            with contextlib.suppress(OSError):  # before close: none may lock a file we remove
                os.unlink(lock)
            os.close(fd)


def claims_output_dir(fn):
    """Run `fn` holding the claim on its `out` argument (claim_output_dir with its `force`),
    so that a concurrent writer of the same folder stops before `fn`'s expensive work."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with claim_output_dir(bound.arguments["out"], bound.arguments["force"]):
            return fn(*args, **kwargs)

    return run


def _take_claim(path: str, shown: str, force: bool) -> tuple[int, str] | None:
    parent, base = os.path.split(path)
    lock = os.path.join(parent, f".{base}.upcycle-claim")
    os.makedirs(parent, exist_ok=True)  # with any missing parents, as the output will be
    waited = False
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's claim file: locking needs no write access
            fd = os.open(lock, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _claim_owner(fd)
                if not force:
                    raise OutputError(
                        f"{shown}: another upcycle process{owner} is writing it "
                        "(wait for it to finish, or choose another folder)"
                    ) from None
                if not waited:
                    print(
                        f"{shown}: another upcycle process{owner} is writing it; "
                        "waiting for it to finish, then replacing its output",
                        file=sys.stderr,
                    )
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(lock)
                return None
            if _same_file(fd, lock):
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                return fd, lock
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed the file we locked: claim the current one


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _claim_owner(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(os.pread(fd, 32, 0).decode())})"
    return ""


@contextlib.contextmanager
def atomic_output_dir(out: str, force: bool = False, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary sibling folder; on success it becomes `out` in one rename.

    The claim on `out` (claim_output_dir) is held throughout, taken here unless the caller
    holds it already, so no other upcycle process publishes `out` meanwhile. Without `force`
    the final rename never replaces a folder that is not empty. On any error, Ctrl-C or a full
    disk the temporary folder is removed and `out` is untouched, so nothing that looks like a
    finished model is ever left behind. With `fsync` the folder's entries are flushed before
    the rename as well (the files themselves are the writer's job), so the result also
    survives a power cut.
    """
    with claim_output_dir(out, force) as locked:
        shown, out = out, os.path.abspath(out)
        parent, base = os.path.split(out)
        if locked:  # the claim is ours: temporaries of `out` here are dead writers'
            _remove_stale_temporaries(parent, base)
        tmp = os.path.join(parent, f".{base}.upcycle-tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:  # created inside the try: a Ctrl-C right after mkdir must still remove it
            os.makedirs(tmp)  # with any missing parents
            yield tmp
            if fsync:
                _fsync_dir(tmp)
            if force and os.path.isdir(out):
                old = os.path.join(parent, f".{base}.upcycle-old-{os.getpid()}")
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                _publish(tmp, out, shown)
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


def _publish(tmp: str, out: str, shown: str) -> None:
    """Rename `tmp` to `out`, which may only be missing or an empty folder."""
    try:
        os.rename(tmp, out)  # fails, atomically, if `out` has something in it by now
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise OutputError(
                f"{shown}: exists and is not empty (use --force to replace it)"
            ) from None
        raise


def _remove_stale_temporaries(parent: str, base: str) -> None:
    """Remove what writers of `out` that died left behind; only run holding the claim."""
    prefix = f".{base}.upcycle-tmp-"
    for name in os.listdir(parent):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
