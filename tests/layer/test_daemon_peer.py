"""The layer talks only to its own user's daemon: a process of another user listening on the
layer socket (it could have been put there if the runtime directory were not the user's) never
hears the LayerHello, which carries the session id, and serves no remote call. The layer
checks the listener's uid with SO_PEERCRED. Another user is uid 65534 (nobody), reached by a
forked child that setuid()s after bind() and before listen() (SO_PEERCRED records the
listening process)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mirrord.layer import LayerSettings, layer_env
from tests.layer.conftest import PYTHON

NOBODY = 65534


def _listen_as(uid: int, path: Path, result: Path) -> int:
    """A child that listens on `path` as `uid` and writes how many bytes each connection sent
    to `result` (readable by the test) until killed. Returns its pid once it listens."""
    ready_r, ready_w = os.pipe()
    out = os.open(result, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(ready_r)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(path))
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            server.listen(8)
            os.write(ready_w, b"1")
            server.settimeout(30)
            for _ in range(16):
                conn, _ = server.accept()
                conn.settimeout(5)
                got = b""
                try:
                    while chunk := conn.recv(65536):
                        got += chunk
                except OSError:
                    pass
                os.write(out, f"{len(got)}\n".encode())
                conn.close()
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(out)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
def test_the_layer_never_talks_to_another_users_daemon(tmp_path: Path) -> None:
    path = tmp_path / "layer.sock"
    result = tmp_path / "heard"
    listener = _listen_as(NOBODY, path, result)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MIRRORD_", "LD_"))}
        env.update(
            layer_env(
                socket_path=str(path),
                session_id="secret-session-id",
                settings=LayerSettings(timeout_ms=3000),
            )
        )
        code = """
import errno
try:
    open('/app/test.txt')
    print('opened')
except OSError as e:
    print(errno.errorcode[e.errno])
"""
        out = subprocess.run(
            [PYTHON, "-S", "-c", code],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
            check=False,
        )
        deadline = time.monotonic() + 10  # the listener writes once the layer's socket closes
        while not result.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(listener, 9)
        os.waitpid(listener, 0)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().strip() in ("EIO", "ENOENT"), out.stdout  # never served
    heard = [int(n) for n in result.read_text().split()]
    assert heard, "the layer never connected: nothing was tested"
    assert sum(heard) == 0, f"the foreign listener heard {heard} bytes (the LayerHello)"
