"""Process-wide malloc tuning for the long-lived processes that relay bulk data (daemon, agent).

Owns: `tune_malloc()` and `trim_malloc()`. Does not own anything else; the CLI and the layer
never call them.

Why: every remote read or relayed chunk builds frames of up to 2 MiB (CBOR encode, decode,
framing). glibc serves allocations above its mmap threshold (128 KiB at start) with a fresh
`mmap` and returns them with `munmap`, so every such buffer is page-faulted in again: on the
benchmark machine (a VM) encoding one 1 MiB `Data` frame took 1.1 ms this way and 0.06 ms
from the heap (docs/performance.md). Raising the threshold above the largest frame keeps those
buffers in the heap, where freed memory is reused; the trim threshold bounds how much free
memory the heap keeps before giving it back to the system. That bound is high (a relay at full
speed must not give pages back and fault them in again per frame), so a long-lived process
calls `trim_malloc()` once a burst is over: the daemon after a session closed (it kept ~100 MiB
more than a fresh daemon after `mirror_capacity`'s load, issue 18).
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["trim_malloc", "tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 * 1024 * 1024  # above MAX_FRAME_SIZE (2 MiB) and its CBOR copies
TRIM_THRESHOLD = 64 * 1024 * 1024


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library this process runs on, through the symbols already loaded into it (an
    interpreter is linked against it): no `ctypes.util.find_library`, whose import and
    lookup (it may run `ldconfig`) cost every daemon and agent start several milliseconds."""
    return ctypes.CDLL(None)


def tune_malloc() -> bool:
    """Apply the thresholds (glibc only); False where `mallopt` is missing or refuses."""
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl): its allocator has no such thresholds
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = int(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) == 1
    return int(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) == 1 and ok


def trim_malloc() -> bool:
    """Give the heap's free memory back to the system now (`malloc_trim(0)`; glibc only).
    Costs a walk of the heap (about a millisecond for tens of MiB): call it when idle, not per
    frame. True when memory was released."""
    try:
        malloc_trim = _libc().malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return int(malloc_trim(0)) == 1
