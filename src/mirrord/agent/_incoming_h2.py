"""The I/O shell of an HTTP/2 filtered steal: runs `H2Router` (`_http2_filter.py`) over a
stolen client connection, its connections to the pod's app and its session connections.

Owns: `serve_h2`, the hook a filtered connection (`_incoming_filtered.FilteredConnection`) calls when
its first bytes could be the HTTP/2 preface (prior knowledge). It reads the rest of the
preface; if it is one, the connection is served as HTTP/2 here until it ends, else the bytes
go back to the caller, which passes them to the pod's app untouched as before. And
`serve_h2c_upgrade`, the hook for a first request with `Upgrade: h2c`: the agent switches
the connection itself (101) and serves it as HTTP/2, that request being stream 1.
Does not own: routing decisions per stream (the router, with the port's filters), HTTP/1.

Per stream matched by a session's filter, a new `IncomingConnection` is opened to that session
(`FilteredConnection.session_stream`, the same as for an HTTP/1 request): the daemon connects
it to the user app, which gets an HTTP/2 connection with prior knowledge carrying that one
stream. HTTP/2 rather than a translation to HTTP/1.1: the user app runs the same code as the
pod's app, which was just spoken to in HTTP/2 by this client, and gRPC (trailers, streaming
both ways) exists only over HTTP/2. Unmatched streams share one connection to the pod's app
(the one the filtered connection opened when the client connected, then new ones after a
GOAWAY or a close).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from typing import Any, Protocol

import anyio
import anyio.abc

from mirrord.agent._http2_detect import (
    H2_PREFACE,
    H2C_SWITCH,
    H2cUpgrade,
    could_be_h2_preface,
    could_be_h2_server_preface,
    is_h2_preface,
)
from mirrord.agent._http2_filter import CLIENT, CloseConnection, H2Router, OpenUpstream, SendBytes
from mirrord.agent._http_filter import Passthrough, RequestEnded, RequestHead, RequestSplitter
from mirrord.agent._incoming_pipe import PipeEnd

__all__ = ["H2Host", "pod_app_sent_h2_settings", "serve_h2", "serve_h2c_upgrade"]

log = logging.getLogger("mirrord.agent.incoming")

_READ = 256 * 1024
# Bytes queued for a peer above which its input is not read (`_Peer.wait_backlog_below`).
_BACKLOG = 1024 * 1024
# How long an `Upgrade: h2c` request waits for the pod's app's HTTP/2 greeting, once per
# client connection (an HTTP/2 app sends it on accept: microseconds, unless very loaded).
H2C_GREETING_WAIT = 1.0
_STREAM_ERRORS = (
    OSError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)


class _PodConnection(Protocol):
    @property
    def stream(self) -> anyio.abc.ByteStream: ...


class H2Host(Protocol):
    """What the shell needs of the filtered connection it takes over (`FilteredConnection`,
    `_incoming_filtered.py`, which imports this module; this one never imports it back)."""

    @property
    def client(self) -> anyio.abc.ByteStream: ...

    @property
    def port(self) -> int: ...

    @property
    def upstream_failed(self) -> str | None:
        """Why the pod's app cannot be reached (after `get_upstream` returned None)."""
        ...

    def session_for(self, head: RequestHead) -> Any | None:
        """The channel whose filter matches `head` (None: the pod's app answers)."""
        ...

    def count(self, figure: str) -> None:
        """One more of the incoming service's `figure` (`filtered_requests`...)."""
        ...

    @property
    def tls(self) -> object | None:
        """The client's TLS when the agent terminated it (`_incoming_tls.py`), else None."""
        ...

    async def get_upstream(self) -> _PodConnection | None: ...

    async def open_extra_upstream(self) -> anyio.abc.ByteStream: ...

    async def session_stream(self, channel: Any) -> anyio.abc.ByteStream | None: ...


