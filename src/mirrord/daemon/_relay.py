"""Relaying one connection between an agent channel and a user-app socket, under credit.

Owns: the per-connection buffer (agent -> user app), the credit the daemon grants back as it
writes, respecting the agent's send window (user app -> agent), half-close and reset. Does not
own: the agent stream (the link queues frames for it) or which connection goes where.

Flow control: the agent may have at most the credit window of Data not yet credited back for
a connection, so the buffer here is bounded by that window; Credit is sent only after bytes
were written to the user app's socket, so a slow user app slows only its own connection and
never the agent-stream reader (which only appends to the buffer).
"""

from __future__ import annotations

import errno as errno_mod
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.abc

from mirrord.daemon._io import RawSocketStream, accept_raw, reset_stream
from mirrord.protocol import Message
from mirrord.protocol import messages as m

__all__ = ["Counters", "Relay", "RelayLink"]

_CHUNK = 64 * 1024  # largest Data we send at once: keeps frames small and fair between conns


@dataclass(slots=True)
class Counters:
    """Bytes relayed, shown by `mirrord daemon status`."""

    to_agent: int = 0
    to_user: int = 0
    connections: int = 0


class RelayLink(Protocol):
    """What a relay needs from the agent link."""

    def send(self, msg: Message, channel: int) -> None: ...

    def send_window(self, channel: int, conn_id: int) -> int: ...

    def relay_done(self, relay: Relay) -> None: ...


