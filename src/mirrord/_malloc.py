"""Process-wide malloc tuning for the long-lived processes that relay bulk data (daemon, agent).

Owns: `tune_malloc()`. Does not own anything else; the CLI and the layer never call it.

Why: every remote read or relayed chunk builds frames of up to 2 MiB (CBOR encode, decode,
framing). glibc serves allocations above its mmap threshold (128 KiB at start) with a fresh
`mmap` and returns them with `munmap`, so every such buffer is page-faulted in again: on the
benchmark machine (a VM) encoding one 1 MiB `Data` frame took 1.1 ms this way and 0.06 ms
from the heap (docs/performance.md). Raising the threshold above the largest frame keeps those
buffers in the heap, where freed memory is reused; the trim threshold bounds how much free
memory the heap keeps before giving it back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 * 1024 * 1024  # above MAX_FRAME_SIZE (2 MiB) and its CBOR copies
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_malloc() -> bool:
    """Apply the thresholds (glibc only); False where `mallopt` is missing or refuses."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl): its allocator has no such thresholds
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = int(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) == 1
    return int(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) == 1 and ok
