"""Outgoing connections from the target's network namespace.

Owns: turning a `Connect` into a connected TCP stream or connected UDP socket whose socket was
created on a `NetnsRunner` thread (so it lives in the target's network namespace for good),
with the connect itself done non-blocking on the event loop and bounded by a timeout.
Errors are `OSError`s with the errno a local `connect()` would give (ECONNREFUSED,
EHOSTUNREACH, ENETUNREACH, ETIMEDOUT, ...). A UDP socket outlives "port unreachable" answers
(the datagram is lost, the association is not), as an app's socket in the target does.
Does not own the relay (`mirrord._relay`, driven by `_channel.py`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread

from mirrord.agent._netns import NetnsRunner

if TYPE_CHECKING:
    from mirrord.agent._files import TargetRoot

__all__ = ["open_outgoing"]


def _refused(exc: BaseException) -> bool:
    # anyio reports a socket's OSError as BrokenResourceError, the OSError as its cause
    return isinstance(exc, ConnectionRefusedError) or isinstance(
        exc.__cause__, ConnectionRefusedError
    )


class _LastingUDPSocket(anyio.abc.ConnectedUDPSocket):
    """A connected UDP socket that outlives "port unreachable" answers.

    In the target, a datagram to a port nobody listens on costs the sender one ECONNREFUSED and
    the next datagram may find a server. Here that error would end the relay, and every later
    datagram of the user app to that destination would be lost (an unconnected app socket
    keeps sending to the dead relay), so the error is dropped like the datagram was."""

    def __init__(self, inner: anyio.abc.ConnectedUDPSocket) -> None:
        self._inner = inner

    @property
    def _raw_socket(self) -> socket.socket:
        return self._inner.extra(anyio.abc.SocketAttribute.raw_socket)

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes

    async def receive(self) -> bytes:
        while True:
            try:
                return await self._inner.receive()
            except (ConnectionRefusedError, anyio.BrokenResourceError) as exc:
                if not _refused(exc):
                    raise
                # one per refused datagram: wait for the next one

    async def send(self, item: bytes) -> None:
        try:
            await self._inner.send(item)
        except (ConnectionRefusedError, anyio.BrokenResourceError) as exc:
            if not _refused(exc):
                raise
            # the error of an earlier datagram, reported instead of sending this one
            await self._inner.send(item)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def open_unix_stream(
    root: TargetRoot, path: bytes, *, timeout: float
) -> anyio.abc.SocketStream:
    """A connection to the unix stream socket at `path` in the target's file system.

    The path is opened confined to the target's root (`O_PATH`, `RESOLVE_IN_ROOT`: no symlink
    or `..` leads out of it), and the socket is connected through `/proc/self/fd/N`, which
    reaches the socket's inode whatever mount namespace it lives in."""
    fd = await anyio.to_thread.run_sync(root.open, path, os.O_PATH)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        with anyio.fail_after(timeout):
            while True:
                try:
                    sock.connect(f"/proc/self/fd/{fd}")
                    break
                except BlockingIOError:
                    await anyio.sleep(0.01)  # the listener's backlog is full: as connect waits
        return await anyio.abc.SocketStream.from_socket(sock)
    except TimeoutError:
        sock.close()
        raise OSError(errno.ETIMEDOUT, f"connect to {path!r} timed out") from None
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(fd)


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
            stream = _LastingUDPSocket(await anyio.abc.ConnectedUDPSocket.from_socket(sock))
    except TimeoutError:
        sock.close()
        raise OSError(errno.ETIMEDOUT, f"connect to {address}:{port} timed out") from None
    except BaseException:
        sock.close()
        raise
    return stream, str(local[0]), int(local[1])
