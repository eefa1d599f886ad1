"""The control API's client (`ControlClient`) against a listener that sends a malformed event:
the decode error (a bug in mirrord) reaches the caller's thread, the pending call and every
later one raise it, instead of the reader thread dying with a traceback and the call seeing a
plain disconnection."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from mirrord.daemon import Status
from mirrord.daemon._client import ControlClient


def test_a_malformed_event_is_raised_by_the_pending_and_later_calls(tmp_path: Path) -> None:
    path = tmp_path / "mirrordd.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(20)
    requests: list[dict[str, object]] = []

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn, conn.makefile("rb") as lines:
            requests.append(json.loads(lines.readline()))
            # a progress event without its message, and then no answer at all
            conn.sendall(b'{"event":"progress"}\n')
            conn.settimeout(20)
            try:
                conn.recv(1)  # until the client closes
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    seen: list[object] = []
    try:
        with ControlClient(path, on_event=seen.append) as client:
            with pytest.raises(KeyError, match="progress event has no 'message'"):
                client.call(Status(), timeout=20)
            with pytest.raises(KeyError, match="progress event has no 'message'"):
                client.call(Status(), timeout=20)
    finally:
        server.close()
        thread.join(25)
    assert [r["op"] for r in requests] == ["status"]
    assert [type(e).__name__ for e in seen] == ["DisconnectedEvent"]


def test_a_daemon_that_closed_before_reading_the_request_is_a_disconnection(
    tmp_path: Path,
) -> None:
    """A daemon exiting (daemon.idle_timeout 0 ran out as we connected) closes the connection
    before it reads the request: the send fails with EPIPE. That is `DaemonDisconnected`, which
    `mirrord run` answers by asking a new daemon, not a plain error that fails the run."""
    from mirrord.daemon import DaemonDisconnected

    path = tmp_path / "mirrordd.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(20)
    accepted = threading.Event()

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        conn.close()  # at once, nothing read
        accepted.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with ControlClient(path) as client:
            assert accepted.wait(20)
            with pytest.raises(DaemonDisconnected, match="closed the connection"):
                client.call(Status(), timeout=20)
    finally:
        server.close()
        thread.join(25)
