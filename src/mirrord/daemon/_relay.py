"""Relaying one connection between an agent channel and a user-app socket, under credit.

Owns: the per-connection buffer (agent -> user app), the credit the daemon grants back as it
writes, respecting the agent's send window (user app -> agent), half-close and reset. Does not
own: the agent stream (the link queues frames for it) or which connection goes where.

Flow control: the agent may have at most the credit window of Data not yet credited back for
a connection, so the buffer here is bounded by that window; Credit is sent only after bytes
were written to the user app's socket, so a slow user app slows only its own connection and
never the agent-stream reader (which only appends to the buffer).

Ownership: an outgoing relay belongs to its session alone. Its two ends are a private
loopback connection (`open_relay_pair`) made inside the daemon, one end of which is passed to
the layer over its unix connection; no listener of ours is left for another local user to
connect to (the system-call supervisor's relays accept the one connection from the user
app's own bound socket, and reset any other), and a UDP relay takes datagrams from its own peer only (the kernel filters by
the connected address, and each datagram's source is checked again here).
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.abc

from mirrord.daemon._io import RawSocketStream, peer_uid, reset_stream
from mirrord.protocol import Message
from mirrord.protocol import messages as m

__all__ = ["Counters", "Relay", "RelayLink", "open_relay_listener", "open_relay_pair"]

log = logging.getLogger("mirrord.daemon.relay")

_CHUNK = 64 * 1024  # largest Data we send at once: keeps frames small and fair between conns
# After the app closed a relayed UDP socket, the datagrams it sent just before are in the
# daemon socket's queue (loopback delivers them during the app's sendto()), or rarely still in
# the loopback backlog when softirq work was deferred under load: read until the socket was
# empty this long before ending the relay. Short, so a program that opens a socket per
# message does not pile up relays (and sockets in the target) while they drain.
UDP_CLOSE_GRACE = 0.05
UDP_CLOSE_MAX = 2.0  # ... but never longer than this in all
PAIR_TIMEOUT = 5.0  # a loopback handshake inside the daemon; only a stalled machine is slower


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
        # UDP: the app closed its socket (LayerDisconnect); the receive to interrupt then
        self._app_closed = False
        self._receive_scope: anyio.CancelScope | None = None
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

    async def serve_tcp_outgoing(
        self, sock: socket.socket, accept_from: tuple[str, int] | None = None
    ) -> None:
        """Relay between the agent and the daemon's end of a private pair (`open_relay_pair`)
        whose other end the layer put in the place of the user app's socket; with
        `accept_from`, `sock` is an `open_relay_listener` and the relay is the connection
        from that address (the user app's own socket), accepted first (closed, and the
        agent's connection reset, if it does not come within PAIR_TIMEOUT)."""
        stream: anyio.abc.SocketStream | None = None
        try:
            with anyio.CancelScope() as self._scope:
                if self._aborted:
                    self._scope.cancel()
                if accept_from is not None:
                    accepted = await self._accept_app(sock, accept_from)
                    if accepted is None:
                        return
                    sock = accepted
                stream = RawSocketStream(sock)  # read only under credit (see RawSocketStream)
                await self._run_tcp(stream)  # closes the stream (and the socket) at the end
        finally:
            if stream is None:
                sock.close()
            self._finish()

    async def _accept_app(
        self, listener: socket.socket, app: tuple[str, int]
    ) -> socket.socket | None:
        try:
            with anyio.fail_after(PAIR_TIMEOUT):
                accepted = await _accept_from(listener, _endpoint(app))
        except (OSError, TimeoutError):
            self._send_close(errno_mod.ECONNRESET)
            return None
        finally:
            listener.close()
        accepted.setblocking(False)
        return accepted

    async def serve_tcp_incoming(
        self,
        address: str,
        port: int,
        on_connected: Callable[[Relay, int], None],
        *,
        owner: int,
    ) -> None:
        """Connect to the user app's listening socket, then relay. `on_connected` learns our
        source port before the connection exists, so a `PeerLookup` from the app's `accept()`
        can never arrive before the daemon knows the peer. `owner`: the uid the listener must
        belong to (the app's); a listener of anyone else at that port (the app's was closed
        where the layer could not see it) gets nothing, and the agent hears ECONNREFUSED."""
        self._accept_known = True
        try:
            with anyio.CancelScope() as self._scope:
                if self._aborted:
                    self._scope.cancel()
                try:
                    stream = await _connect_announcing(address, port, self, on_connected, owner)
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

    # -- UDP (one Data per datagram)

    def app_closed(self) -> None:
        """The app closed its UDP socket: forward what it sent before, then end the relay."""
        self._app_closed = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def serve_udp_outgoing(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Relay datagrams between the agent and the daemon's UDP socket `sock`, which is
        connected to `peer` (the user app's socket): only datagrams from `peer` go on."""
        udp: anyio.abc.UDPSocket | None = None
        try:
            with anyio.CancelScope() as self._scope:
                if self._aborted:
                    self._scope.cancel()
                udp = await anyio.abc.UDPSocket.from_socket(sock)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._udp_to_agent, udp, _endpoint(peer), tg.cancel_scope)
                    await self._udp_to_user(udp, peer)
                    tg.cancel_scope.cancel()
        finally:
            # through the transport: a socket closed under the event loop's selector would
            # leave its fd number registered there for the next socket that gets it
            with anyio.CancelScope(shield=True):
                if udp is not None:
                    await udp.aclose()
            sock.close()
            self._send_close(0)
            self._finish()

    async def _udp_to_user(self, sock: anyio.abc.UDPSocket, peer: tuple[str, int]) -> None:
        while self.agent_closed is None:
            if self._inbox:
                chunk = self._inbox.popleft()
                self.buffered -= len(chunk)
                try:
                    await sock.sendto(chunk, *peer)
                except OSError:
                    pass  # a datagram to a closed socket is lost, like on a network
                for c in self.counters:
                    c.to_user += len(chunk)
                self.link.send(m.Credit(conn_id=self.conn_id, amount=len(chunk)), self.channel)
                continue
            await self._wait("user")

    async def _udp_to_agent(
        self,
        sock: anyio.abc.UDPSocket,
        peer: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int],
        scope: anyio.CancelScope,
    ) -> None:
        closing_until = 0.0
        while self.agent_closed is None:
            packet: tuple[bytes, tuple[str, int]] | None = None
            if self._app_closed:
                now = anyio.current_time()
                closing_until = closing_until or now + UDP_CLOSE_MAX
                with anyio.move_on_after(min(UDP_CLOSE_GRACE, closing_until - now)):
                    packet = await sock.receive()
                if packet is None:
                    break  # nothing more was on its way: the relay ends
            else:
                with anyio.CancelScope() as self._receive_scope:
                    packet = await sock.receive()
                self._receive_scope = None
                if packet is None:
                    continue  # the app closed its socket: drain with a deadline
            data, addr = packet
            if _endpoint(addr) != peer:
                continue  # not from the app's socket (the kernel filters; this is a 2nd check)
            while self.agent_closed is None and self.link.send_window(
                self.channel, self.conn_id
            ) < len(data):
                await self._wait("agent")
            if self.agent_closed is not None:
                break
            self.link.send(m.Data(conn_id=self.conn_id, data=data), self.channel)
            for c in self.counters:
                c.to_agent += len(data)
        scope.cancel()


def _endpoint(addr: tuple[str, int]) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """An address as compared: v4-mapped IPv6 is IPv4, a scope id is dropped."""
    ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, addr[1]


def _loopback(family: int) -> str:
    return "::1" if family == socket.AF_INET6 else "127.0.0.1"


async def open_relay_pair(family: int, kind: int) -> tuple[socket.socket, socket.socket]:
    """Two loopback sockets of `family` and `kind` (SOCK_STREAM or SOCK_DGRAM) connected to
    each other and to nothing else: (the daemon's end, the end for the layer).

    A real TCP or UDP socket, so that everything the app does with it (TCP_NODELAY, SO_LINGER
    resets, SO_ERROR, poll) behaves as on a TCP/UDP socket. TCP: a listener exists only until
    our own connection is accepted (any other connection that raced in is reset unread, and
    the listener closes); UDP: both sockets are connected to each other, so the kernel drops
    anyone else's datagrams, and whatever arrived before that is discarded. `OSError` if the
    loopback refuses (no IPv6 on `lo`: the caller may fall back to AF_INET)."""
    host = _loopback(family)
    if kind == socket.SOCK_DGRAM:
        ours = socket.socket(family, socket.SOCK_DGRAM)
        theirs = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for s in (ours, theirs):
                s.setblocking(False)
                s.bind((host, 0))
            ours.connect(theirs.getsockname()[:2])
            theirs.connect(ours.getsockname()[:2])
            for s in (ours, theirs):
                _discard_queued(s)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        theirs.setblocking(True)
        return ours, theirs
    listener = socket.socket(family, socket.SOCK_STREAM)
    layer_end = socket.socket(family, socket.SOCK_STREAM)
    daemon_end: socket.socket | None = None
    try:
        listener.setblocking(False)
        layer_end.setblocking(False)
        listener.bind((host, 0))
        listener.listen(8)
        layer_end.bind((host, 0))
        mine = _endpoint(layer_end.getsockname()[:2])
        try:
            layer_end.connect(listener.getsockname()[:2])
        except BlockingIOError:
            pass
        with anyio.fail_after(PAIR_TIMEOUT):
            daemon_end = await _accept_from(listener, mine)
            await anyio.wait_writable(layer_end)
        error = layer_end.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        layer_end.close()
        if daemon_end is not None:
            daemon_end.close()
        raise
    finally:
        listener.close()
    layer_end.setblocking(True)
    daemon_end.setblocking(False)
    return daemon_end, layer_end


async def _accept_from(
    listener: socket.socket, peer: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]
) -> socket.socket:
    """The connection from `peer` on a non-blocking `listener`; any other local process that
    connected in the instant the listener existed is reset unread. The caller bounds the
    wait."""
    for _ in range(64):
        await anyio.wait_readable(listener)
        try:
            accepted, addr = listener.accept()
        except BlockingIOError:
            continue
        if _endpoint(addr[:2]) == peer:
            return accepted
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted.close()
    raise OSError(errno_mod.EAGAIN, "relay: the expected connection never came")


