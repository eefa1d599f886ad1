"""Bare forwarders for `file_small_floor` and `outgoing_rr_floor`: the round trip a daemon on
asyncio and an agent on trio add when they do nothing but forward bytes (no frames, no flow, no
multiplexing), and the same through two plain `select` loops. They measure the floor that the
chosen event loops set under `file_small` and `outgoing_rr`; they are not a part of mirrord.

Run as `python -m bench._floor KIND LISTEN CONNECT`: KIND is `asyncio`, `trio` or `select`;
LISTEN is `tcp` (127.0.0.1, an ephemeral port) or a unix socket path; CONNECT is `HOST:PORT`, a
unix socket path, or `echo` (`trio` only: answer each request with its own bytes, as the agent
answers a small file request itself). The process prints `ready PORT` (0 for a unix LISTEN)
once it listens, then serves each accepted connection, one at a time, until its stdin closes
or it is killed.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
from collections.abc import Callable

_CHUNK = 65536


def _listen(where: str) -> socket.socket:
    if where == "tcp":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(where)
    s.listen()
    return s


def _connect(where: str) -> socket.socket:
    if where.startswith("/"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(where)
        return s
    host, _, port = where.rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _nodelay(s: socket.socket) -> None:
    if s.family != socket.AF_UNIX:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def forward_select(a: socket.socket, b: socket.socket) -> None:
    """Both ways between `a` and `b` in a blocking `select` loop."""
    while True:
        ready, _, _ = select.select([a, b], [], [])
        for s in ready:
            data = s.recv(_CHUNK)
            if not data:
                return
            (b if s is a else a).sendall(data)


def forward_asyncio(a: socket.socket, b: socket.socket) -> None:
    """Both ways in asyncio reader callbacks, sent at once (as the daemon reads and writes)."""
    import asyncio

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        for s in (a, b):
            s.setblocking(False)

        def readable(s: socket.socket, other: socket.socket) -> None:
            try:
                data = s.recv(_CHUNK)
            except BlockingIOError:
                return
            if not data:
                if not done.done():
                    done.set_result(None)
                return
            sent = other.send(data)
            if sent < len(data):  # never for a 1-byte round trip
                other.setblocking(True)
                other.sendall(data[sent:])
                other.setblocking(False)

        loop.add_reader(a.fileno(), readable, a, b)
        loop.add_reader(b.fileno(), readable, b, a)
        try:
            await done
        finally:
            loop.remove_reader(a.fileno())
            loop.remove_reader(b.fileno())

    asyncio.run(main())


async def _trio_receive(sock: socket.socket) -> bytes:
    """The next bytes of a non-blocking `sock`: received directly, waited for (in trio) only
    when there are none yet."""
    import trio

    while True:
        try:
            return sock.recv(_CHUNK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


def forward_trio(a: socket.socket, b: socket.socket) -> None:
    """Both ways in two trio tasks, each receiving directly and waiting only when the socket is
    empty (as the agent's relays do)."""
    import trio

    async def pump(src: socket.socket, dst: socket.socket, scope: trio.CancelScope) -> None:
        while True:
            data = await _trio_receive(src)
            if not data:
                scope.cancel()
                return
            view = memoryview(data)
            while view:
                try:
                    view = view[dst.send(view) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst)

    async def main() -> None:
        for s in (a, b):
            s.setblocking(False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, a, b, nursery.cancel_scope)
            nursery.start_soon(pump, b, a, nursery.cancel_scope)

    trio.run(main)


def echo_trio(a: socket.socket) -> None:
    """Answer each read with the same bytes, in one trio task that receives directly and waits
    only when the socket is empty."""
    import trio

    async def main() -> None:
        a.setblocking(False)
        while True:
            data = await _trio_receive(a)
            if not data:
                return
            sent = a.send(data)
            if sent < len(data):  # never for a 32-byte request
                a.setblocking(True)
                a.sendall(data[sent:])
                a.setblocking(False)

    trio.run(main)


FORWARDERS: dict[str, Callable[[socket.socket, socket.socket], None]] = {
    "select": forward_select,
    "asyncio": forward_asyncio,
    "trio": forward_trio,
}


def main(argv: list[str]) -> int:
    kind, listen_at, connect_to = argv
    forward = FORWARDERS[kind]
    ls = _listen(listen_at)
    port = ls.getsockname()[1] if ls.family == socket.AF_INET else 0
    print(f"ready {port}", flush=True)
    # The parent ends us by closing our stdin (or killing us).
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while True:
        conn, _ = ls.accept()
        _nodelay(conn)
        if connect_to == "echo" and kind == "trio":
            with conn:
                echo_trio(conn)
            continue
        with conn, _connect(connect_to) as out:
            forward(conn, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
