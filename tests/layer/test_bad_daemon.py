"""A daemon that sends malformed or hostile frames: the layer's CBOR reader refuses them and
the call fails with EIO; the program neither crashes nor hangs."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest

from mirrord.layer import LayerSettings, layer_env
from tests.layer.conftest import PYTHON


def _frame(item: object) -> bytes:
    payload = cbor2.dumps(item)
    return struct.pack(">I", len(payload)) + payload


BAD_REPLIES = {
    "length_over_limit": b"\xff\xff\xff\xff",
    "not_cbor": struct.pack(">I", 3) + b"\xff\xfe\xfd",
    "trailing_bytes": struct.pack(">I", 4) + cbor2.dumps([2, 1]) + b"\x00",
    "truncated_then_closed": struct.pack(">I", 10) + b"\x85\x01",
    "indefinite_array": struct.pack(">I", 4) + b"\x9f\x01\x02\xff",
    "deep_nesting": _frame(__import__("functools").reduce(lambda a, _: [a], range(40), [])),
    "tagged_item": struct.pack(">I", 3) + b"\xc1\x01\x02",
    "float": struct.pack(">I", 9) + b"\xfb" + struct.pack(">d", 1.5),
    "reply_to_another_request": _frame([11, 999, 5]),
    "wrong_reply_kind": _frame([27, 1, 5]),
    "fatal": _frame([3, "bye", "closing"]),
    "huge_count": struct.pack(">I", 5) + b"\x9b\xff\xff\xff\xff",
    "string_past_the_end": struct.pack(">I", 3) + b"\x82\x0b\x5a",
}


class _BadDaemon:
    def __init__(self, path: Path, reply: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.reply = reply
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.conns: list[socket.socket] = []

    def _recv_frame(self, conn: socket.socket) -> bytes | None:
        head = b""
        while len(head) < 4:
            chunk = conn.recv(4 - len(head))
            if not chunk:
                return None
            head += chunk
        (n,) = struct.unpack(">I", head)
        body = b""
        while len(body) < n:
            chunk = conn.recv(n - len(body))
            if not chunk:
                return None
            body += chunk
        return body

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            hello = self._recv_frame(conn)
            if hello is None:
                return
            conn.sendall(_frame([201, cbor2.loads(hello)[3]]))
            while self._recv_frame(conn) is not None:
                conn.sendall(self.reply)
                if self.reply.startswith(struct.pack(">I", 10)):
                    conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            conn.close()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def __enter__(self) -> _BadDaemon:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture(params=sorted(BAD_REPLIES))
def bad_daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "bad.sock"
    with _BadDaemon(path, BAD_REPLIES[request.param]):
        yield path


def test_malformed_replies_fail_the_call_with_eio(bad_daemon: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIRRORD_", "LD_PRELOAD"))}
    env.update(
        layer_env(
            socket_path=str(bad_daemon), session_id="s", settings=LayerSettings(timeout_ms=2000)
        )
    )
    code = """
import errno, os
for attempt in range(2):
    try:
        open('/app/test.txt')
        print('opened?!')
    except OSError as e:
        print(errno.errorcode[e.errno])
print(len(os.listdir('.')) >= 0)
"""
    out = subprocess.run(
        [PYTHON, "-S", "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split() == ["EIO", "EIO", "True"]
