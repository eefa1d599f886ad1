"""Small I/O helpers of the daemon: an ordered frame writer that never makes its caller wait,
resetting a socket stream, and who owns the other end of a loopback TCP connection.

Owns: the rule that protocol readers never block on a write (they queue frames; one task per
stream writes them in order), and relay sockets that are read only when asked (back-pressure).
Does not own what the frames mean.
"""

from __future__ import annotations

import array
import math
import socket
import struct
from collections.abc import Sequence

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute

__all__ = [
    "FrameReader",
    "FrameWriter",
    "RawSocketStream",
    "peer_uid",
    "reset_stream",
]


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
        # producers --frame (+ sockets to pass)--> run() --bytes--> stream
        self._frames_tx, self._frames_rx = anyio.create_memory_object_stream[_Frame](math.inf)
        self.queued_bytes = 0
        self.written_bytes = 0
        self.closed = False
        self._done = anyio.Event()

    def __repr__(self) -> str:
        return f"<FrameWriter {self.name} queued={self.queued_bytes} written={self.written_bytes}>"

    def send_nowait(self, frame: bytes, passing: Sequence[socket.socket] = ()) -> None:
        """Queue `frame`; silently dropped once the writer is closed (the peer is gone).

        `passing`: sockets handed to the peer with the frame's first byte (SCM_RIGHTS, unix
        sockets only); the writer owns them from now on and closes its copies once they are
        sent (or dropped)."""
        if self.closed or (passing and self._raw is None):
            _close_all(passing)
            return
        if self._raw is not None and not self._pending and not self._writing:
            try:
                sent = _send_passing(self._raw, frame, passing)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # queued: run() meets the same error and ends the writer
            self.written_bytes += sent
            if sent:
                _close_all(passing)  # they went with the first byte
                passing = ()
            if sent == len(frame):
                return
            frame = frame[sent:]
        self._pending += 1
        self.queued_bytes += len(frame)
        try:
            self._frames_tx.send_nowait((frame, tuple(passing)))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.closed = True
            _close_all(passing)

    def close(self) -> None:
        """No more frames; `run()` returns after writing what is queued."""
        self.closed = True
        self._frames_tx.close()

    async def run(self) -> None:
        """Write queued frames until `close()`; returns early if the stream breaks."""
        try:
            async with self._frames_rx:
                try:
                    await self._write_all()
                finally:
                    # frames never written: close the sockets they would have passed
                    self._frames_tx.close()
                    while True:
                        try:
                            _, passing = self._frames_rx.receive_nowait()
                        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                            break
                        _close_all(passing)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.closed = True
        finally:
            self.closed = True
            self._frames_tx.close()
            self._done.set()

    async def _write_all(self) -> None:
        async for frame, passing in self._frames_rx:
            self._pending -= 1
            self.queued_bytes -= len(frame)
            self._writing = True
            try:
                if passing and self._raw is not None:
                    while True:
                        await anyio.wait_writable(self._raw)
                        try:
                            sent = _send_passing(self._raw, frame, passing)
                        except BlockingIOError:
                            continue
                        break
                    frame = frame[sent:]
                    self.written_bytes += sent
            finally:
                _close_all(passing)
            if frame:
                await self._stream.send(frame)
            self._writing = False
            self.written_bytes += len(frame)

    async def wait_flushed(self) -> None:
        """Until `run()` has returned (after `close()`: everything queued was written)."""
        await self._done.wait()


_Frame = tuple[bytes, tuple[socket.socket, ...]]


def _send_passing(raw: socket.socket, frame: bytes, passing: Sequence[socket.socket]) -> int:
    if not passing:
        return raw.send(frame)
    fds = array.array("i", [s.fileno() for s in passing])
    return raw.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def _close_all(socks: Sequence[socket.socket]) -> None:
    for s in socks:
        s.close()


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


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): one exact lookup of a TCP socket
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_TCP_ALL_STATES = 0xFFFFFFFF
_NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE


def _diag_address(family: int, host: str) -> bytes:
    packed = socket.inet_pton(family, host)
    return packed + bytes(16 - len(packed))


def peer_uid(sock: socket.socket) -> int | None:
    """The uid owning the other end of the connected loopback TCP socket `sock` (for the end
    a listener accepted, or will accept: the listener's owner), or None when the kernel cannot
    say (no sock_diag). One netlink request for that one socket, no dump of the table.

    Who answered a connection to a port on this machine is otherwise unknowable: a listener of
    the app that was closed behind the layer's back may have been replaced by another user's."""
    family = sock.family
    mine = sock.getsockname()
    theirs = sock.getpeername()
    # the other end: its source is our destination and the other way round
    sockid = (
        struct.pack(">HH", theirs[1], mine[1])
        + _diag_address(family, str(theirs[0]).split("%", 1)[0])
        + _diag_address(family, str(mine[0]).split("%", 1)[0])
        + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
    )
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, _TCP_ALL_STATES) + sockid
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(2)
            nl.sendto(header + request, (0, 0))
            reply = nl.recv(65536)
    except OSError:
        return None
    if len(reply) < 16:
        return None
    _, kind = struct.unpack_from("=IH", reply)
    if kind == _NLMSG_ERROR:
        return None  # no such socket (already gone) or no inet_diag in this kernel
    # inet_diag_msg: family, state, timer, retrans (4 B), sockid (48 B), expires, rqueue,
    # wqueue, uid, inode
    if len(reply) < 16 + 4 + 48 + 20:
        return None
    expires_at = 16 + 4 + 48
    _, _, _, uid, _ = struct.unpack_from("=IIIII", reply, expires_at)
    return int(uid)
