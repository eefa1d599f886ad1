"""Another local user (here `nobody`, a process started with setuid) cannot connect to, read
from or inject into any relay, socket or file of a session, and cannot make `mirrord run`
load anything (issue 20, items 1 and 2).

The other user's side runs the system's `/usr/bin/python3 -c CODE` as uid/gid 65534 (our
virtualenv may live where `nobody` cannot read), and prints one JSON result line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mirrord.layer import build_id
from mirrord.localpod import LocalPod
from mirrord.protocol import NEED_DATA, LayerConnection, LayerRole, Message, Received
from mirrord.protocol import messages as m
from tests.cli.conftest import Mirrord
from tests.reliability._session import Scene, wait_ready

pytestmark = pytest.mark.netns

NOBODY = 65534
OTHER_PYTHON = "/usr/bin/python3"


def as_nobody(code: str, *args: str, timeout: float = 30) -> Any:
    """Runs `code` as the other user; its last stdout line, parsed as JSON."""
    proc = subprocess.run(
        [OTHER_PYTHON, "-c", code, *args],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_as_nobody(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [OTHER_PYTHON, "-c", code, *args],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- files and sockets of the runtime directory ---------------------------------------------------

_TRY_EVERYTHING = """
import json, os, socket, stat, sys
results = {}
for path in sys.argv[1:]:
    try:
        if path.endswith(".sock"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(path)
            s.close()
        elif os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").read(1)
        results[path] = "allowed"
    except PermissionError:
        results[path] = "denied"
    except OSError as exc:
        results[path] = "error " + str(exc.errno)
print(json.dumps(results))
"""


def test_another_user_cannot_reach_the_runtime_directory(
    scene_factory: Callable[[str], Scene],
) -> None:
    scene = scene_factory("read")
    wait_ready(scene)
    runtime = scene.cli.runtime
    paths = [str(runtime), *(str(p) for p in sorted(runtime.iterdir()))]
    assert any(p.endswith(".secret") for p in paths) and any(p.endswith(".sock") for p in paths)
    results = as_nobody(_TRY_EVERYTHING, *paths)
    assert results == dict.fromkeys(paths, "denied")
    assert runtime.stat().st_mode & 0o777 == 0o700
    # and the session kept working
    assert scene.out.wait(lambda line: line.startswith("count"), time.monotonic(), 10, "count")


# -- relays ---------------------------------------------------------------------------------------


class LayerClient:
    """The layer's side of one layer-socket connection, as the test plays it (sync)."""

    def __init__(self, runtime: Path, session: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(runtime / "layer.sock"))
        self.conn = LayerConnection(LayerRole.LAYER, build_id=build_id())
        self.sock.sendall(self.conn.hello(session=session, pid=os.getpid()))
        assert isinstance(self.receive(), m.LayerWelcome)

    def receive(self) -> Message:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                data = self.sock.recv(65536)
                assert data, "the daemon closed the layer connection"
                self.conn.receive_data(data)
                continue
            assert isinstance(event, Received), event
            return event.message

    def call(self, msg: Message) -> Message:
        self.sock.sendall(self.conn.send(msg))
        return self.receive()

    def close(self) -> None:
        self.sock.close()


_TCP_INTRUDER = """
import json, socket, sys
address, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection((address, port), timeout=3)
except OSError as exc:
    print(json.dumps({"connected": False, "error": exc.errno})); sys.exit()
got = b""
try:
    s.sendall(b"ping from nobody")
    s.settimeout(3)
    while len(got) < 16:
        chunk = s.recv(16 - len(got))
        if not chunk:
            break
        got += chunk
except OSError:
    pass
print(json.dumps({"connected": True, "got": got.decode(errors="replace")}))
"""


def test_another_user_cannot_use_a_tcp_relay(scene_factory: Callable[[str], Scene]) -> None:
    scene = scene_factory("read")
    wait_ready(scene)
    layer = LayerClient(scene.cli.runtime, scene.session_id())
    try:
        reply = layer.call(
            m.LayerConnect(request_id=1, protocol="tcp", address="127.0.0.1", port=7777)
        )
        assert isinstance(reply, m.LayerConnected), reply
        if reply.relay_port:  # the daemon's end of the relay: the other user tries it first
            result = as_nobody(_TCP_INTRUDER, reply.relay_address, str(reply.relay_port))
            # the pod's echo service must never answer the other user
            assert result.get("got", "") == "", result
    finally:
        layer.close()


_UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65536)
    print(data.decode(errors="replace"), flush=True)
    s.sendto(data, peer)
