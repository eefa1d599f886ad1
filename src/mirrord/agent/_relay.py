"""One relayed connection of a channel: a byte stream or UDP socket <-> connection messages.

Owns: moving bytes between a socket (an outgoing connection, or an incoming one handed over by
the incoming code through `Channel.start_incoming`) and the daemon as `Data` / `Credit` /
`Shutdown` / `ConnClose`, under the per-connection credit window of `AgentConnection`:
- socket -> daemon: at most the send window is read from the socket and sent as `Data`;
  at zero window the relay waits for `Credit` (the socket's buffer then fills and TCP pushes
  back on the peer);
- daemon -> socket: `Data` is queued (bounded by the window we granted), written, and credited
  back once written; on a plain TCP socket with nothing queued, `on_data` writes it at once
  (non-blocking) and credits what the socket took, so a small exchange needs no task switch;
- `Shutdown` is a half-close each way; when both directions are done the relay sends
  `ConnClose(0)`; a socket error ends the relay with `ConnClose(errno)`; the daemon's
  `ConnClose` ends it at once (with an errno, the user app's side was reset or failed: the
  socket is closed with a reset, so the peer in the target sees what it would see), except
  that a clean one first lets the `Data` and `Shutdown` sent before it be written.
Does not own: creating sockets (`_outgoing.py`, the incoming code) or the channel's tables.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import socket
import struct
from typing import Protocol

import anyio
import anyio.abc

from mirrord.agent._incoming_pipe import PipeEnd
from mirrord.protocol import Message
from mirrord.protocol import messages as m

__all__ = ["Link", "Relay"]

log = logging.getLogger("mirrord.agent")

_READ_CHUNK = 256 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_DATAGRAM_MAX = 65536
# After the daemon's clean ConnClose, the bytes it sent before are still written to the socket
# (then the EOF), for at most this long: a peer that reads nothing cannot keep the relay.
DRAIN_TIMEOUT = 30.0


class Link(Protocol):
    """The channel's side of the daemon connection, as a relay sees it."""

    number: int

    async def send(self, msg: Message) -> None: ...

    def send_nowait(self, msg: Message) -> None: ...

    def send_window(self, conn_id: int) -> int: ...


def _errno_of(exc: BaseException) -> int:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return cause.errno
        cause = cause.__cause__ or cause.__context__
    return errno.ECONNRESET


def _plain_tcp_socket(stream: object) -> socket.socket | None:
    """The stream's socket if it is a plain TCP socket stream (incoming streams may be pipes
    or filters that must see every byte)."""
    if not isinstance(stream, anyio.abc.SocketStream):
        return None
    try:
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return None
    if isinstance(raw, socket.socket) and raw.type == socket.SOCK_STREAM:
        return raw
    return None


