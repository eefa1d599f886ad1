"""The daemon's relayed connections on the shared engine (docs/relay.md): one `FlowRelay` per
connection between the agent stream and a user app's socket.

Owns: the sockets of an outgoing connection (`relay_sockets`: a private pair, the
supervisor's listener, or a UDP endpoint for the app's own socket), serving each kind of
relay once its socket exists (`serve_stream`, `serve_datagrams`, `serve_incoming`), and the
close grace of a UDP relay whose app closed its socket. Does not own: the flow's rules
(`mirrord.protocol.Flow`), the relay's I/O (`mirrord._relay.FlowRelay`), the table and the
routing of the agent's messages (`AgentLink`), or which layer request starts which relay
(`_session`).
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import socket
from collections.abc import Callable

import anyio
import anyio.abc

from mirrord._relay import FlowRelay, RawSocketStream
from mirrord.daemon._relay import (
    UDP_CLOSE_GRACE,
    UDP_CLOSE_MAX,
    accept_relay_connection,
    connect_announcing,
    open_relay_listener,
    open_relay_pair,
)
from mirrord.protocol import messages as m

__all__ = ["relay_sockets", "serve_datagrams", "serve_incoming", "serve_stream"]


async def relay_sockets(
    msg: m.LayerConnect,
) -> tuple[socket.socket, socket.socket | None, tuple[str, int]]:
    """(the daemon's end, the layer's end to pass or None, the app's address as the daemon's
    end sees it) for an outgoing connection."""
    if msg.source_port and msg.protocol == "tcp":
        # the supervisor connects the app's own socket, bound there: a listener for it alone
        source = msg.source_address or "127.0.0.1"
        ip = ipaddress.ip_address(source)
        v6 = isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None
        family = socket.AF_INET6 if v6 else socket.AF_INET
        return open_relay_listener(family), None, (source, msg.source_port)
    if msg.source_port:
        # sendto() on the app's own UDP socket (or the supervisor's connect() of it): an
        # endpoint that only its address reaches
        family = socket.AF_INET6 if ":" in msg.address else socket.AF_INET
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        source = msg.source_address
        if source in ("", "0.0.0.0", "::") or (family == socket.AF_INET and ":" in source):
            source = host
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((host, 0))
            sock.connect((source, msg.source_port))
        except BaseException:
            sock.close()
            raise
        return sock, None, (source, msg.source_port)
    if msg.protocol == "unix":
        # a unix stream socket of the app: a socketpair, reachable by nobody else
        daemon_end, layer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        daemon_end.setblocking(False)
        return daemon_end, layer_end, ("", 0)
    kind = socket.SOCK_STREAM if msg.protocol == "tcp" else socket.SOCK_DGRAM
    by_address = socket.AF_INET6 if ":" in msg.address else socket.AF_INET
    family = {2: socket.AF_INET, 10: socket.AF_INET6}.get(msg.family, by_address)
    try:
        daemon_end, layer_end = await open_relay_pair(family, kind)
    except OSError:
        if family != socket.AF_INET6:
            raise
        # no IPv6 on the loopback: an IPv4 pair (the layer still reports IPv6 addresses)
        daemon_end, layer_end = await open_relay_pair(socket.AF_INET, kind)
    return daemon_end, layer_end, layer_end.getsockname()[:2]


async def serve_stream(
    relay: FlowRelay, sock: socket.socket, accept_from: tuple[str, int] | None = None
) -> None:
    """Relay an outgoing TCP or unix connection over the daemon's end `sock` of a private
    pair; with `accept_from`, `sock` is an `open_relay_listener` and the relay's socket is
    the connection from that address (the user app's own socket), accepted first (if it does
    not come, the agent's connection is reset)."""
    attached = False
    try:
        if accept_from is not None:
            accepted = await accept_relay_connection(sock, accept_from)
            if accepted is None:
                relay.fail(errno_mod.ECONNRESET)
                return
            sock = accepted
        # read only under credit (see RawSocketStream)
        relay.attach(RawSocketStream(sock))
        attached = True
        await relay.run()  # closes the socket
    finally:
        if not attached:
            sock.close()


async def serve_datagrams(relay: FlowRelay, sock: socket.socket, closing: anyio.Event) -> None:
    """Relay datagrams between the agent and the daemon's UDP socket `sock`, connected to the
    user app's socket (the kernel drops anyone else's). `closing` is set when the app closed
    its socket: what it sent just before is relayed (until nothing came for UDP_CLOSE_GRACE,
    at most UDP_CLOSE_MAX), then the association ends with `ConnClose(0)`."""
    try:
        udp = await anyio.abc.ConnectedUDPSocket.from_socket(sock)
    except BaseException:
        sock.close()
        raise
    relay.attach(udp)  # closed through its transport: a socket closed under the event
    # loop's selector would leave its fd number registered there for the next socket
    async with anyio.create_task_group() as tg:
        tg.start_soon(_end_after_close, relay, closing)
        await relay.run()
        tg.cancel_scope.cancel()


async def _end_after_close(relay: FlowRelay, closing: anyio.Event) -> None:
    await closing.wait()
    with anyio.move_on_after(UDP_CLOSE_MAX):
        while True:
            seen = relay.reads
            await anyio.sleep(UDP_CLOSE_GRACE)
            if relay.reads == seen:
                break  # nothing more was on its way
    relay.socket_closed()


async def serve_incoming(
    relay: FlowRelay,
    address: str,
    port: int,
    on_connected: Callable[[int], None],
    *,
    owner: int,
) -> None:
    """Connect to the user app's listening socket (see `connect_announcing`), then relay; a
    refused connection is refused to the agent too (ECONNREFUSED: the target's app may
    answer instead)."""
    try:
        stream = await connect_announcing(address, port, on_connected, owner)
    except (OSError, TimeoutError):
        relay.fail(errno_mod.ECONNREFUSED)
        return
    relay.attach(stream)
    await relay.run()
