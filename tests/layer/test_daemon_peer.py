"""The layer talks only to its own user's daemon: a process of another user listening on the
layer socket (it could have been put there if the runtime directory were not the user's) never
hears the LayerHello, which carries the session id, and serves no remote call. The layer
checks the listener's uid with SO_PEERCRED. Another user is uid 65534 (nobody), reached by a
forked child that setuid()s after bind() and before listen() (SO_PEERCRED records the
listening process)."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mirrord.layer import LayerSettings, layer_env
from tests._other_user import OTHER_UID, listening_as
from tests.layer.conftest import PYTHON


def _count_bytes(out: int, server: socket.socket) -> None:
    """A listener's service: write how many bytes each connection sent to the fd `out` (a file
    the test reads), for a bounded number of connections."""
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


_OPEN_A_REMOTE_FILE = """
import errno
try:
    open('/app/test.txt')
    print('opened')
except OSError as e:
    print(errno.errorcode[e.errno])
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
def test_the_layer_never_talks_to_another_users_daemon(tmp_path: Path) -> None:
    path = tmp_path / "layer.sock"
    result = tmp_path / "heard"
    out_fd = os.open(result, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with listening_as(OTHER_UID, path, functools.partial(_count_bytes, out_fd)):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MIRRORD_", "LD_"))}
            env.update(
                layer_env(
                    socket_path=str(path),
                    session_id="secret-session-id",
                    settings=LayerSettings(timeout_ms=3000),
                )
            )
            out = subprocess.run(
                [PYTHON, "-S", "-c", _OPEN_A_REMOTE_FILE],
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
        os.close(out_fd)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().strip() in ("EIO", "ENOENT"), out.stdout  # never served
    heard = [int(n) for n in result.read_text().split()]
    assert heard, "the layer never connected: nothing was tested"
    assert sum(heard) == 0, f"the foreign listener heard {heard} bytes (the LayerHello)"