class Relay:
    """A connection `conn_id` of a channel; `run()` is its task, the `on_*` methods are called
    (synchronously) by the channel when the daemon's messages for it arrive."""

    def __init__(
        self,
        link: Link,
        conn_id: int,
        stream: anyio.abc.ByteStream | anyio.abc.ConnectedUDPSocket,
        *,
        description: str = "",
    ) -> None:
        self.link = link
        self.conn_id = conn_id
        self.stream = stream
        self.description = description
        self.datagram = isinstance(stream, anyio.abc.ConnectedUDPSocket)
        self._raw = None if self.datagram else _plain_tcp_socket(stream)
        self._writing = False  # _daemon_to_socket is in the middle of a send
        self._inbox: collections.deque[bytes] = collections.deque()
        self._inbox_changed = anyio.Event()
        self._credit = anyio.Event()
        self._peer_shutdown = False  # the daemon sent Shutdown
        self._sent_shutdown = False  # our Shutdown went to the daemon (socket -> daemon done)
        self._draining = False  # clean ConnClose: writing what the daemon sent, then ending
        self._writer_running = False  # _daemon_to_socket has not returned yet
        self._closed_by_daemon = False
        self._daemon_errno = m.CONN_CLOSE_NORMAL  # the errno of the daemon's ConnClose
        self._credited = False  # the daemon wrote some of our bytes to the user app
        self._fail_errno = 0  # set by `fail()`
        self._reset_by_daemon = False  # ConnClose with an errno: the user app's side broke
        self._scope = anyio.CancelScope()
        self.finished = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        return (
            f"<Relay channel={self.link.number} conn={self.conn_id} {self.description} "
            f"queued={len(self._inbox)} window={self.link.send_window(self.conn_id)}>"
        )

    # -- from the daemon (sync, on the channel's reader) --------------------------------------

    def on_data(self, data: bytes) -> None:
        if not data or self._peer_shutdown:
            return
        if self._raw is not None and not self._inbox and not self._writing:
            try:
                sent = self._raw.send(data)
            except OSError:
                sent = 0  # full (EAGAIN) or failing: the task writes it, or meets the error
            if sent:
                self.link.send_nowait(m.Credit(conn_id=self.conn_id, amount=sent))
                data = data[sent:]
                if not data:
                    return
        self._inbox.append(data)
        self._inbox_changed.set()

    def on_credit(self) -> None:
        self._credited = True
        self._credit.set()

    def on_shutdown(self) -> None:
        self._peer_shutdown = True
        self._inbox_changed.set()

    def on_close(self, errno_: int = m.CONN_CLOSE_NORMAL) -> None:
        self._closed_by_daemon = True
        self._daemon_errno = errno_
        self._reset_by_daemon = errno_ != m.CONN_CLOSE_NORMAL
        if (
            errno_ == m.CONN_CLOSE_NORMAL
            and not self.datagram
            and self._sent_shutdown
            and self._writer_running
        ):
            # A clean end: the daemon's Data (and Shutdown) came before this ConnClose, often
            # in the same read, and are not all written yet. Write them, then the EOF, then
            # end (`_daemon_to_socket`); dropping them closed the peer's connection without
            # its answer (an echo read b"").
            self._draining = True
            self._peer_shutdown = True
            self._inbox_changed.set()
            self._scope.deadline = min(self._scope.deadline, anyio.current_time() + DRAIN_TIMEOUT)
            return
        self._scope.cancel()

    def fail(self, errno_: int) -> None:
        """End the relay now and tell the daemon `ConnClose(errno_)`: the incoming code gave
        the connection up (a mirrored flow that fell too far behind: ENOBUFS). Works before
        `run()` starts too (it then ends at once, after the IncomingConnection)."""
        self._fail_errno = errno_
        self._scope.cancel()

    def abort(self) -> None:
        """End the relay without telling the daemon (its channel is gone)."""
        self._closed_by_daemon = True
        if not self._credited:
            # The daemon credits bytes once written to the user app: none were, so the app
            # never saw this connection's bytes (as when the daemon refuses it).
            self._daemon_errno = errno.ECONNREFUSED
        self._scope.cancel()

    # -- the task ------------------------------------------------------------------------------

    async def run(self) -> None:
        close_errno = m.CONN_CLOSE_NORMAL
        try:
            with self._scope:
                try:
                    async with anyio.create_task_group() as tg:
                        self._tg = tg
                        tg.start_soon(self._socket_to_daemon)
                        tg.start_soon(self._daemon_to_socket)
                except* (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as group:
                    close_errno = _errno_of(group.exceptions[0])
                except* Exception as group:
                    log.error("relay %r failed: %r", self, group.exceptions[0])
                    close_errno = errno.EIO
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                if self._daemon_errno and isinstance(self.stream, PipeEnd):
                    # The incoming code learns why: ECONNREFUSED means the user app never
                    # got the bytes (it stopped listening), so the target's app may answer.
                    self.stream.abort(self._daemon_errno)
                if self._reset_by_daemon and self._raw is not None:
                    # the user app's connection was reset (or failed): the peer in the target
                    # sees a reset too, as it would from an app in the pod, not a clean end
                    with contextlib.suppress(OSError):
                        self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                with contextlib.suppress(Exception):
                    await self.stream.aclose()
                if not self._closed_by_daemon:
                    close_errno = self._fail_errno or close_errno
                    await self.link.send(m.ConnClose(conn_id=self.conn_id, errno=close_errno))
            self.finished.set()

    async def _wait_window(self, need: int) -> int:
        while (window := self.link.send_window(self.conn_id)) < need:
            self._credit = anyio.Event()
            await self._credit.wait()
        return window

    async def _socket_to_daemon(self) -> None:
        if self.datagram:
            assert isinstance(self.stream, anyio.abc.ConnectedUDPSocket)
            while True:
                datagram = await self.stream.receive()
                await self._wait_window(len(datagram))
                await self.link.send(m.Data(conn_id=self.conn_id, data=datagram))
        assert isinstance(self.stream, anyio.abc.ByteStream)
        while True:
            window = await self._wait_window(1)
            try:
                chunk = await self.stream.receive(min(window, _READ_CHUNK))
            except anyio.EndOfStream:
                break
            await self.link.send(m.Data(conn_id=self.conn_id, data=chunk))
        self._sent_shutdown = True  # (before: the daemon may answer before send() returns)
        await self.link.send(m.Shutdown(conn_id=self.conn_id))

    async def _daemon_to_socket(self) -> None:
        self._writer_running = True
        try:
            await self._write_to_socket()
        finally:
            self._writer_running = False
        if self._draining:
            self._scope.cancel()  # all written: the daemon's ConnClose takes effect

    async def _write_to_socket(self) -> None:
        while True:
            while not self._inbox and not self._peer_shutdown:
                self._inbox_changed = anyio.Event()
                await self._inbox_changed.wait()
            if self._inbox:
                chunk = self._inbox.popleft()
                if self.datagram:
                    assert isinstance(self.stream, anyio.abc.ConnectedUDPSocket)
                    await self.stream.send(chunk[:_DATAGRAM_MAX])
                else:
                    assert isinstance(self.stream, anyio.abc.ByteStream)
                    self._writing = True
                    try:
                        await self.stream.send(chunk)
                    finally:
                        self._writing = False
                if not self._closed_by_daemon:  # after its ConnClose nobody takes credit
                    await self.link.send(m.Credit(conn_id=self.conn_id, amount=len(chunk)))
                continue
            if self.datagram:
                # UDP has no half-close: the daemon's Shutdown ends the association.
                assert self._tg is not None
                self._tg.cancel_scope.cancel()
            else:
                assert isinstance(self.stream, anyio.abc.ByteStream)
                with contextlib.suppress(OSError, anyio.ClosedResourceError):
                    await self.stream.send_eof()
            return
