"""Pipes in tests: a frame's bytes put into one (`piped`), and a process's pipes counted
(`open_pipes`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mirrord._splice import PipePart, PipePool

__all__ = ["open_pipes", "piped"]


def piped(pool: PipePool, data: bytes) -> PipePart:
    """`data` written into a pipe of `pool`, as a part that holds it."""
    pipe = pool.take()
    view, put = memoryview(data), 0
    while put < len(data):
        put += os.write(pipe.w, view[put:])
    return PipePart(pipe, len(data), pool)


def open_pipes(pid: int) -> int:
    """The pipes among `pid`'s open fds (one may close while they are read: not counted)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(fd).startswith("pipe:")
    return count
