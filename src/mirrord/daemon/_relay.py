"""The daemon's relay sockets: making them, and the figures of what went through them.

Owns: the private loopback pair of an outgoing connection (`open_relay_pair`), the listener
for the supervisor's connection of the user app's own socket (`open_relay_listener`,
`accept_relay_connection`), the connection to the user app's listener of an incoming one
(`connect_announcing`), and `Counters`. Does not own relaying (`mirrord._relay`, the engine
shared with the agent: docs/relay.md; the daemon's use of it: `_relaying`).

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
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from mirrord._relay import RawSocketStream
from mirrord.daemon._io import peer_uid

__all__ = [
    "PAIR_TIMEOUT",
    "STREAM_CLOSE_MAX",
    "UDP_CLOSE_GRACE",
    "UDP_CLOSE_MAX",
    "Counters",
    "accept_relay_connection",
    "connect_announcing",
    "open_relay_listener",
    "open_relay_pair",
]

log = logging.getLogger("mirrord.daemon.relay")

# After the app closed a relayed UDP socket, the datagrams it sent just before are in the
# daemon socket's queue (loopback delivers them during the app's sendto()), or rarely still in
# the loopback backlog when softirq work was deferred under load: read until the socket was
# empty this long before ending the relay. Short, so a program that opens a socket per
# message does not pile up relays (and sockets in the target) while they drain.
UDP_CLOSE_GRACE = 0.05
UDP_CLOSE_MAX = 2.0  # ... but never longer than this in all
# After a process exited, its relayed outgoing connections end as the kernel ends a dead process's
# sockets: what the app wrote before exiting is still relayed, then an orderly close (the
# app's end is closed, so each relay reads to the end of its socket and the flow drains).
# The process's channel is closed (resetting what is left) once every one of them finished,
# or after this long: a peer in the target that never closes its side is not waited for.
STREAM_CLOSE_MAX = 5.0
PAIR_TIMEOUT = 5.0  # a loopback handshake inside the daemon; only a stalled machine is slower


@dataclass(slots=True)
class Counters:
    """Bytes relayed, shown by `mirrord daemon status`."""

    to_agent: int = 0
    to_user: int = 0
    connections: int = 0


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
    socket the caller names (`accept_relay_connection`): the system-call supervisor connects
    the user app's own socket to it (docs/layer.md)."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setblocking(False)
        listener.bind((_loopback(family), 0))
        listener.listen(8)
    except BaseException:
        listener.close()
        raise
    return listener


async def accept_relay_connection(
    listener: socket.socket, app: tuple[str, int]
) -> socket.socket | None:
    """The connection from the user app's socket at `app` on an `open_relay_listener`, or
    None when it did not come within PAIR_TIMEOUT. The listener is closed either way."""
    try:
        with anyio.fail_after(PAIR_TIMEOUT):
            accepted = await _accept_from(listener, _endpoint(app))
    except (OSError, TimeoutError):
        return None
    finally:
        listener.close()
    accepted.setblocking(False)
    return accepted


def _discard_queued(sock: socket.socket) -> None:
    for _ in range(1024):  # bounded: a flood before connect() cannot keep us here
        try:
            sock.recv(1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            continue  # an ICMP error queued for the socket: read, go on


async def connect_announcing(
    address: str, port: int, on_connected: Callable[[int], None], owner: int
) -> RawSocketStream:
    """A connection to the user app's listener at `address`:`port` (an incoming connection
    handed to it). `on_connected` learns our source port before the connection exists, so a
    `PeerLookup` from the app's `accept()` can never arrive before the daemon knows the peer.
    `owner`: the uid the listener must belong to (the app's); a listener of anyone else at
    that port (the app's was closed where the layer could not see it) is refused (OSError
    ECONNREFUSED), as is a port nobody listens on."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        on_connected(sock.getsockname()[1])
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