def open_relay_listener(family: int) -> socket.socket:
    """A non-blocking loopback TCP listener of `family` for one relay connection from a
    socket the caller names (`Relay.serve_tcp_outgoing`'s `accept_from`): the system-call
    supervisor connects the user app's own socket to it (docs/layer.md)."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setblocking(False)
        listener.bind((_loopback(family), 0))
        listener.listen(8)
    except BaseException:
        listener.close()
        raise
    return listener


def _discard_queued(sock: socket.socket) -> None:
    for _ in range(1024):  # bounded: a flood before connect() cannot keep us here
        try:
            sock.recv(1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            continue  # an ICMP error queued for the socket: read, go on


async def _connect_announcing(
    address: str,
    port: int,
    relay: Relay,
    on_connected: Callable[[Relay, int], None],
    owner: int,
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
        # a kernel lookup answered at once (no waiting on another process)
        answered_by = peer_uid(sock)
        if answered_by is not None and answered_by != owner:
            log.warning(
                "port %d on this machine is held by uid %d, not by the app (uid %d): its "
                "listener was closed where the layer could not see it; an incoming "
                "connection is refused instead of handed to it",
                port,
                answered_by,
                owner,
            )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise OSError(errno_mod.ECONNREFUSED, "the listener is not the app's")
        return RawSocketStream(sock)  # read only under credit (see RawSocketStream)
    except BaseException:
        sock.close()
        raise
