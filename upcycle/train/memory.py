"""Giving freed CPU memory back to the system: during training, and in `upcycle prune`.

A training step on CPU allocates and frees the same few hundred MB per layer: projections,
attention temporaries, the recomputed activations of checkpointed layers. glibc serves
tensors under its mmap threshold (which rises to 32 MB once big blocks have been freed) from
its heap and reuses little of what the previous layers freed. Measured on the default model at
1k tokens per step: resident memory grew by about 25 MB per layer during the forward pass
while live tensors grew by 3 MB per layer (the difference disappears when the heap is trimmed
after every layer), so the peak RSS was 870 MB above what tensors ever used.

`HeapTrimmer` (`upcycle train --trim-memory`) returns those pages: hooked on every decoder
layer's attention (which runs in the forward pass and again in each checkpoint recompute), it
calls `malloc_trim(0)` whenever resident memory has grown by 512 MB since the last trim.
Freed pages are faulted in again when reused, so each trim costs time: measured here at 1
thread (docs/benchmarks.md), a 128 MB limit gave 1.8 GB peak RSS for a step about 5% slower
than untrimmed (2.6-2.7 GB), 512 MB gave 2.1-2.2 GB at no measurable cost (a few trims per
step instead of about ten). Page faults are unusually expensive on this sandboxed machine, so
bare-metal machines pay less. It stays opt-in: it needs glibc and helps only on CPU.

`upcycle prune` holds one decoder layer at a time, so the caches are most of what it holds
above that layer: it fixes glibc's mmap threshold while it runs (`freeing_eagerly`), asks MKL
not to cache GEMM buffers (`uncached_blas`, before torch loads) and trims after every pass
(`trim_heap`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc
        return None
    return libc


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
SETTLED_MMAP_THRESHOLD = 32 << 20  # where glibc's dynamic threshold ends up in a torch process


@functools.cache
def _mkl():
    """torch's library, where MKL (its x86 BLAS, linked in) exports its service functions under
    internal names (`mkl_serv_free_buffers` for `mkl_free_buffers`), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import torch

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        lib.mkl_serv_free_buffers  # noqa: B018
    except (OSError, AttributeError):  # no such library, or a BLAS other than MKL
        return None
    return lib


@contextlib.contextmanager
def freeing_eagerly():
    """While inside, glibc serves every allocation of 64 KB or more by its own mapping,
    unmapped when freed: its threshold does not rise to 32 MB after big blocks are freed, which
    keeps transient tensors resident in its heap. For a job whose peak matters more than a few
    page faults (`upcycle prune`). glibc's dynamic threshold cannot be switched back on, so on
    leaving it is fixed where that rule leaves it in a torch process (32 MB, and the trim
    threshold twice that): later work in the process allocates as it would have."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 10)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, 2 * SETTLED_MMAP_THRESHOLD)


def uncached_blas() -> bool:
    """Ask MKL not to cache its GEMM buffers between calls (`MKL_DISABLE_FAST_MM`): with the
    cache, one pass of a decoder layer over a 256-token block leaves 30-50 MB of buffers on
    two threads; without, a product's buffers live only while it runs. MKL reads the variable
    when torch loads it, so this works only before torch is imported; True if it was in time.
    A user's own setting wins."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
    return True


def trim_heap() -> None:
    """Give the heap's free pages, and the GEMM buffers MKL caches, back to the system (glibc
    and MKL; elsewhere nothing happens)."""
    mkl = _mkl()
    if mkl is not None:
        mkl.mkl_serv_free_buffers()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class HeapTrimmer:
    """Call `malloc_trim(0)` whenever resident memory has grown by `limit_bytes` since the
    last trim (glibc keeps no count of free bytes that are still resident)."""

    def __init__(self, limit_bytes: int = 512 << 20):
        self.libc = _libc()
        self.limit = limit_bytes
        self.trims = 0
        self.handles: list = []
        self.page = os.sysconf("SC_PAGE_SIZE") if self.libc else 0
        self.baseline = self.resident_bytes()

    @property
    def available(self) -> bool:
        return self.libc is not None

    def resident_bytes(self) -> int:
        if self.libc is None:
            return 0
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * self.page

    def maybe_trim(self, *_args) -> None:
        if self.libc is None:
            return
        resident = self.resident_bytes()
        self.baseline = min(self.baseline, resident)  # memory given back by other means
        if resident - self.baseline > self.limit:
            self.libc.malloc_trim(0)
            self.trims += 1
            self.baseline = self.resident_bytes()

    def attach(self, model) -> int:
        """Hook every module named `self_attn` (decoder layers' attention); returns how many."""
        if self.libc is None:
            return 0
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] == "self_attn":
                self.handles.append(module.register_forward_hook(self.maybe_trim))
        return len(self.handles)

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