async def serve_h2(conn: H2Host, first: bytes) -> bytes | None:
    """Serve `conn` as HTTP/2 if its client sent the preface (`first` are its first bytes, a
    possible start of it). None when served; else every byte read so far (not HTTP/2), for
    the caller to pass through."""
    buf = bytearray(first)
    while len(buf) < len(H2_PREFACE) and could_be_h2_preface(buf):
        try:
            data = await conn.client.receive(_READ)
        except anyio.EndOfStream:
            return bytes(buf)
        buf += data
    if not is_h2_preface(buf):
        return bytes(buf)
    await _H2Shell(conn).run(bytes(buf))
    return None


def pod_app_sent_h2_settings(raw: socket.socket) -> bool:
    """Are the bytes waiting on this connection to the pod's app an HTTP/2 server's SETTINGS
    (its connection preface)? An HTTP/2 app sends them as soon as it accepts, before the
    client says anything: that is not a server-first protocol, the client's preface decides."""
    try:
        data = raw.recv(9, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return False
    return could_be_h2_server_preface(data)


async def serve_h2c_upgrade(conn: H2Host, upgrade: H2cUpgrade, splitter: RequestSplitter) -> bool:
    """The client's first request asks to switch to HTTP/2 (`Upgrade: h2c`, body-less): answer
    101 and serve the connection as HTTP/2, the request being stream 1 (routed like any
    stream). False (nothing consumed) when its `HTTP2-Settings` is malformed: the request goes
    on as HTTP/1.1."""
    # Switch only when the pod's app speaks HTTP/2 (with prior knowledge, as the agent will
    # speak it): an HTTP/2 app greets with its SETTINGS as soon as it accepts. An HTTP/1.1
    # app says nothing and answers the request as HTTP/1.1, as it would without mirrord.
    if conn.tls is not None:
        return False  # h2c is HTTP/2 in clear only (over TLS, ALPN chooses h2)
    up = await conn.get_upstream()
    if up is None:
        return False
    raw = up.stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if raw is None:
        return False
    with anyio.move_on_after(H2C_GREETING_WAIT):
        await anyio.wait_readable(raw)
    if not pod_app_sent_h2_settings(raw):
        return False
    try:
        shell = _H2Shell(conn, upgrade=upgrade)
    except ValueError:
        return False
    ended = splitter.next_event()  # a body-less request ends with its head
    if not isinstance(ended, RequestEnded):
        raise RuntimeError(f"h2c upgrade: expected the end of the request, got {ended!r}")
    splitter.switched(True)
    rest = splitter.next_event()
    first = rest.raw if isinstance(rest, Passthrough) else b""
    await shell.run(first, greeting=H2C_SWITCH)
    return True


class _Peer:
    """One connection of the shell: bytes queued for it, and whether to close it after."""

    __slots__ = ("buf", "closing", "sent", "wake")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.closing = False
        self.wake = anyio.Event()
        self.sent = anyio.Event()  # set (and replaced) each time the writer takes `buf`

    def poke(self) -> None:
        self.wake.set()

    async def wait_backlog_below(self, limit: int) -> None:
        """Wait while more than `limit` bytes wait for this peer. What a peer's input makes
        the router answer it (SETTINGS and PING acks, WINDOW_UPDATEs, resets) is unbounded by
        flow control: a peer that sends without reading would grow it without end (the PING
        flood), so its input is read only while its backlog is small."""
        while len(self.buf) > limit and not self.closing:
            await self.sent.wait()


class _H2Shell:
    def __init__(self, conn: H2Host, upgrade: H2cUpgrade | None = None) -> None:
        self.conn = conn
        self.router = H2Router(self._route, upgrade=upgrade)
        self.peers: dict[int, _Peer] = {CLIENT: _Peer()}
        self._tg: anyio.abc.TaskGroup | None = None
        self._first_pod = True

    def __repr__(self) -> str:
        return f"<_H2Shell port={self.conn.port} {self.router!r}>"

    def _route(self, head: RequestHead) -> Any:
        channel = self.conn.session_for(head)
        self.conn.count("filtered_requests" if channel is not None else "passed_to_pod")
        return channel

    async def run(self, first: bytes, *, greeting: bytes = b"") -> None:
        """`first`: the client's bytes read already; `greeting`: bytes to write to the client
        before HTTP/2 starts (the 101 of an upgrade)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self.peers[CLIENT].buf += greeting
            tg.start_soon(self._write, CLIENT, self.conn.client, tg.cancel_scope)
            if first:
                self.router.receive_client(first)
            self._act()
            await self._read_client()

    def _act(self) -> None:
        """Do what the router asked for (never waits: writes are queued to each peer's
        writer task, in order)."""
        assert self._tg is not None
        for action in self.router.take_actions():
            if isinstance(action, SendBytes):
                peer = self.peers.get(action.key)
                if peer is not None and not peer.closing:
                    peer.buf += action.data
                    peer.poke()
            elif isinstance(action, OpenUpstream):
                self.peers[action.key] = _Peer()
                self._tg.start_soon(self._run_upstream, action.key, action.session)
            elif isinstance(action, CloseConnection):
                peer = self.peers.get(action.key)
                if peer is not None:
                    peer.closing = True
                    peer.poke()

    async def _read_client(self) -> None:
        client = self.peers[CLIENT]
        while not self.router.finished:
            await client.wait_backlog_below(_BACKLOG)
            try:
                data = await self.conn.client.receive(_READ)
            except _STREAM_ERRORS:
                data = b""
            self.router.receive_client(data)
            self._act()
        # `_write(CLIENT)` ends the shell once what is queued for the client is written.
        await anyio.sleep_forever()

    async def _write(
        self, key: int, stream: anyio.abc.ByteStream, scope: anyio.CancelScope
    ) -> None:
        """Write what is queued for `key`, in order; close when the router says so (the
        client: end the shell)."""
        peer = self.peers[key]
        try:
            while True:
                while peer.buf:
                    data = bytes(peer.buf)
                    peer.buf.clear()
                    peer.sent.set()
                    peer.sent = anyio.Event()
                    await stream.send(data)
                if peer.closing:
                    break
                await peer.wake.wait()
                peer.wake = anyio.Event()
        except _STREAM_ERRORS:
            if key == CLIENT:
                self.router.receive_client(b"")
            else:
                self.router.upstream_closed(key, "the connection to the app broke")
            self._act()
        finally:
            if key != CLIENT:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await stream.aclose()
            self.peers.pop(key, None)
            scope.cancel()

    async def _open(self, session: Any) -> anyio.abc.ByteStream | str:
        """The stream for a new upstream, or why there is none."""
        conn = self.conn
        if session is not None:
            end = await conn.session_stream(session)
            return end if end is not None else "the session ended"
        if self._first_pod:
            # The connection the filtered connection opened when the client connected: no
            # byte went over it yet.
            self._first_pod = False
            up = await conn.get_upstream()
            if up is None:
                return f"the pod's app on port {conn.port} is unreachable: {conn.upstream_failed}"
            return up.stream
        try:
            return await conn.open_extra_upstream()  # closed with the client connection
        except OSError as exc:
            return f"the pod's app on port {conn.port} is unreachable: {exc.strerror or exc}"

    async def _run_upstream(self, key: int, session: Any) -> None:
        opened = await self._open(session)
        if isinstance(opened, str):
            self.router.upstream_closed(key, opened, refused=session is not None)
            self._act()
            self.peers.pop(key, None)
            return
        stream = opened
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._write, key, stream, tg.cancel_scope)
            peer = self.peers[key]
            while True:
                await peer.wait_backlog_below(_BACKLOG)
                try:
                    data = await stream.receive(_READ)
                except _STREAM_ERRORS:
                    # The user app never read the stream: it stopped listening (the session
                    # is ending); the router may give the stream to the pod's app instead.
                    refused = (
                        isinstance(stream, PipeEnd) and stream.peer_errno == errno.ECONNREFUSED
                    )
                    if refused:
                        log.info(
                            "port %d: an HTTP/2 stream's session connection was refused: the "
                            "user app no longer listens; the stream goes to the pod's app",
                            self.conn.port,
                        )
                    self.router.upstream_closed(
                        key, "the app closed the connection without a response", refused=refused
                    )
                    self._act()
                    tg.cancel_scope.cancel()
                    return
                self.router.receive_upstream(key, data)
                self._act()
