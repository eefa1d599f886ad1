"""Running code inside the target's network (and UTS) namespace.

Owns: a small pool of threads that have `setns`'d into `/proc/PID/ns/net` and `/proc/PID/ns/uts`
(Python 3.11 has no `os.setns`: ctypes `libc.setns`), and the helpers to run callables there.
`setns` moves only the calling thread, and a socket keeps the namespace it was created in, so
every socket that must live in the target's network (DNS, outgoing connections, the steal
listener and the mirror's sniffer) is *created* through `NetnsRunner`; its I/O may then happen
anywhere (e.g. non-blocking on the event loop). Subprocesses started from a pool thread run in
the target's network namespace too (iptables/nft need no nsenter).
Does not own: what the callables do.

The mount namespace is never entered (`setns(CLONE_NEWNS)` fails in a multithreaded process);
files are reached through `/proc/PID/root` instead (`_files.py`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

__all__ = ["CLONE_NEWNET", "CLONE_NEWUTS", "NetnsRunner", "enter_namespaces"]

CLONE_NEWNET = 0x40000000
CLONE_NEWUTS = 0x04000000

P = ParamSpec("P")
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def enter_namespaces(pid: int, flags: int = CLONE_NEWNET | CLONE_NEWUTS) -> None:
    """Move the *calling thread* into `pid`'s network and/or UTS namespace. Raises OSError."""
    for flag, name in ((CLONE_NEWNET, "net"), (CLONE_NEWUTS, "uts")):
        if not flags & flag:
            continue
        target_ns = os.stat(f"/proc/{pid}/ns/{name}")
        own_ns = os.stat(f"/proc/thread-self/ns/{name}")
        if (target_ns.st_dev, target_ns.st_ino) == (own_ns.st_dev, own_ns.st_ino):
            # Already there (e.g. an agent inside the target's pod): setns would need
            # CAP_SYS_ADMIN for nothing.
            continue
        fd = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, flag) != 0:
                err = ctypes.get_errno()
                raise OSError(
                    err, f"setns into the {name} namespace of pid {pid}: {os.strerror(err)}"
                )
        finally:
            os.close(fd)


class NetnsRunner:
    """A pool of threads inside the target's network + UTS namespaces.

    `run_sync(fn, *args)` blocks the calling thread until `fn` has run on a pool thread;
    `await run(fn, *args)` does the same without blocking the event loop. Pool threads are
    created lazily, each entering the namespaces first; if entering fails every call raises.
    """

    def __init__(self, pid: int, *, max_threads: int = 16) -> None:
        self.pid = pid
        self._entered_error: OSError | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads,
            thread_name_prefix=f"netns-{pid}",
            initializer=self._enter,
        )
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<NetnsRunner pid={self.pid}>"

    def _enter(self) -> None:
        try:
            enter_namespaces(self.pid)
            self._local.entered = True
        except OSError as exc:
            self._entered_error = exc
            self._local.entered = False

    def _call(self, fn: Callable[[], T]) -> T:
        if not getattr(self._local, "entered", False):
            raise self._entered_error or OSError("not in the target's network namespace")
        return fn()

    def check(self) -> None:
        """Raise OSError now if the target's namespaces cannot be entered."""
        self.run_sync(lambda: None)

    def run_sync(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return self._pool.submit(self._call, functools.partial(fn, *args, **kwargs)).result()

    def call(self, fn: Callable[[], T]) -> T:
        """`run_sync` under the name the incoming code's own runner uses."""
        return self.run_sync(fn)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` on a pool thread. If the caller is cancelled meanwhile, `fn` still
        finishes; a socket it returns is closed rather than leaked."""
        token = anyio.lowlevel.current_token()
        done = anyio.Event()

        loop_thread = threading.get_ident()

        def wake(_: concurrent.futures.Future[T]) -> None:
            # A future that is already done runs its callback at once, on the loop's thread.
            if threading.get_ident() == loop_thread:
                done.set()
                return
            with contextlib.suppress(Exception):  # the loop has ended: nobody waits
                anyio.from_thread.run_sync(done.set, token=token)

        future = self._pool.submit(self._call, functools.partial(fn, *args, **kwargs))
        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.add_done_callback(_close_abandoned)
            raise
        return future.result()

    async def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """A new socket in the target's network namespace (close-on-exec)."""
        return await self.run(socket.socket, family, type | socket.SOCK_CLOEXEC, proto)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _close_abandoned(future: concurrent.futures.Future[Any]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    if isinstance(result, socket.socket):
        result.close()
