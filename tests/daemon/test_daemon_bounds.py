"""The daemon under a bad or hostile peer on its own sockets: the control socket's line limit,
linear line splitting, bounded unread replies, bad input answered `bad_request` with no
traceback, and connections of another uid refused (SO_PEERCRED). The scripted agent of
test_daemon_logic stands for the agent; the sockets, the daemon and the protocol are real."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import struct
import threading
import time
from pathlib import Path

import anyio
import cbor2
import pytest
from anyio.abc import SocketAttribute

from mirrord.daemon._daemon import LineSplitter, LineTooLong
from mirrord.layer import build_id
from mirrord.protocol import INITIAL_WINDOW, LayerConnection, LayerRole
from mirrord.protocol import messages as m
from tests.daemon.test_daemon_logic import Harness

pytestmark = pytest.mark.anyio

NOBODY = 65534


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _raw_control(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    return sock


def _replies(sock: socket.socket, count: int) -> list[dict[str, object]]:
    """`count` replies (events skipped), read with a bounded wait."""
    stream = sock.makefile("rb")
    out: list[dict[str, object]] = []
    while len(out) < count:
        line = stream.readline()
        assert line, f"the daemon closed the connection after {len(out)} replies"
        obj = json.loads(line)
        if "event" not in obj:
            out.append(obj)
    return out


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything until EOF (or the reset of a peer that closed with our bytes unread)."""
    got = bytearray()
    while True:
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not data:
            break
        got += data
    return bytes(got)