"""

_UDP_INTRUDER = """
import json, socket, sys
address, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
got = ""
try:
    for _ in range(3):
        s.sendto(b"injected by nobody", (address, port))
    got = s.recv(65536).decode(errors="replace")
except OSError:
    pass
print(json.dumps({"got": got}))
"""


def test_another_user_cannot_inject_into_a_udp_relay(
    scene_factory: Callable[[str], Scene], pod: LocalPod
) -> None:
    server = pod.popen_in_pod([os.path.realpath(sys.executable), "-c", _UDP_ECHO])
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == b"ready"
        scene = scene_factory("read")
        wait_ready(scene)
        # the session's layer holds a UDP relay (the test plays the layer)
        layer = LayerClient(scene.cli.runtime, scene.session_id())
        try:
            reply = layer.call(
                m.LayerConnect(request_id=1, protocol="udp", address="127.0.0.1", port=9999)
            )
            assert isinstance(reply, m.LayerConnected), reply
            result = {"got": ""}
            if reply.relay_port:
                result = as_nobody(_UDP_INTRUDER, reply.relay_address, str(reply.relay_port))
            assert result["got"] == "", result
            # nor did the datagrams reach the pod
            os.set_blocking(server.stdout.fileno(), False)
            time.sleep(0.5)
            seen = server.stdout.read() or b""
            assert b"injected" not in seen, seen
        finally:
            layer.close()
    finally:
        server.kill()
        server.wait(timeout=10)


# -- mirrord run loads nothing of another user ----------------------------------------------------


@pytest.fixture
def nobodys_dir() -> Any:
    path = Path(tempfile.mkdtemp(prefix="mrdnb"))
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_runtime_directory_of_another_user_is_refused(
    nobodys_dir: Path, pod: LocalPod, tmp_path: Path
) -> None:
    cli = Mirrord(nobodys_dir)
    marker = tmp_path / "ran"
    try:
        result = cli.run(
            "run", "-t", f"pid/{pod.pid}", "--", "sh", "-c", f"echo ran > {marker}", timeout=60
        )
    finally:
        cli.cleanup()
    assert result.returncode == 1, result.stderr
    assert str(nobodys_dir) in result.stderr and "nobody" in result.stderr, result.stderr
    assert not marker.exists()


_FAKE_DAEMON = """
import json, os, socket, sys
path, preload = sys.argv[1], sys.argv[2]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(8)
print("ready", flush=True)
result = {
    "daemon": {"pid": os.getpid(), "version": "0.1.0"}, "sessions": [], "agents": [],
    "totals": {}, "running": True,
    "session": "f00d", "env": {"LD_PRELOAD": preload, "FOREIGN": "1"}, "unset": [],
    "agent": "foreign", "agent_description": "foreign", "layer_socket": path + ".layer",
    "warnings": [], "registered": True, "state": "closed",
}
while True:
    conn, _ = srv.accept()
    f = conn.makefile("rb")
    for line in f:
        try:
            rid = json.loads(line).get("id")
        except ValueError:
            continue
        conn.sendall(json.dumps({"id": rid, "ok": True, "result": result}).encode() + b"\\n")
    conn.close()
"""


def test_a_control_socket_of_another_user_is_refused(
    mirrord: Mirrord, nobodys_dir: Path, pod: LocalPod, tmp_path: Path
) -> None:
    foreign_preload = str(nobodys_dir / "foreign.so")
    fake = start_as_nobody(_FAKE_DAEMON, str(nobodys_dir / "mirrordd.sock"), foreign_preload)
    try:
        assert fake.stdout is not None
        assert fake.stdout.readline().strip() == "ready", fake.stderr
        # the other user's socket ends up at our control path (a replaced socket)
        mirrord.runtime.chmod(0o700)
        os.rename(nobodys_dir / "mirrordd.sock", mirrord.runtime / "mirrordd.sock")
        marker = tmp_path / "env"
        result = mirrord.run(
            "run",
            "-t",
            f"pid/{pod.pid}",
            "--",
            "sh",
            "-c",
            f'echo "$LD_PRELOAD $FOREIGN" > {marker}',
            timeout=60,
        )
        loaded = marker.read_text() if marker.exists() else ""
        assert foreign_preload not in loaded and "1" not in loaded.split()[-1:], loaded
        assert result.returncode == 1, result.stderr
        assert "mirrordd.sock" in result.stderr, result.stderr
    finally:
        fake.kill()
        fake.communicate(timeout=10)