class Relay:
    """One connection: `channel`/`conn_id` on the agent stream <-> one user-app socket."""

    def __init__(
        self,
        link: RelayLink,
        channel: int,
        conn_id: int,
        *,
        description: str,
        mirror: bool = False,
        counters: tuple[Counters, ...] = (),
    ) -> None:
        self.link = link
        self.channel = channel
        self.conn_id = conn_id
        self.description = description
        self.mirror = mirror  # mirrored traffic: the user app's replies are discarded
        self.counters = counters
        # agent --Data--> _inbox --> user app
        self._inbox: deque[bytes] = deque()
        self.buffered = 0
        self._wake_user = anyio.Event()
        self._wake_agent = anyio.Event()
        self.agent_eof = False
        self.agent_closed: int | None = None  # errno of the agent's ConnClose
        self.sent_close = False
        self._user_eof_forwarded = False
        self._agent_eof_delivered = False
        self._failed: int | None = None  # errno of a user-side failure
        self._scope: anyio.CancelScope | None = None
        self._aborted = False
        # Incoming connections: the layer's accept() asks the daemon for the real peer
        # (PeerLookup), which sets `app_accepted`. A connection the app never accepted and
        # never wrote to was still in its listen queue when it stopped listening: the app saw
        # none of it, and the agent is told ECONNREFUSED so the pod's app can answer instead.
        self.app_accepted = False
        self.on_agent_close: Callable[[int], None] | None = None  # the agent's ConnClose errno
        self._accept_known = False
        self._app_sent = False
        for c in counters:
            c.connections += 1

    def __repr__(self) -> str:
        return (
            f"<Relay ch={self.channel} conn={self.conn_id} {self.description} "
            f"buffered={self.buffered} eof={self.agent_eof} closed={self.agent_closed}>"
        )

    # -- called synchronously by the agent-stream reader: never wait here

    def on_data(self, data: bytes) -> None:
        if self.agent_closed is not None or self._aborted:
            return
        self._inbox.append(data)
        self.buffered += len(data)
        self._wake_user.set()

    def on_credit(self) -> None:
        self._wake_agent.set()

    def on_shutdown(self) -> None:
        self.agent_eof = True
        self._wake_user.set()

    def on_close(self, errno: int) -> None:
        self.agent_closed = errno
        if self.on_agent_close is not None and errno != m.CONN_CLOSE_NORMAL:
            self.on_agent_close(errno)
        self._wake_user.set()
        self._wake_agent.set()
        if errno != m.CONN_CLOSE_NORMAL:
            self.abort()

    def abort(self) -> None:
        """End now, resetting the user app's socket (agent lost, channel or session closed)."""
        self._aborted = True
        self._inbox.clear()
        self.buffered = 0
        if self._scope is not None:
            self._scope.cancel()

    # -- helpers

    async def _wait(self, which: str) -> None:
        event = self._wake_user if which == "user" else self._wake_agent
        await event.wait()
        if which == "user" and self._wake_user is event:
            self._wake_user = anyio.Event()
        elif which == "agent" and self._wake_agent is event:
            self._wake_agent = anyio.Event()

    def _send_close(self, errno: int) -> None:
        if not self.sent_close and self.agent_closed is None:
            self.sent_close = True
            self.link.send(m.ConnClose(conn_id=self.conn_id, errno=errno), self.channel)

    def _finish(self) -> None:
        self._inbox.clear()
        self.buffered = 0
        self.link.relay_done(self)

    # -- TCP

    async def serve_tcp_outgoing(self, listener: anyio.abc.SocketListener, timeout: float) -> None:
        """Wait for the user app's socket on the daemon-side relay listener, then relay."""
        try:
            with anyio.CancelScope() as self._scope:
                if self._aborted:
                    self._scope.cancel()
                stream: anyio.abc.SocketStream | None = None
                with anyio.move_on_after(timeout):
                    stream = await accept_raw(listener)  # read only under credit
                await listener.aclose()
                if stream is None:
                    # the app never connected (its connect() failed or it closed the socket)
                    self._send_close(errno_mod.ECONNABORTED)
                    return
                await self._run_tcp(stream)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            self._finish()

    async def serve_tcp_incoming(
        self, address: str, port: int, on_connected: Callable[[Relay, int], None]
    ) -> None:
        """Connect to the user app's listening socket, then relay. `on_connected` learns our
        source port before the connection exists, so a `PeerLookup` from the app's `accept()`
        can never arrive before the daemon knows the peer."""
        self._accept_known = True
        try:
            with anyio.CancelScope() as self._scope:
                if self._aborted:
                    self._scope.cancel()
                try:
                    stream = await _connect_announcing(address, port, self, on_connected)
                except (OSError, TimeoutError):
                    self._send_close(errno_mod.ECONNREFUSED)
                    return
                await self._run_tcp(stream)
        finally:
            self._finish()

    async def _run_tcp(self, stream: anyio.abc.SocketStream) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._tcp_to_agent, stream, tg.cancel_scope)
                await self._tcp_to_user(stream, tg.cancel_scope)
        finally:
            clean = self._failed is None and not self._aborted and self.agent_closed in (None, 0)
            if not clean:
                reset_stream(stream)
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            close_errno = self._failed or (0 if clean else errno_mod.ECONNRESET)
            if close_errno and self._accept_known and not self.app_accepted and not self._app_sent:
                close_errno = errno_mod.ECONNREFUSED  # see `app_accepted`
            self._send_close(close_errno)

    def _done(self) -> bool:
        if self._failed is not None:
            return True
        if self.agent_closed is not None and not self._inbox:
            return True
        return self._user_eof_forwarded and self._agent_eof_delivered

    async def _tcp_to_user(self, stream: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
        while True:
            if self._inbox:
                chunk = self._inbox.popleft()
                try:
                    await stream.send(chunk)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    self._failed = errno_mod.ECONNRESET
                    scope.cancel()
                    return
                self.buffered -= len(chunk)
                for c in self.counters:
                    c.to_user += len(chunk)
                if self.agent_closed is None:
                    self.link.send(m.Credit(conn_id=self.conn_id, amount=len(chunk)), self.channel)
                continue
            if self.agent_eof and not self._agent_eof_delivered:
                self._agent_eof_delivered = True
                try:
                    await stream.send_eof()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
            if self._done():
                scope.cancel()
                return
            await self._wait("user")

    async def _tcp_to_agent(self, stream: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
        while self.agent_closed is None:
            window = _CHUNK if self.mirror else self.link.send_window(self.channel, self.conn_id)
            if window <= 0:
                await self._wait("agent")
                continue
            try:
                data = await stream.receive(min(window, _CHUNK))
            except anyio.EndOfStream:
                self._user_eof_forwarded = True
                if self.agent_closed is None and not self.mirror:
                    self.link.send(m.Shutdown(conn_id=self.conn_id), self.channel)
                if self._done():
                    scope.cancel()
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self._failed = errno_mod.ECONNRESET
                scope.cancel()
                return
            self._app_sent = True
            if self.mirror or self.agent_closed is not None:
                continue  # mirrored: the app's answer goes nowhere
            self.link.send(m.Data(conn_id=self.conn_id, data=data), self.channel)
            for c in self.counters:
                c.to_agent += len(data)

    # -- UDP (connected datagram sockets: one Data per datagram)

    async def serve_udp_outgoing(self, sock: anyio.abc.UDPSocket) -> None:
        try:
            with anyio.CancelScope() as self._scope:
                if self._aborted:
                    self._scope.cancel()
                peer: list[tuple[str, int]] = []
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._udp_to_agent, sock, peer, tg.cancel_scope)
                    await self._udp_to_user(sock, peer)
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await sock.aclose()
            self._send_close(0)
            self._finish()

    async def _udp_to_user(self, sock: anyio.abc.UDPSocket, peer: list[tuple[str, int]]) -> None:
        while self.agent_closed is None:
            if self._inbox and peer:
                chunk = self._inbox.popleft()
                self.buffered -= len(chunk)
                try:
                    await sock.sendto(chunk, *peer[0])
                except OSError:
                    pass  # a datagram to a closed socket is lost, like on a network
                for c in self.counters:
                    c.to_user += len(chunk)
                self.link.send(m.Credit(conn_id=self.conn_id, amount=len(chunk)), self.channel)
                continue
            await self._wait("user")

    async def _udp_to_agent(
        self, sock: anyio.abc.UDPSocket, peer: list[tuple[str, int]], scope: anyio.CancelScope
    ) -> None:
        async for data, addr in sock:
            if not peer:
                peer.append((addr[0], addr[1]))
                self._wake_user.set()
            while self.agent_closed is None and self.link.send_window(
                self.channel, self.conn_id
            ) < len(data):
                await self._wait("agent")
            if self.agent_closed is not None:
                scope.cancel()
                return
            self.link.send(m.Data(conn_id=self.conn_id, data=data), self.channel)
            for c in self.counters:
                c.to_agent += len(data)


async def _connect_announcing(
    address: str, port: int, relay: Relay, on_connected: Callable[[Relay, int], None]
) -> anyio.abc.SocketStream:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        on_connected(relay, sock.getsockname()[1])
        try:
            sock.connect((address, port))
        except BlockingIOError:
            with anyio.fail_after(5):
                await anyio.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error)) from None
        return RawSocketStream(sock)  # read only under credit (see RawSocketStream)
    except BaseException:
        sock.close()
        raise
