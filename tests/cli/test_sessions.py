"""Sessions end to end: an IDE's `mirrord ext` session lives as long as its debuggee; a lost
agent turns remote calls into EIO and is reported; incoming traffic reaches the app with the
real peer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord.cli._sessions import child_env
from mirrord.localpod import LocalPod, PodSpec
from tests.cli._ide import read_until_ready
from tests.cli.conftest import Mirrord, agent_pids, python_app

pytestmark = pytest.mark.netns

SPEC = PodSpec(env={"POD_VAR": "v"}, files={"/app/test.txt": b"pod-only file\n"})


def test_ext_keeps_the_session_until_the_debuggee_exits(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    pod = make_pod(SPEC)
    ext = mirrord.popen("ext", "-t", f"pid/{pod.pid}", "--wait-timeout", "60")
    assert ext.stdout is not None
    env = read_until_ready(ext.stdout).environment
    assert env["POD_VAR"] == "v"
    # the IDE starts its debuggee with that env; it forks a child too
    debuggee = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os\n"
            "pid = os.fork()\n"
            "data = open('/app/test.txt').read()\n"
            "if pid: os.waitpid(pid, 0); print(data.strip())\n",
        ],
        env=child_env(env, mirrord.env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert debuggee.stdout.strip() == "pod-only file", debuggee.stderr
    started = time.monotonic()
    ext.communicate(timeout=20)  # the debuggee's process tree is gone: ext ends
    assert ext.returncode == 0
    assert time.monotonic() - started < 10
    assert mirrord.sessions() == []


AGENT_LOSS_APP = """
import errno, socket, sys, time
s = socket.create_connection(("127.0.0.1", 7777), timeout=10)
s.sendall(b"ping")
assert s.recv(4) == b"ping"
print("ready", flush=True)
results = []
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        open("/app/test.txt").read()
    except OSError as exc:
        results.append("file " + errno.errorcode.get(exc.errno, str(exc.errno)))
        break
    time.sleep(0.05)
try:
    s.settimeout(5)
    data = s.recv(10)
    results.append("socket eof" if not data else "socket data")
except OSError as exc:
    results.append("socket " + errno.errorcode.get(exc.errno, str(exc.errno)))
print(" | ".join(results), flush=True)
"""


def test_a_lost_agent_fails_remote_calls_with_eio_and_resets_connections(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(SPEC)
    # the relayed path: a handed-over file or connection is the target's own and lives on
    mirrord.env["MIRRORD_FILE_HANDOVER"] = "false"
    mirrord.env["MIRRORD_OUTGOING_HANDOVER"] = "false"
    proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", *python_app(tmp_path, AGENT_LOSS_APP))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    [agent] = agent_pids(mirrord.runtime, f"pid/{pod.pid}")
    os.kill(agent, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert "file EIO" in out, (out, err)
    assert "socket ECONNRESET" in out, (out, err)
    assert "the agent was lost" in err
    # the next session gets a new agent
    again = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", "cat", "/app/test.txt")
    assert again.stdout == "pod-only file\n", again.stderr


MIRROR_APP = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080))
srv.listen(4)
srv.settimeout(20)
print("listening", flush=True)
conn, peer = srv.accept()
data = b""
conn.settimeout(10)
while b"\\r\\n\\r\\n" not in data:
    chunk = conn.recv(4096)
    if not chunk:
        break
    data += chunk
print("request", data.split(b"\\r\\n")[0].decode(), flush=True)
print("peer", peer[0], conn.getpeername()[0], flush=True)
"""


def test_mirrored_request_reaches_the_app_with_the_real_peer(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(SPEC)
    proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", *python_app(tmp_path, MIRROR_APP))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"

    def call_pod() -> str:
        # the pod's own service answers (mirror: the app gets a copy)
        with urllib.request.urlopen(f"http://{pod.ip}:8080/mirrored", timeout=5) as r:
            return str(r.read().decode())

    body = ""
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        body = call_pod()
        time.sleep(0.3)
    out, err = proc.communicate(timeout=20)
    assert "GET /mirrored" in body
    assert "request GET /mirrored HTTP/1.1" in out, (out, err)
    assert f"peer {pod.host_ip} {pod.host_ip}" in out, (out, err)


UDP_APP = """
import socket, struct, sys
# a DNS query for udp-only.pod, A record, sent to the pod's own resolver over a connected
# UDP socket: the datagrams go through the daemon's UDP relay and the agent
query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
for label in b"udp-only.pod".split(b"."):
    query += bytes([len(label)]) + label
query += b"\\x00" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.connect(("127.0.0.1", 53))
for _ in range(3):
    s.send(query)
    answer = s.recv(512)
    assert answer[:2] == b"\\x12\\x34", answer
    print("answer", ".".join(str(b) for b in answer[-4:]), flush=True)
"""


def test_connected_udp_goes_through_the_relay(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(PodSpec(dns_records={"udp-only.pod": "10.213.251.3"}))
    mirrord.env["MIRRORD_OUTGOING_HANDOVER"] = "false"  # the relay (a local target hands over)
    result = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", *python_app(tmp_path, UDP_APP))
    assert result.stdout.splitlines() == ["answer 10.213.251.3"] * 3, result.stderr
    [agent] = mirrord.status()["agents"]
    assert agent["link"]["relayed_connections"] >= 1
    assert agent["link"]["handed_over"] == 0


FILTER_APP = """
import socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080))
srv.listen(8)
srv.settimeout(20)
print("listening", flush=True)
conn, peer = srv.accept()
conn.settimeout(10)
data = b""
while b"\\r\\n\\r\\n" not in data:
    chunk = conn.recv(4096)
    if not chunk:
        break
    data += chunk
body = b"answered by the app on the user's machine\\n"
conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n" % len(body) + body)
conn.close()
print("stole", data.split(b"\\r\\n")[0].decode(), flush=True)
"""


def test_steal_with_an_http_filter_takes_only_matching_requests(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(SPEC)
    config = tmp_path / "mirrord.json"
    config.write_text(
        json.dumps(
            {
                "feature": {
                    "network": {
                        "incoming": {
                            "mode": "steal",
                            "http_filter": {"header_filter": "^x-user: me$"},
                        }
                    }
                }
            }
        )
    )
    proc = mirrord.popen(
        "run", "-f", str(config), "-t", f"pid/{pod.pid}", "--", *python_app(tmp_path, FILTER_APP)
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"

    def get(path: str, headers: dict[str, str]) -> str:
        request = urllib.request.Request(f"http://{pod.ip}:8080{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as r:
            return str(r.read().decode())

    # the subscription starts right after listen(): retry until the filter is in place
    deadline = time.monotonic() + 20
    stolen = ""
    while time.monotonic() < deadline and not stolen:
        other = get("/not-mine", {"X-User": "someone-else"})
        assert other.startswith("pod GET /not-mine") or "GET /not-mine" in other
        answer = get("/mine", {"X-User": "me"})
        if "answered by the app" in answer:
            stolen = answer
        else:
            time.sleep(0.2)
    out, err = proc.communicate(timeout=20)
    assert stolen, (out, err)
    assert "stole GET /mine HTTP/1.1" in out, (out, err)