def test_line_splitter_is_linear_and_capped() -> None:
    splitter = LineSplitter(100)
    assert splitter.feed(b'{"a"') == []
    assert splitter.feed(b":1}\n\n{}\nrest") == [b'{"a":1}', b"{}"]
    assert splitter.feed(b"\n") == [b"rest"]
    # 4 MiB of short lines in 64 KiB reads: each byte scanned once (quadratic took minutes)
    big = LineSplitter(1 << 20)
    data = b"{}\n" * (4 * 1024 * 1024 // 3)
    started = time.monotonic()
    total = sum(len(big.feed(data[i : i + 65536])) for i in range(0, len(data), 65536))
    assert total == len(data) // 3
    assert time.monotonic() - started < 20  # ~0.5 s; the quadratic split needed minutes
    with pytest.raises(LineTooLong, match="the limit is 100 bytes"):
        splitter.feed(b"x" * 101)
    with pytest.raises(LineTooLong):  # a long line that ends in the same read
        LineSplitter(100).feed(b"y" * 200 + b"\n")


async def test_many_short_lines_do_not_stall_the_daemon(harness: Harness) -> None:
    """4 MiB of newlines in one write used to hold the event loop for minutes (each line
    copied the rest of the buffer): another client's status must answer meanwhile."""
    flood = await anyio.to_thread.run_sync(_raw_control, harness.paths.control_socket)
    try:
        await anyio.to_thread.run_sync(flood.sendall, b"\n" * (4 * 1024 * 1024))
        control = await harness.control()
        with anyio.fail_after(20):
            reply = await control.call("status")
        assert reply["ok"]
        # and the flood itself was consumed: a request after it is answered
        await anyio.to_thread.run_sync(flood.sendall, b'{"id":7,"op":"status"}\n')
        (reply,) = await anyio.to_thread.run_sync(_replies, flood, 1)
        assert reply["id"] == 7 and reply["ok"]
    finally:
        flood.close()


async def test_a_request_line_over_the_limit_is_refused_and_closed(harness: Harness) -> None:
    sock = await anyio.to_thread.run_sync(_raw_control, harness.paths.control_socket)
    try:
        # a long line that ends with a newline in the same stream (it used to be parsed)
        line = b'{"op":"status","pad":"' + b"x" * (9 * 1024 * 1024) + b'"}\n'

        def send_and_read() -> list[bytes]:
            try:
                sock.sendall(line)
            except OSError:
                pass  # the daemon closed while we were still writing: that is the point
            return _read_until_closed(sock).splitlines()

        got = await anyio.to_thread.run_sync(send_and_read)
        assert len(got) == 1, got
        reply = json.loads(got[0])
        assert reply["error"]["code"] == "bad_request"
        assert "the limit is" in reply["error"]["message"]
    finally:
        sock.close()


async def test_replies_a_client_does_not_read_are_bounded(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends requests and never reads: the daemon queued every reply (+472 MB
    in the attack); past the bound it closes the connection and says why in its log."""
    harness.daemon.max_unread = 1024 * 1024
    # the kernel's share stays small whatever net.core.wmem_max allows
    monkeypatch.setattr("mirrord._frames.SEND_BUFFER", 64 * 1024)
    sock = await anyio.to_thread.run_sync(_raw_control, harness.paths.control_socket)
    try:
        requests = b'{"op":"status"}\n' * 40000  # ~40 MB of replies, never read

        def send_then_drain() -> int:
            try:
                sock.sendall(requests)
            except OSError:
                pass  # closed by the daemon before we were done
            return len(_read_until_closed(sock))

        with caplog.at_level(logging.WARNING, logger="mirrord.daemon"), anyio.fail_after(60):
            read = await anyio.to_thread.run_sync(send_then_drain)
        # what was queued (<= the bound plus one reply) and what the socket buffers held
        assert read < 16 * 1024 * 1024, read
        assert any("unread" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        sock.close()
    control = await harness.control()
    assert (await control.call("status"))["ok"]  # the daemon itself is fine


@pytest.mark.parametrize(
    "line",
    [
        b"\xff\xfe{not utf-8}",
        b'{"id": 1, "op": "status", "x": "\xc3\x28"}',
        b"[" * 100000 + b"]" * 100000,
        b'{"id": ' + b"[" * 5000 + b"]" * 5000 + b', "op": "status"}',
        b'{"id": {"a": 1}, "op": "status"}',
        b"not json at all",
    ],
    ids=["binary", "bad-utf8", "deep-array", "deep-id", "object-id", "garbage"],
)
async def test_undecodable_or_deeply_nested_requests_are_bad_request(
    harness: Harness, caplog: pytest.LogCaptureFixture, line: bytes
) -> None:
    sock = await anyio.to_thread.run_sync(_raw_control, harness.paths.control_socket)
    try:
        with caplog.at_level(logging.DEBUG, logger="mirrord"):
            await anyio.to_thread.run_sync(sock.sendall, line + b"\n")
            (reply,) = await anyio.to_thread.run_sync(_replies, sock, 1)
        error = reply["error"]
        assert isinstance(error, dict) and error["code"] == "bad_request", reply
        assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
        # the connection still serves well-formed requests
        await anyio.to_thread.run_sync(sock.sendall, b'{"id": 9, "op": "status"}\n')
        (reply,) = await anyio.to_thread.run_sync(_replies, sock, 1)
        assert reply["id"] == 9 and reply["ok"]
    finally:
        sock.close()


def _connect_as_nobody(path: Path, payload: bytes) -> tuple[bytes, int]:
    """Fork a child that becomes uid 65534, connects to `path`, sends `payload` and returns
    what it read before EOF (or a timeout) through a pipe; returns (that, exit status)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(str(path))
            try:
                sock.sendall(payload)
            except OSError:
                pass  # refused before the payload was written
            got = _read_until_closed(sock)
            os.write(write_fd, got[:4096])
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as r:
        got = r.read()
    _, status = os.waitpid(pid, 0)
    return got, os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
async def test_connections_of_another_uid_are_refused(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Were the runtime directory and sockets opened up (chmod), another user's connection
    still gets nothing: the daemon checks the peer's uid (SO_PEERCRED) on both sockets."""
    _, session, _ = await harness.session()
    os.chmod(harness.paths.root, 0o711)
    for path in (harness.paths.control_socket, harness.paths.layer_socket):
        os.chmod(path, 0o666)
    try:
        with caplog.at_level(logging.WARNING, logger="mirrord.daemon"):
            got, code = await anyio.to_thread.run_sync(
                _connect_as_nobody, harness.paths.control_socket, b'{"id":1,"op":"status"}\n'
            )
            assert code == 0 and got == b"", got  # no status (it lists sessions and pids)
            hello = LayerConnection(LayerRole.LAYER, build_id=build_id()).hello(
                session=session, pid=1234, parent_pid=None
            )
            got, code = await anyio.to_thread.run_sync(
                _connect_as_nobody, harness.paths.layer_socket, hello
            )
            assert code == 0 and got == b"", got  # no welcome into the session
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert any("control connection" in t and "uid 65534" in t for t in refused), refused
        assert any("layer connection" in t and "uid 65534" in t for t in refused), refused
        assert not harness.daemon.sessions[session].processes
    finally:
        os.chmod(harness.paths.root, 0o700)


async def test_an_upload_is_read_only_as_fast_as_the_credit_window_allows(
    harness: Harness,
) -> None:
    """The user app uploads on an outgoing connection and the agent grants no credit: the
    daemon reads the window's worth and leaves the rest in the kernel, so the app's writes
    stop (a 4 GiB upload used to grow the daemon to 3.1 GB)."""
    _, session, _ = await harness.session()
    peer = await harness.layer(session, pid=5101)
    reply = await peer.request(
        m.LayerConnect(request_id=3, protocol="tcp", address="10.1.2.3", port=80)
    )
    assert isinstance(reply, m.LayerConnected), reply
    received: list[int] = []
    harness.agent().on_data = lambda _ch, d: received.append(len(d.data))  # never credits
    cap = 256 * 1024 * 1024

    def upload() -> int:
        """Write without blocking until the kernel takes no more for 2 s (or `cap`)."""
        sock = peer.passed.pop()  # the app's end of the relay, passed with the reply
        sock.setblocking(False)
        chunk = b"u" * (1 << 20)
        sent, idle_since = 0, time.monotonic()
        try:
            while sent < cap and time.monotonic() - idle_since < 2:
                try:
                    sent += sock.send(chunk)
                    idle_since = time.monotonic()
                except BlockingIOError:
                    time.sleep(0.01)
        finally:
            sock.close()
        return sent

    with anyio.fail_after(120):
        sent = await anyio.to_thread.run_sync(upload)
    assert sum(received) <= INITIAL_WINDOW  # what the agent got: the window, no more
    # the rest is in the kernel's buffers (a few MiB at most), never in the daemon
    assert sent < 64 * 1024 * 1024, f"the daemon took {sent} bytes without credit"


def _random_item(rng: random.Random, depth: int = 0) -> object:
    choice = rng.randrange(9 if depth < 3 else 6)
    if choice == 0:
        return rng.choice([0, 1, -1, 2**31, 2**64 + 5, -(2**70)])
    if choice == 1:
        return rng.randbytes(rng.randrange(0, 40))
    if choice == 2:
        return "".join(rng.choice("ab/\x00é") for _ in range(rng.randrange(0, 20)))
    if choice == 3:
        return None
    if choice == 4:
        return rng.choice([True, False, 1.5, float("nan")])
    if choice == 5:
        return rng.randrange(0, 300)
    if choice == 6:
        return [_random_item(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if choice == 7:
        return {str(rng.randrange(5)): _random_item(rng, depth + 1) for _ in range(2)}
    return [rng.randrange(1, 300), *(_random_item(rng, depth + 1) for _ in range(4))]


def _fuzz_frames(rng: random.Random, count: int) -> list[bytes]:
    """Malformed layer frames: messages of random kinds with random fields, undecodable CBOR,
    deep nesting, frames announcing more than the size limit."""
    frames = []
    for n in range(count):
        kind = n % 6
        if kind == 0:
            payload = cbor2.dumps([rng.randrange(1, 300), *(_random_item(rng) for _ in range(5))])
        elif kind == 1:
            payload = rng.randbytes(rng.randrange(1, 64))
        elif kind == 2:
            payload = b"\x81" * 5000 + b"\x00"  # arrays nested 5000 deep
        elif kind == 3:
            frames.append(struct.pack(">I", 0xFFFFFFF0) + b"x")
            continue
        elif kind == 4:
            payload = cbor2.dumps(_random_item(rng))
        else:
            payload = cbor2.dumps([rng.randrange(1, 120), rng.randrange(-5, 2**40)])
        frames.append(struct.pack(">I", len(payload)) + payload)
    return frames


async def test_malformed_layer_frames_close_that_connection_with_a_reason(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Layer connections of a live session and unregistered ones get fuzzed frames (then the
    sender's EOF): an undecodable, too deep or too large frame closes that connection with a
    Fatal frame saying why; unknown kinds are answered or ignored (the protocol allows newer
    kinds); nothing is logged as a traceback; a healthy process of the session is served
    throughout."""
    _, session, _ = await harness.session()
    healthy = await harness.layer(session, pid=8001)
    frames = _fuzz_frames(random.Random(20), 600)
    with caplog.at_level(logging.DEBUG, logger="mirrord"):
        for n, frame in enumerate(frames):
            if n % 2:
                peer = await harness.layer(session, pid=8100 + n)
                stream = peer.stream
            else:
                stream = await harness.raw_layer()
            got = b""
            try:
                await stream.send(frame)
                await stream.send_eof()
                with anyio.fail_after(10):
                    while len(got) < 1 << 16:
                        got += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
            finally:
                await stream.aclose()
                harness.streams.remove(stream)
            if n % 6 in (2, 3):  # nested 5000 deep, over the size limit (random bytes may decode)
                assert any(code in got for code in (b"malformed_frame", b"frame_too_large")), (
                    n,
                    frame[:40],
                    got,
                )
            if n % 100 == 99:
                reply = await healthy.request(m.FileOpen(request_id=n, path=b"/ok", flags=0))
                assert isinstance(reply, m.FileOpened), reply
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks[:3]]


async def test_replies_a_layer_does_not_read_are_bounded(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A layer connection that sends requests and never reads its replies is closed past the
    bound, with a Fatal frame saying why after what was queued; the session is unharmed."""
    monkeypatch.setattr("mirrord.daemon._layer_client.MAX_LAYER_UNREAD", 256 * 1024)
    # the kernel's share stays small whatever net.core.wmem_max allows
    monkeypatch.setattr("mirrord._frames.SEND_BUFFER", 64 * 1024)
    _, session, _ = await harness.session()
    greedy = await harness.layer(session, pid=9001)
    healthy = await harness.layer(session, pid=9002)
    pings = b"".join(greedy.conn.send(m.Ping(nonce=n)) for n in range(200000))
    raw = greedy.stream.extra(SocketAttribute.raw_socket)

    def send() -> None:
        try:
            raw.sendall(pings)
        except OSError:
            pass  # closed by the daemon before we were done

    def send_then_drain() -> bytes:
        raw.setblocking(True)
        raw.settimeout(30)
        sender = threading.Thread(target=send)
        sender.start()
        try:
            # the replies pile up unread until the daemon gives up on this connection (a fixed
            # sleep was too short under load: reading then kept it below the bound)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                "unread" in r.getMessage() for r in list(caplog.records)
            ):
                time.sleep(0.01)
            return _read_until_closed(raw)
        finally:
            sender.join(30)

    with caplog.at_level(logging.WARNING, logger="mirrord.daemon"), anyio.fail_after(60):
        got = await anyio.to_thread.run_sync(send_then_drain)
    assert len(got) < 32 * 1024 * 1024, len(got)
    assert b"unread_replies" in got[-512:]  # the last frame says why
    assert any("unread" in r.getMessage() for r in caplog.records), caplog.text
    reply = await healthy.request(m.FileOpen(request_id=1, path=b"/ok", flags=0))
    assert isinstance(reply, m.FileOpened), reply
