"""Creating sockets in the target's network namespace for the incoming-traffic code.

Owns: `NetnsRunner`, a blocking helper that runs a function on a dedicated thread that has
entered a network namespace (`setns` moves only the calling thread; a socket keeps the
namespace it was created in, whichever thread uses it later), and the socket factories the
incoming code needs (listener, marked connection, AF_PACKET). Does not own the agent's own
namespace thread (the agent core's); `IncomingService` takes that one when it is given one.
"""

from __future__ import annotations

import ctypes
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

__all__ = ["NetnsRunner", "original_dst"]

T = TypeVar("T")
CLONE_NEWNET: Final = 0x40000000
SO_ORIGINAL_DST: Final = 80
SO_MARK: Final = 36


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

    def call(self, fn: Callable[[], T]) -> T:
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

    # -- socket factories (each runs in the namespace)

    def listener(self, port: int = 0, backlog: int = 1024) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # 0.0.0.0: PREROUTING REDIRECT rewrites to the incoming interface's address.
                s.bind(("0.0.0.0", port))
                s.listen(backlog)
            except BaseException:
                s.close()
                raise
            return s

        return self.call(make)

    def marked_socket(self, mark: int, family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket with SO_MARK set, so our own OUTPUT rule lets it through."""

        def make() -> socket.socket:
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            except BaseException:
                s.close()
                raise
            return s

        return self.call(make)


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was going (IPv4 only)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), int(port)
