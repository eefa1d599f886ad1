"""In-memory byte pipes between the incoming code and a channel's relay.

Owns: `pipe_pair()`, two connected `anyio.abc.ByteStream` ends living on one event loop. The
incoming code keeps one end and hands the other to `Channel.start_incoming`: a mirrored
flow (bytes fed from the sniffer, replies discarded) or one filtered HTTP request (the request
written in, the response read back). Cheaper than a socketpair and no file descriptors.
Does not own: what flows through them.

Backpressure: `send()` waits while the peer has more than `limit` bytes unread;
`send_nowait()` never waits and reports whether the bytes fit (the sniffer cannot wait: the
kernel would drop packets for every flow instead of one slow consumer's).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

__all__ = ["PipeEnd", "pipe_pair"]

DEFAULT_LIMIT = 4 * 1024 * 1024


class _Half:
    """One direction of a pipe."""

    __slots__ = (
        "buffered",
        "changed",
        "chunks",
        "closed",
        "discard",
        "eof",
        "errno",
        "limit",
        "reader",
    )

    def __init__(self, limit: int) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.limit = limit
        self.eof = False  # the writer is done
        self.closed = False  # the reader is gone: writes fail (or vanish with `discard`)
        self.discard = False
        self.errno = 0  # why the writer ended (`abort`); 0: a plain close
        # what a waiting end waits on; made only when one waits (most writes wake nobody)
        self.changed: anyio.Event | None = None
        # the reading end's taker of bytes written while nothing is unread (`read_directly`)
        self.reader: Callable[[bytes], bool] | None = None

    async def wait(self) -> None:
        if self.changed is None:
            self.changed = anyio.Event()
        await self.changed.wait()

    def wake(self) -> None:
        changed, self.changed = self.changed, None
        if changed is not None:
            changed.set()

    def put(self, item: bytes) -> None:
        """Queue `item` for the reader, or hand it over directly: nothing is unread and the
        reader's taker takes it."""
        if not self.chunks and self.reader is not None and self.reader(item):
            return
        self.chunks.append(item)
        self.buffered += len(item)
        self.wake()


class PipeEnd(anyio.abc.ByteStream):
    def __init__(self, rx: _Half, tx: _Half, name: str) -> None:
        self._rx = rx
        self._tx = tx
        self.name = name
        # called by `abort()`: whoever relays the other end learns at once (not only once it
        # has read what is queued, which may wait for a window that never opens)
        self.on_abort: Callable[[int], None] | None = None

    def __repr__(self) -> str:
        return (
            f"<PipeEnd {self.name} unread={self._rx.buffered} peer_unread={self._tx.buffered} "
            f"eof_in={self._rx.eof} closed={self._rx.closed}>"
        )

    @property
    def unread(self) -> int:
        return self._rx.buffered

    @property
    def peer_unread(self) -> int:
        return self._tx.buffered

    def read_directly(self, reader: Callable[[bytes], bool] | None) -> None:
        """While set, bytes written to this end when none are unread go to `reader` at once,
        in the writer's call, instead of waking this end's `receive()`; `reader` returns
        False to leave them queued (it cannot take them now). Its relay sets it while it
        reads (`FlowRelay`): a mirrored request costs no task wake-up in the agent."""
        self._rx.reader = reader

    def unreceive(self, data: bytes) -> None:
        """Put bytes back in front of what `receive()` returns next."""
        if data:
            rx = self._rx
            rx.chunks.appendleft(data)
            rx.buffered += len(data)

    def discard_peer_writes(self) -> None:
        """What the other end sends is dropped unread (a mirrored flow's replies)."""
        self._rx.discard = True
        self._rx.chunks.clear()
        self._rx.buffered = 0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        rx = self._rx
        while not rx.chunks:
            if rx.closed:
                raise anyio.ClosedResourceError
            if rx.eof:
                if rx.errno:
                    # the writer was aborted (`abort`): a failure, not an end
                    raise anyio.BrokenResourceError from OSError(rx.errno, os.strerror(rx.errno))
                raise anyio.EndOfStream
            await rx.wait()
        chunk = rx.chunks.popleft()
        if len(chunk) > max_bytes:
            rx.chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        rx.buffered -= len(chunk)
        rx.wake()
        return chunk

    def _check_send(self) -> bool:
        tx = self._tx
        if self._rx.closed:
            raise anyio.ClosedResourceError
        if tx.eof:
            raise anyio.ClosedResourceError
        if tx.closed:
            if tx.discard:
                return False
            raise anyio.BrokenResourceError
        return True

    async def send(self, item: bytes) -> None:
        if not item or not self._check_send():
            return
        tx = self._tx
        while tx.buffered > tx.limit and not tx.closed and not tx.discard:
            await tx.wait()
        if not self._check_send() or tx.discard:
            return
        tx.put(bytes(item))

    def send_nowait(self, item: bytes) -> bool:
        """Queue `item` without waiting; False if the peer has `limit` bytes unread already
        (nothing is queued then)."""
        if not item or not self._check_send():
            return True
        tx = self._tx
        if tx.discard:
            return True
        if tx.buffered + len(item) > tx.limit:
            return False
        tx.put(bytes(item))
        return True

    async def send_eof(self) -> None:
        self.send_eof_nowait()

    def send_eof_nowait(self) -> None:
        self._tx.eof = True
        self._tx.wake()

    @property
    def peer_errno(self) -> int:
        """The errno the other end was aborted with (0: it closed normally or is open)."""
        return self._rx.errno

    def abort(self, errno_: int) -> None:
        """Close, telling the other end why (`peer_errno`): once it has read what was sent,
        its `receive()` raises `BrokenResourceError` (from `OSError(errno_)`), not
        `EndOfStream`. The first end is the one told: an abort after this end closed or
        aborted already changes nothing (a later, vaguer reason must not replace it)."""
        if self._rx.closed:  # closed or aborted before (a half-close does not count)
            return
        self._tx.errno = errno_
        self.close_nowait()
        if self.on_abort is not None:
            on_abort, self.on_abort = self.on_abort, None
            on_abort(errno_)

    async def aclose(self) -> None:
        self.close_nowait()

    def close_nowait(self) -> None:
        rx, tx = self._rx, self._tx
        rx.closed = True
        rx.discard = True  # the peer's later writes vanish: it sees our EOF, not an error
        rx.chunks.clear()
        rx.buffered = 0
        tx.eof = True
        rx.wake()
        tx.wake()

    @property
    def extra_attributes(self) -> Any:
        return {}


def pipe_pair(
    limit: int = DEFAULT_LIMIT, names: tuple[str, str] = ("a", "b")
) -> tuple[PipeEnd, PipeEnd]:
    """Two connected ends: what `a` sends, `b` receives, and the other way round."""
    a_to_b, b_to_a = _Half(limit), _Half(limit)
    return PipeEnd(b_to_a, a_to_b, names[0]), PipeEnd(a_to_b, b_to_a, names[1])
