"""What glibc keeps of the tensors a process frees, and giving it back.

glibc serves mid-sized buffers from its heap (up to its mmap threshold, which rises with each mapped buffer freed, to
32 MB) and keeps the freed ones resident. Swapping a model's layers for compressed ones frees exactly such buffers:
after `compress.load` of a 50%-packed checkpoint of an 88M-parameter model the process held 150 MB for 110 MB of
tensors, 37 MB of it free heap (benchmarks/load_memory.py). Not glibc (musl, macOS): nothing to do."""
from __future__ import annotations

import ctypes
import functools


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim, libc.mallopt  # noqa: B018 (glibc only: AttributeError elsewhere)
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_heap() -> None:
    """Return the heap's free pages to the system (after a load or a pass has swapped layers; ~ms)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))


def map_buffers_from_1mb() -> None:
    """Serve buffers of 1 MB and more from their own mappings, unmapped when freed (the offloaded runs, which read
    each layer in and write it back: without it a --max-memory run peaked near the uncapped one)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(1 << 20))  # M_MMAP_THRESHOLD
