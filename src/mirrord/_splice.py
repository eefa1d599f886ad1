"""Moving a large frame's bytes as pages, not copies: a pipe between two descriptors.

Owns: the pipes (`Pipe`, `PipePool`), a frame's bytes held in one (`PipePart`), which a
`mirrord._frames.FrameWriter` writes into its socket with `splice`, and the rest of a large
frame taken from a socket into pipes (`PipeFill`). Does not own: which frames go this way
(the agent's large `FileData` and the daemon's forwarding of them; the layer's large
`FileWrite`, forwarded by the daemon and written into the file by the agent) nor the frames'
heads.

Why: a relayed file read crossed the agent (`pread` into its memory, then `sendmsg`) and the
daemon (`recv` into its memory, then `sendmsg`) with four copies of each byte. Through a pipe,
the file's page-cache pages go into the pipe (`splice` from the file), from it into the unix
socket to the daemon, from that socket into the daemon's pipe and from it into the unix
socket to the layer, each time by reference: the layer's receive into the app's buffer is the
only copy left. Measured with bare processes on this machine (docs/performance.md): 0.86 of
a page-cache read against 0.35 with copies. Unix sockets only: into or out of TCP the kernel
copies anyway (measured: no gain).

A pipe's capacity is `PIPE_SIZE` (raised with F_SETPIPE_SZ to /proc/sys/fs/pipe-max-size's
default, which any process may ask for) and it counts pieces of pages, not bytes: a file's
1 MiB at an offset that is not page-aligned spans 257 pages, one more than the pipe holds.
Whoever fills a pipe copes with it filling up early: the agent reads the rest of such a read
into memory (a part of its own after the pipe's), the daemon splices the rest of such a frame
into another pipe, up to three, then copies (`PipeFill`). Nobody waits for room in a pipe that
only its own frame's writer would make. A process that cannot get such a pipe (past /proc/sys/fs/pipe-user-pages-soft)
copies, as before.
"""

from __future__ import annotations

import fcntl
import os
import sys
import termios
import threading
from collections.abc import Callable

__all__ = [
    "PIPE_SIZE",
    "SPLICE_MAX",
    "Pipe",
    "PipeFill",
    "PipePart",
    "PipePool",
    "release_parts",
    "splice_supported",
]

# A pipe's capacity: room for the largest data a message carries (MAX_DATA_CHUNK) when its
# pages are whole; the default /proc/sys/fs/pipe-max-size.
PIPE_SIZE = 1024 * 1024
# The most bytes of one frame that go through a pipe.
SPLICE_MAX = PIPE_SIZE
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# Free pipes kept per pool: a few reads in flight each hold one; more are closed when given
# back.
_POOL_KEEP = 8


def splice_supported() -> bool:
    """Whether this platform has `os.splice` (Linux, Python 3.10+)."""
    return hasattr(os, "splice")


class Pipe:
    """A pipe of `PIPE_SIZE` bytes' capacity, non-blocking at both ends. `OSError` if the
    capacity cannot be set (an unprivileged user past /proc/sys/fs/pipe-user-pages-soft)."""

    __slots__ = ("r", "w")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if fcntl.fcntl(self.w, _F_SETPIPE_SZ, PIPE_SIZE) < PIPE_SIZE:
                raise OSError("pipe capacity below PIPE_SIZE")
        except OSError:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<Pipe r={self.r} w={self.w}>"

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


