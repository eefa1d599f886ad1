"""Creating sockets in the target's network namespace for the incoming-traffic code.

Owns: the socket factories the incoming code runs in the namespace (`make_listener`,
`make_marked_socket`), `original_dst`, `SyncRunner` (what the incoming code needs of a
runner), and `NetnsRunner`, a minimal stand-in for the agent
core's runner (`mirrord.agent._netns.NetnsRunner`, same `run_sync(fn)` shape) used by tests
and tools that have no agent: one thread that has entered a network namespace (`setns` moves
only the calling thread; a socket keeps the namespace it was created in, whichever thread
uses it later). Does not own the agent's own namespace threads.
"""

from __future__ import annotations

import ctypes
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

__all__ = ["NetnsRunner", "SyncRunner", "make_listener", "make_marked_socket", "original_dst"]

T = TypeVar("T")
CLONE_NEWNET: Final = 0x40000000
SO_ORIGINAL_DST: Final = 80
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
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s


def make_marked_socket(mark: int, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket with SO_MARK set, so the agent's own OUTPUT rule lets it through."""
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except BaseException:
        s.close()
        raise
    return s


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was going (IPv4 only)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), int(port)
