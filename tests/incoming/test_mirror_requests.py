"""Mirror per HTTP request, with the session's HTTP filter: `mirrord run -t pid/N -- APP` (mirror
is the default mode) against a local pod whose own HTTP server answers the clients; the user
app is a real server process that logs what it is sent, as mirrord's scenarios do."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod
from tests.cli.conftest import Mirrord

pytestmark = pytest.mark.netns

# A Werkzeug-like user app: it answers `Connection: close` (HTTP/1.0 style) and logs each
# request; `raw` mode logs each connection's bytes instead (a non-HTTP server).
# Its handler threads log one whole line per write under a lock (print writes the text and
# the newline apart: two threads' lines could interleave).
APP = """
import http.server, socketserver, sys, threading
LOCK = threading.Lock()
def log(line):
    with LOCK:
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # every answer ends its connection, as Werkzeug's does
    def do_GET(self):
        log(f"seen {self.path} {self.headers.get('x-user', '-')}")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
class Raw(socketserver.BaseRequestHandler):
    def handle(self):
        data = b""
        while chunk := self.request.recv(65536):
            data += chunk
        log(f"conn {data!r}")
handler = Raw if sys.argv[2] == "raw" else H
socketserver.ThreadingTCPServer.allow_reuse_address = True
srv = socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[1])), handler)
print("listening", flush=True)
srv.serve_forever()
"""


def start_app(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path, port: int, kind: str, *, config: object = None
) -> subprocess.Popen[str]:
    script = tmp_path / "app.py"
    script.write_text(APP)
    flags: list[str] = []
    if config is not None:
        path = tmp_path / "mirrord.json"
        path.write_text(json.dumps(config))
        flags = ["-f", str(path)]
    proc = mirrord.popen(
        "run", "-t", f"pid/{pod.pid}", *flags, "--", sys.executable, str(script), str(port), kind,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"
    time.sleep(1.0)  # the mirror's subscription follows listen() asynchronously
    return proc


def stop_app(proc: subprocess.Popen[str], expected: int, prefix: str) -> list[str]:
    """The app's log lines starting with `prefix`: read until `expected` of them came (at most
    20 s), then half a second more (there must be nothing more), then the app is stopped."""
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: list[str] = []
    got = threading.Event()

    def read() -> None:
        for line in stdout:
            if line.startswith(prefix):
                lines.append(line.strip())
                if len(lines) >= expected:
                    got.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    got.wait(20)
    time.sleep(0.5)
    proc.terminate()
    proc.wait(timeout=30)
    reader.join(timeout=10)
    return list(lines)


def keep_alive_requests(pod: LocalPod, port: int, users: list[str]) -> None:
    """Requests one after another on ONE kept-alive connection to the pod's own server, each
    answered by the pod before the next is sent."""
    with socket.create_connection((pod.ip, port), timeout=10) as sock:
        reader = sock.makefile("rb")
        for i, user in enumerate(users):
            sock.sendall(f"GET /r{i} HTTP/1.1\r\nHost: pod\r\nx-user: {user}\r\n\r\n".encode())
            status = reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
        reader.close()


def test_each_request_of_a_kept_alive_connection_reaches_an_app_that_closes(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    app = start_app(mirrord, pod, tmp_path, 8080, "http")
    keep_alive_requests(pod, 8080, ["a", "b", "c"])
    # each request is a connection of its own: the app's threads may log them in any order
    assert sorted(stop_app(app, 3, "seen")) == ["seen /r0 a", "seen /r1 b", "seen /r2 c"]


def test_mirror_copies_only_the_requests_its_http_filter_matches(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    config = {
        "feature": {
            "network": {
                "incoming": {
                    "mode": "mirror",
                    "http_filter": {"header_filter": "^x-user: alice$", "ports": [8080]},
                }
            }
        }
    }
    app = start_app(mirrord, pod, tmp_path, 8080, "http", config=config)
    keep_alive_requests(pod, 8080, ["bob", "alice", "carol", "alice"])
    assert sorted(stop_app(app, 2, "seen")) == ["seen /r1 alice", "seen /r3 alice"]


def test_non_http_traffic_stays_one_byte_stream(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    app = start_app(mirrord, pod, tmp_path, 7777, "raw")
    with socket.create_connection((pod.ip, 7777), timeout=10) as sock:
        for part in (b"\x00\x01binary hello\n", b"second part\n", b"GET / HTTP/1.1\r\n\r\n"):
            sock.sendall(part)
            time.sleep(0.2)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        while sock.recv(65536):  # the pod's echo service answers until we are done
            pass
    whole = b"\x00\x01binary hello\nsecond part\nGET / HTTP/1.1\r\n\r\n"
    assert stop_app(app, 1, "conn") == [f"conn {whole!r}"]
