"""Bare forwarders for the `*_floor` figures: what a daemon on asyncio and an agent on trio
add when they do nothing but forward bytes (no frames, no flow, no multiplexing), and the same
through two plain `select` loops. They measure the floor that the chosen event loops, and a
relay of two processes at all, set under `file_small`, `outgoing_rr` and `outgoing_bulk`; they
are not a part of mirrord.

Run as `python -m bench._floor KIND LISTEN CONNECT [CHUNK]`: KIND is `asyncio`, `trio` or
`select`; LISTEN is `tcp` (127.0.0.1, an ephemeral port) or a unix socket path; CONNECT is
`HOST:PORT`, a unix socket path, or `echo` (`trio` only: answer each request with its own
bytes, as the agent answers a small file request itself); CHUNK is the most one receive takes
(64 KiB unless given; mirrord's relays take 256 KiB). The process prints `ready PORT` (0 for a
unix LISTEN) once it listens, then serves each accepted connection, one at a time, until its
stdin closes or it is killed. Every forwarder keeps both directions moving when one of them
cannot be written (a blocking send there could deadlock an echo of bulk data).
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
from collections.abc import Callable

_CHUNK = 65536  # the most one receive takes; main() sets it from CHUNK


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
    """Both ways between `a` and `b` in one `poll` loop: what a socket received is sent to
    the other at once, and what that send did not take is sent when the other is writable,
    the socket it came from not read meanwhile."""
    for s in (a, b):
        s.setblocking(False)
    other = {a: b, b: a}
    buffers = {a: bytearray(_CHUNK), b: bytearray(_CHUNK)}  # each reused once it was sent
    unsent = {a: memoryview(b""), b: memoryview(b"")}  # still to send to the key
    by_fd = {a.fileno(): a, b.fileno(): b}
    poller = select.poll()
    while True:
        for s in (a, b):
            poller.register(
                s, (0 if unsent[other[s]] else select.POLLIN) | (select.POLLOUT if unsent[s] else 0)
            )
        for fd, events in poller.poll():
            s = by_fd[fd]
            if events & select.POLLOUT and unsent[s]:
                unsent[s] = unsent[s][_send_some(s, unsent[s]) :]
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and not unsent[other[s]]:
                data = _receive_into(s, buffers[s])
                if data is None:
                    continue
                if not data:
                    return
                unsent[other[s]] = data[_send_some(other[s], data) :]


def _receive_into(s: socket.socket, buffer: bytearray) -> memoryview | None:
    """What a non-blocking receive into `buffer` got (empty at the end of the stream, None
    when there was nothing to receive): a view of `buffer`, valid until its next receive."""
    try:
        return memoryview(buffer)[: s.recv_into(buffer)]
    except BlockingIOError:
        return None


def _send_some(s: socket.socket, data: bytes | memoryview) -> int:
    """What a non-blocking send of `data` took (0 when the socket is full)."""
    try:
        return s.send(data)
    except BlockingIOError:
        return 0


def forward_asyncio(a: socket.socket, b: socket.socket) -> None:
    """Both ways in asyncio reader callbacks, sent at once (as the daemon reads and writes);
    what a send did not take waits for a writer callback, its source not read meanwhile (as
    the daemon's relays wait for a socket to be writable)."""
    import asyncio

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        for s in (a, b):
            s.setblocking(False)
        buffers = {a: bytearray(_CHUNK), b: bytearray(_CHUNK)}  # each reused once it was sent

        def readable(s: socket.socket, other: socket.socket) -> None:
            data = _receive_into(s, buffers[s])
            if data is None:
                return
            if not data:
                if not done.done():
                    done.set_result(None)
                return
            sent = _send_some(other, data)
            if sent < len(data):  # never for a round trip of a few bytes
                loop.remove_reader(s.fileno())
                loop.add_writer(other.fileno(), writable, other, s, data[sent:])

        def writable(other: socket.socket, s: socket.socket, rest: memoryview) -> None:
            rest = rest[_send_some(other, rest) :]
            if rest:
                loop.add_writer(other.fileno(), writable, other, s, rest)
                return
            loop.remove_writer(other.fileno())
            loop.add_reader(s.fileno(), readable, s, other)

        loop.add_reader(a.fileno(), readable, a, b)
        loop.add_reader(b.fileno(), readable, b, a)
        try:
            await done
        finally:
            for s in (a, b):
                loop.remove_reader(s.fileno())
                loop.remove_writer(s.fileno())

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
        buffer = bytearray(_CHUNK)  # reused once it was sent
        while True:
            while (view := _receive_into(src, buffer)) is None:
                await trio.lowlevel.wait_readable(src)
            if not view:
                scope.cancel()
                return
            while view := view[_send_some(dst, view) :]:
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
    global _CHUNK
    kind, listen_at, connect_to = argv[:3]
    if len(argv) > 3:
        _CHUNK = int(argv[3])
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
