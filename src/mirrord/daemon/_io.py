"""Small I/O helpers of the daemon: an ordered frame writer that never makes its caller wait,
and resetting a socket stream.

Owns: the rule that protocol readers never block on a write (they queue frames; one task per
stream writes them in order), and relay sockets that are read only when asked (back-pressure).
Does not own what the frames mean.
"""

from __future__ import annotations

import math
import socket
import struct

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute

__all__ = ["FrameReader", "FrameWriter", "RawSocketStream", "accept_raw", "reset_stream"]


class FrameWriter:
    """Frames queued with `send_nowait()` (never waits), written to `stream` in order by `run()`.

    The queue is unbounded on purpose: what goes through it is bounded elsewhere (connection
    data by the credit window, replies by the requests that caused them), and a bounded queue
    would make the agent-stream reader wait on a slow writer.

    On a unix socket, a frame sent while nothing is queued or being written goes straight into
    the socket (non-blocking `send`): a forwarded request or reply then costs no task switch,
    which is a good part of a remote call's latency (docs/performance.md). Only what the socket
    does not take at once is queued. (Not on TCP or transport-based streams: asyncio's
    transports buffer.)
    """

    def __init__(self, stream: anyio.abc.ByteSendStream, name: str) -> None:
        self._stream = stream
        self.name = name
        self._raw = _plain_unix_socket(stream)  # type: ignore[arg-type]
        if self._raw is not None:
            _grow_send_buffer(self._raw)
        self._pending = 0  # frames queued and not yet taken by run()
        self._writing = False  # run() is in the middle of a frame
        # producers --frame--> run() --bytes--> stream
        self._frames_tx, self._frames_rx = anyio.create_memory_object_stream[bytes](math.inf)
        self.queued_bytes = 0
        self.written_bytes = 0
        self.closed = False
        self._done = anyio.Event()

    def __repr__(self) -> str:
        return f"<FrameWriter {self.name} queued={self.queued_bytes} written={self.written_bytes}>"

    def send_nowait(self, frame: bytes) -> None:
        """Queue `frame`; silently dropped once the writer is closed (the peer is gone)."""
        if self.closed:
            return
        if self._raw is not None and not self._pending and not self._writing:
            try:
                sent = self._raw.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # queued: run() meets the same error and ends the writer
            self.written_bytes += sent
            if sent == len(frame):
                return
            frame = frame[sent:]
        self._pending += 1
        self.queued_bytes += len(frame)
        try:
            self._frames_tx.send_nowait(frame)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.closed = True

    def close(self) -> None:
        """No more frames; `run()` returns after writing what is queued."""
        self.closed = True
        self._frames_tx.close()

    async def run(self) -> None:
        """Write queued frames until `close()`; returns early if the stream breaks."""
        try:
            async with self._frames_rx:
                async for frame in self._frames_rx:
                    self._pending -= 1
                    self.queued_bytes -= len(frame)
                    self._writing = True
                    await self._stream.send(frame)
                    self._writing = False
                    self.written_bytes += len(frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.closed = True
        finally:
            self.closed = True
            self._frames_tx.close()
            self._done.set()

    async def wait_flushed(self) -> None:
        """Until `run()` has returned (after `close()`: everything queued was written)."""
        await self._done.wait()


def _plain_unix_socket(stream: anyio.abc.AnyByteStream) -> socket.socket | None:
    try:
        raw = stream.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return None
    # a plain socket only: asyncio's transport streams (TransportSocket) buffer
    if isinstance(raw, socket.socket) and raw.family == socket.AF_UNIX:
        return raw
    return None


SEND_BUFFER = 4 * 1024 * 1024


def _grow_send_buffer(sock: socket.socket) -> None:
    """A unix socket's send buffer bounds what one write moves (the peer's receive buffer does
    not count): the default ~200 KiB splits every 1 MiB file chunk into five or more writes,
    each a wake-up of both sides. Best effort: the kernel caps it at net.core.wmem_max."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass


class FrameReader:
    """`receive()` for a protocol reader: the stream's `receive`, minus a scheduling point.

    anyio's `receive` on a unix socket first yields to the event loop (a whole loop iteration)
    and then registers and unregisters the socket with the selector for every wait. A reader
    that waits for the next request or reply pays that on every remote call, so on a plain unix
    socket this reads directly and waits with `anyio.wait_readable`; it yields only when data
    was there twice in a row, so a peer that never stops sending cannot starve other tasks.
    """

    def __init__(self, stream: anyio.abc.ByteReceiveStream, max_bytes: int) -> None:
        self._stream = stream
        self._max = max_bytes
        self._raw = _plain_unix_socket(stream)  # type: ignore[arg-type]
        self._ready_before = False

    async def receive(self) -> bytes:
        """The next bytes; raises like `ByteReceiveStream.receive` (EndOfStream at the end)."""
        raw = self._raw
        if raw is None:
            return await self._stream.receive(self._max)
        if self._ready_before:
            await anyio.lowlevel.checkpoint()
        waited = False
        while True:
            try:
                data = raw.recv(self._max)
            except BlockingIOError:
                waited = True
                await anyio.wait_readable(raw)
                continue
            except OSError as exc:
                if raw.fileno() < 0:
                    raise anyio.ClosedResourceError from None
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            self._ready_before = not waited
            return data


class RawSocketStream(anyio.abc.SocketStream):
    """A stream over a connected socket that reads only when `receive()` is called.

    anyio's asyncio streams for TCP sockets (`accept()`, `SocketStream.from_socket()`) read
    through an asyncio transport that is only paused after a `receive()` had to wait: a user
    app that uploads faster than the agent's credit window lets the daemon read, kept the
    transport reading into an unbounded queue (a 4 GiB upload grew the daemon to 3.1 GB).
    Here unread bytes stay in the kernel's socket buffer, so TCP's own window stops the app
    while the relay waits for credit."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._closed = False

    def __repr__(self) -> str:
        return f"<RawSocketStream fd={self._sock.fileno()} closed={self._closed}>"

    @property
    def _raw_socket(self) -> socket.socket:
        return self._sock

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()  # a peer that never stops sending starves nobody
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        view = memoryview(item)
        while view:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self._sock)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            view = view[sent:]

    async def send_eof(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise anyio.BrokenResourceError from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)  # wakes a task waiting in wait_readable/writable
            self._sock.close()
        await anyio.lowlevel.checkpoint()


async def accept_raw(listener: anyio.abc.SocketListener) -> RawSocketStream:
    """The next connection on `listener`, as a `RawSocketStream` (see there why not the
    listener's own `accept()`)."""
    raw = listener.extra(SocketAttribute.raw_socket)
    while True:
        try:
            sock, _ = raw.accept()
        except BlockingIOError:
            await anyio.wait_readable(raw)
            continue
        except OSError as exc:
            if raw.fileno() < 0:
                raise anyio.ClosedResourceError from None
            raise anyio.BrokenResourceError from exc
        return RawSocketStream(sock)


def reset_stream(stream: anyio.abc.ByteStream) -> None:
    """Make the next close send a TCP RST (SO_LINGER 0), so the peer sees ECONNRESET."""
    try:
        sock = stream.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
