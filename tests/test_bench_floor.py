"""The bare forwarders behind the benchmark's `*_floor` figures (`bench/_floor.py`) carry bulk
data both ways, byte for byte, without the deadlock a blocking send could cause when an echo
pushes back while the forwarder still writes; and a round trip of a few bytes still crosses
them. Run as the benchmark runs them: `python -m bench._floor KIND LISTEN CONNECT [CHUNK]`
processes, two in a chain joined by a unix socket, in front of an echo server on another unix
socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
_TIMEOUT = 60
_BULK = 24 * 1024 * 1024 + 5  # well past every socket buffer on the way, both ways at once


@contextlib.contextmanager
def _echo_server(path: str) -> Iterator[None]:
    """A unix socket at `path` whose one accepted connection gets back what it sends, in
    a thread; the thread ends when the connection does."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    listener.settimeout(_TIMEOUT)

    def serve() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as conn:
            conn.settimeout(_TIMEOUT)
            while data := conn.recv(1 << 20):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.close()
        thread.join(_TIMEOUT)


@contextlib.contextmanager
def _forwarder(kind: str, listen: str, connect: str, chunk: int) -> Iterator[str]:
    """A bare forwarder process; yields its `ready` port, and kills it on the way out."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._floor", kind, listen, connect, str(chunk)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=_ROOT,
        env={**os.environ, "PYTHONPATH": str(_ROOT)},
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()  # bounded: the process prints or exits
        assert ready[:1] == ["ready"], f"the {kind} forwarder did not start"
        yield ready[1]
    finally:
        proc.kill()
        proc.communicate(timeout=_TIMEOUT)


@contextlib.contextmanager
def _chain(tmp_path: Path, first: str, second: str, chunk: int) -> Iterator[int]:
    """this test -> TCP -> `first` -> unix -> `second` -> unix -> echo; yields the TCP port."""
    echo, middle = str(tmp_path / "echo.sock"), str(tmp_path / "middle.sock")
    with (
        _echo_server(echo),
        _forwarder(second, middle, echo, chunk),
        _forwarder(first, "tcp", middle, chunk) as port,
    ):
        yield int(port)


@pytest.mark.parametrize(("first", "second"), [("asyncio", "trio"), ("select", "select")])
def test_bulk_data_crosses_the_bare_forwarders_both_ways_byte_for_byte(
    tmp_path: Path, first: str, second: str
) -> None:
    payload = os.urandom(1 << 20) * (_BULK >> 20) + os.urandom(_BULK % (1 << 20))
    with (
        _chain(tmp_path, first, second, 256 * 1024) as port,
        socket.create_connection(("127.0.0.1", port), timeout=_TIMEOUT) as s,
    ):
        sender = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
        sender.start()
        got = hashlib.sha256()
        received = 0
        while received < len(payload):
            data = s.recv(1 << 20)
            assert data, f"the chain closed after {received} of {len(payload)} bytes"
            got.update(data)
            received += len(data)
        sender.join(_TIMEOUT)
        assert not sender.is_alive()
    assert received == len(payload)
    assert got.hexdigest() == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize(("first", "second"), [("asyncio", "trio"), ("select", "select")])
def test_a_small_round_trip_crosses_the_bare_forwarders(
    tmp_path: Path, first: str, second: str
) -> None:
    with (
        _chain(tmp_path, first, second, 65536) as port,
        socket.create_connection(("127.0.0.1", port), timeout=_TIMEOUT) as s,
    ):
        for i in range(20):
            message = b"%032d" % i
            s.sendall(message)
            got = b""
            while len(got) < len(message):
                data = s.recv(64)
                assert data, "the chain closed"
                got += data
            assert got == message
