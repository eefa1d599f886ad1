"""Outgoing connections from the target's network namespace.

Owns: turning a `Connect` into a connected TCP stream or connected UDP socket whose socket was
created on a `NetnsRunner` thread (so it lives in the target's network namespace for good),
with the connect itself done non-blocking on the event loop and bounded by a timeout.
Errors are `OSError`s with the errno a local `connect()` would give (ECONNREFUSED,
EHOSTUNREACH, ENETUNREACH, ETIMEDOUT, ...). Does not own the relay (`_relay.py`).
"""

from __future__ import annotations

import errno
import ipaddress
import socket

import anyio
import anyio.abc

from mirrord.agent._netns import NetnsRunner

__all__ = ["open_outgoing"]


async def open_outgoing(
    netns: NetnsRunner, protocol: str, address: str, port: int, *, timeout: float
) -> tuple[anyio.abc.SocketStream | anyio.abc.ConnectedUDPSocket, str, int]:
    """(stream, local address, local port) of a new connection to `address:port`."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        raise OSError(errno.EINVAL, f"{address!r} is not an IP address") from None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    sock = await netns.socket(family, kind)
    try:
        sock.setblocking(False)
        target = (str(ip), port) if family == socket.AF_INET else (str(ip), port, 0, 0)
        with anyio.fail_after(timeout):
            err = sock.connect_ex(target)
            if err == errno.EINPROGRESS:
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect to {address}:{port}: {errno.errorcode.get(err, err)}")
        local = sock.getsockname()
        stream: anyio.abc.SocketStream | anyio.abc.ConnectedUDPSocket
        if kind == socket.SOCK_STREAM:
            stream = await anyio.abc.SocketStream.from_socket(sock)
        else:
            stream = await anyio.abc.ConnectedUDPSocket.from_socket(sock)
    except TimeoutError:
        sock.close()
        raise OSError(errno.ETIMEDOUT, f"connect to {address}:{port} timed out") from None
    except BaseException:
        sock.close()
        raise
    return stream, str(local[0]), int(local[1])
