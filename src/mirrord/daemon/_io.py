"""Small socket helpers of the daemon: relay sockets that are read only when asked
(back-pressure), resetting a socket stream, and who owns the other end of a loopback TCP
connection.

Does not own frame I/O (`mirrord._frames`) nor what the frames mean.
"""

from __future__ import annotations

import socket
import struct

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute

__all__ = [
    "RawSocketStream",
    "peer_uid",
    "reset_stream",
]


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