class PipePool:
    """Pipes to reuse (creating one costs three system calls). Thread-safe: the agent's
    workers take pipes, its event loop gives them back."""

    def __init__(self, keep: int = _POOL_KEEP) -> None:
        self._free: list[Pipe] = []
        self._keep = keep
        self._lock = threading.Lock()
        self._closed = False
        self.created = 0

    def __repr__(self) -> str:
        return f"<PipePool free={len(self._free)} created={self.created}>"

    def take(self) -> Pipe:
        """An empty pipe; `OSError` if none can be made."""
        with self._lock:
            if self._free:
                return self._free.pop()
        pipe = Pipe()
        self.created += 1
        return pipe

    def give(self, pipe: Pipe, empty: bool) -> None:
        """Take `pipe` back; kept for reuse only if `empty` (all its bytes were read)."""
        with self._lock:
            if empty and not self._closed and len(self._free) < self._keep:
                self._free.append(pipe)
                return
        pipe.close()

    def close(self) -> None:
        """Close the free pipes; pipes given back later are closed too."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for pipe in free:
            pipe.close()


class PipePart:
    """A frame's part whose `size` bytes wait in `pipe` (a writer splices them into its
    socket). Owns the pipe until `release()`: called once, by whoever writes or drops it."""

    __slots__ = ("left", "pipe", "pool", "size")

    def __init__(self, pipe: Pipe, size: int, pool: PipePool) -> None:
        self.pipe = pipe
        self.size = size
        self.left = size
        self.pool = pool

    def __repr__(self) -> str:
        return f"<PipePart {self.left}/{self.size} bytes>"

    def __len__(self) -> int:
        return self.left

    def splice_into(self, fd: int) -> int:
        """Move what the socket `fd` takes now (non-blocking); the bytes moved.
        `BlockingIOError` when it takes none."""
        n = os.splice(self.pipe.r, fd, self.left, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        self.left -= n
        return n

    def release(self) -> None:
        """Give the pipe back (kept when it was written out whole, else closed)."""
        pipe, self.pipe = self.pipe, None  # type: ignore[assignment]
        if pipe is not None:
            self.pool.give(pipe, self.left == 0)


def release_parts(parts: object) -> None:
    """Release the `PipePart`s among `parts` (a frame that will not be written)."""
    if isinstance(parts, list | tuple):
        for part in parts:
            if isinstance(part, PipePart):
                part.release()


class PipeFill:
    """The next `size` bytes of a socket (the rest of a large frame) taken into pipes, by
    reference (`FrameReader.run`'s `splice`, or a reader's own loop): `receive_from` as the
    socket has them, then `done(self)`. A pipe holds 256 pieces of pages, and the pieces a
    socket hands on are those its sender wrote (a spliced pipe's, up to 256, then the bytes
    sent after them): when one pipe is full, the rest goes into the next (at most
    `PIPES_PER_FILL`; past them every byte is copied into `copy`, instead of waiting for room
    that only writing the frame out would make). Whoever gets `done` takes the bytes:
    `take_parts()` (the pipes, in order), or `copy` when it is not None; or `close()`."""

    __slots__ = ("copy", "done", "filled", "left", "pipes", "pool", "size")

    def __init__(
        self, pool: PipePool, pipe: Pipe, size: int, done: Callable[[PipeFill], None]
    ) -> None:
        self.pool = pool
        self.pipes = [pipe]
        self.filled = [0]  # the bytes in each pipe
        self.size = size
        self.left = size
        self.done = done
        self.copy: bytearray | None = None  # the bytes, when the pipes could not hold them

    def __repr__(self) -> str:
        return f"<PipeFill {self.size - self.left}/{self.size} bytes in {len(self.pipes)} pipes>"

    def receive_from(self, fd: int) -> int:
        """Move what the socket `fd` has now (non-blocking); the bytes moved, 0 at the end of
        the stream; `BlockingIOError` when it has none. Calls `done` with the last bytes."""
        if self.copy is not None:
            return self._copy_from(fd)
        try:
            moved = os.splice(
                fd, self.pipes[-1].w, self.left, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
            )
        except BlockingIOError:
            if not unread(fd):
                raise
            # the socket has bytes but the pipe takes none: it is full
            if len(self.pipes) < PIPES_PER_FILL:
                try:
                    self.pipes.append(self.pool.take())
                    self.filled.append(0)
                    return self.receive_from(fd)
                except OSError:
                    pass
            self._pipes_to_copy()
            return self._copy_from(fd)
        self.left -= moved
        self.filled[-1] += moved
        if moved and not self.left:
            self.done(self)
        return moved

    def take_parts(self) -> list[PipePart]:
        """The bytes, one `PipePart` per pipe that holds some (each released by whoever
        writes or drops it); the pipes are no longer this fill's."""
        pipes, filled = self.pipes, self.filled
        self.pipes, self.filled = [], []
        parts = []
        for pipe, n in zip(pipes, filled, strict=True):
            if n:
                parts.append(PipePart(pipe, n, self.pool))
            else:
                self.pool.give(pipe, True)
        return parts

    def close(self) -> None:
        """Drop the pipes (the bytes in them with them)."""
        for pipe in self.pipes:
            pipe.close()
        self.pipes, self.filled = [], []

    def _pipes_to_copy(self) -> None:
        copy = self.copy = bytearray(self.size)
        view, got = memoryview(copy), 0
        for pipe, filled in zip(self.pipes, self.filled, strict=True):
            end = got + filled
            while got < end:
                got += os.readv(pipe.r, [view[got:end]])
        for pipe in self.pipes:
            self.pool.give(pipe, True)  # empty again
        self.pipes, self.filled = [], []

    def _copy_from(self, fd: int) -> int:
        assert self.copy is not None
        moved = os.readv(fd, [memoryview(self.copy)[self.size - self.left :]])
        self.left -= moved
        if moved and not self.left:
            self.done(self)
        return moved


PIPES_PER_FILL = 3


def unread(fd: int) -> int:
    """Bytes waiting to be read on the socket `fd` (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)
