"""Creating sockets in the target's network namespace for the incoming-traffic code.

Owns: the socket factories the incoming code runs in the namespace (`make_listener`,
`make_listeners`, `make_marked_socket`), `original_dst` (IPv4 and IPv6), `SyncRunner` (what
the incoming code needs of a runner), and `NetnsRunner`, a minimal stand-in for the agent
core's runner (`mirrord.agent._netns.NetnsRunner`, same `run_sync(fn)` shape) used by tests
and tools that have no agent: one thread that has entered a network namespace (`setns` moves
only the calling thread; a socket keeps the namespace it was created in, whichever thread
uses it later). Does not own the agent's own namespace threads.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

__all__ = [
    "NetnsRunner",
    "SyncRunner",
    "family_of",
    "is_loopback",
    "make_listener",
    "make_listeners",
    "make_marked_socket",
    "original_dst",
]

T = TypeVar("T")
CLONE_NEWNET: Final = 0x40000000
SO_ORIGINAL_DST: Final = 80  # on SOL_IP (linux/netfilter_ipv4.h)
IP6T_SO_ORIGINAL_DST: Final = 80  # on SOL_IPV6 (linux/netfilter_ipv6/ip6_tables.h)
_SOCKADDR_IN6: Final = struct.Struct("!2xH4x16s4x")  # family, port, flowinfo, address, scope
_PORT_TRIES: Final = 32  # IPv4 ports tried before one is also free for IPv6
SO_MARK: Final = 36


class SyncRunner(Protocol):
    """Runs `fn` inside the target's network namespace and returns its result (blocking)."""

    def run_sync(self, fn: Callable[[], Any]) -> Any: ...


class NetnsRunner:
    """One thread inside the network namespace at `netns_path`; `call(fn)` runs `fn` there
    and returns its result (blocking: call from a worker thread). `close()` ends the thread."""

    def __init__(self, netns_path: str) -> None:
        self.netns_path = netns_path
        self._jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]] | None] = queue.Queue()
        ready: queue.Queue[BaseException | None] = queue.Queue()
        self._thread = threading.Thread(
            target=self._main, args=(ready,), name=f"netns:{netns_path}", daemon=True
        )
        self._thread.start()
        err = ready.get()
        if err is not None:
            raise err

    def _main(self, ready: queue.Queue[BaseException | None]) -> None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            fd = os.open(self.netns_path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({self.netns_path}): {os.strerror(err)}")
            finally:
                os.close(fd)
        except BaseException as exc:
            ready.put(exc)
            return
        ready.put(None)
        while (job := self._jobs.get()) is not None:
            fn, out = job
            try:
                out.put((True, fn()))
            except BaseException as exc:
                out.put((False, exc))

    def run_sync(self, fn: Callable[[], T]) -> T:
        out: queue.Queue[tuple[bool, Any]] = queue.Queue()
        if not self._thread.is_alive():
            raise OSError(9, "the network namespace thread has ended")
        self._jobs.put((fn, out))
        ok, value = out.get()
        if not ok:
            raise value
        result: T = value
        return result

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)


def make_listener(port: int = 0, backlog: int = 1024) -> socket.socket:
    """A TCP listener on 0.0.0.0 (PREROUTING REDIRECT rewrites the destination to the incoming
    interface's address, OUTPUT REDIRECT to 127.0.0.1: one wildcard listener takes both)."""
    return _listener(socket.AF_INET, port, backlog)


def _listener(family: int, port: int, backlog: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # IPv4 has its own listener: a dual-stack one would name IPv4 peers ::ffff:a.b.c.d
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s


def make_listeners(backlog: int = 1024) -> list[socket.socket]:
    """The steal listeners: `make_listener`'s on 0.0.0.0 and an IPv6-only one on `::` at the
    same port (the steal rules of both families redirect to one port: IPv6 PREROUTING REDIRECT
    rewrites to the incoming interface's address, OUTPUT to ::1). Only the IPv4 one when the
    namespace has no IPv6 at all."""
    for _ in range(_PORT_TRIES):
        v4 = make_listener(0, backlog)
        try:
            return [v4, _listener(socket.AF_INET6, v4.getsockname()[1], backlog)]
        except OSError as exc:
            if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                return [v4]  # no IPv6 here: the guard installs IPv4 rules only
            v4.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(
        errno.EADDRINUSE,
        f"no port free for both IPv4 and IPv6 listeners after {_PORT_TRIES} tries",
    )


def make_marked_socket(mark: int, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket with SO_MARK set, so the agent's own OUTPUT rule lets it through."""
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except BaseException:
        s.close()
        raise
    return s


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1: where OUTPUT REDIRECT (the pod talking to itself) lands."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was going: conntrack's original destination, read with
    SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6) by the socket's family."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
        port, addr6 = _SOCKADDR_IN6.unpack_from(raw)
        return socket.inet_ntop(socket.AF_INET6, addr6), int(port)
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), int(port)
