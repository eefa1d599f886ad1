"""Incoming traffic as a developer meets it: `mirrord run -t pid/N [--steal | -f CONFIG] --
SERVER` with a real server as the user app, a local pod as the target, clients on the host
talking to the pod's address (and the pod talking to itself). Each test is a problem a user
hit, asserted by what the client, the app's log, `mirrord run`'s output or `mirrord daemon
status` show."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mirrord.localpod import LocalPod
from tests.cli.conftest import MIRRORD, Mirrord, processes_with_env, wait_for
from tests.incoming.test_end_to_end import our_rules

pytestmark = [pytest.mark.netns, pytest.mark.slow]

APP = str(Path(__file__).with_name("_local_app.py"))
ALICE = {"header_filter": "^x-user: alice$", "ports": [8080]}


def config(tmp_path: Path, name: str, incoming: dict[str, Any]) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"feature": {"network": {"incoming": incoming}}}))
    return str(path)


# A server that stops the way web frameworks do on Ctrl-C: no new connections, the requests
# it accepted are answered, then it exits (`_local_app.py` dies mid-request, and the client
# of such a request rightly gets an error).
GRACEFUL_APP = """
import http.server, signal, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        out = f"{sys.argv[1]} GET {self.path}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer.request_queue_size = 1024
srv = http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H)
srv.daemon_threads = False  # server_close() waits for the requests in progress
signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=srv.shutdown).start())
print(8080, flush=True)
srv.serve_forever()
srv.server_close()
"""


def start_app(
    mirrord: Mirrord,
    pod: LocalPod,
    name: str,
    *flags: str,
    port: int = 8080,
    log: bool = False,
    script: str = APP,
) -> subprocess.Popen[str]:
    """`mirrord run ... -- python SCRIPT NAME 0.0.0.0 PORT [log]` (`_local_app.py` by default),
    in its own process group (as a terminal's foreground job is), once the app listens."""
    argv = [sys.executable, script, name, "0.0.0.0", str(port), *(["log"] if log else [])]
    proc = mirrord.popen(
        "run",
        "-t",
        f"pid/{pod.pid}",
        *flags,
        "--",
        *argv,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == str(port), proc.stderr.read() if proc.stderr else line
    return proc


def stop_app(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    return out, err


def http(pod: LocalPod, request: bytes, *, half_close: bool = False, port: int = 8080) -> bytes:
    """One raw exchange on a fresh connection: everything the server sends until it closes."""
    with socket.create_connection((pod.ip, port), timeout=10) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def body(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


def get(pod: LocalPod, path: str, user: str = "") -> bytes:
    hdr = f"x-user: {user}\r\n" if user else ""
    return body(
        http(pod, f"GET {path} HTTP/1.1\r\nHost: pod\r\n{hdr}Connection: close\r\n\r\n".encode())
    )


def test_a_mirror_beside_a_filtered_steal_sees_each_request_once(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    """Alice steals her requests of 8080 with a filter; Bob mirrors 8080. Bob's app used to see
    every request Alice's filter left to the pod twice: once arriving from the client, once
    more when the agent passed it on to the pod's app from inside the pod."""
    alice = start_app(
        mirrord,
        pod,
        "alice-app",
        "-f",
        config(tmp_path, "alice", {"mode": "steal", "http_filter": ALICE}),
    )
    bob = start_app(mirrord, pod, "bob-app", log=True)
    time.sleep(0.5)  # the mirror's subscription follows listen() asynchronously
    assert get(pod, "/a", "alice") == b"alice-app GET /a x-user=alice\n"
    assert get(pod, "/b", "bob") == b"pod GET /b\n"
    assert get(pod, "/c") == b"pod GET /c\n"
    # the pod talking to itself (stolen by the OUTPUT rule, invisible to the sniffer before
    # the agent passes it on): still mirrored, once
    inside = pod.run_in_pod(["curl", "-s", "-m", "10", "http://127.0.0.1:8080/self"])
    assert inside.stdout == b"pod GET /self\n"
    time.sleep(1.0)
    out, _ = stop_app(bob)
    stop_app(alice)
    seen = sorted(line for line in out.splitlines() if line.startswith("seen"))
    assert seen == ["seen GET /a", "seen GET /b", "seen GET /c", "seen GET /self"]
    wait_for(lambda: our_rules(pod) == [], 10, "the steal rules to be removed")


def test_a_refused_steal_is_said_and_daemon_status_shows_each_subscription(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    """A second, unfiltered steal of a port a filtered session steals is refused by the agent;
    the app used to run on with no traffic and no word about it (so did a session whose
    filter is the same as another's). `daemon status` now lists what each session
    subscribed, and forgets a mirrored port nobody mirrors any more."""
    alice = start_app(
        mirrord,
        pod,
        "alice-app",
        "-f",
        config(tmp_path, "alice", {"mode": "steal", "http_filter": ALICE}),
    )
    whole = start_app(mirrord, pod, "whole-app", "--steal")
    mirror = start_app(mirrord, pod, "mirror-app", port=8081)

    def by_label() -> dict[str, dict[str, Any]]:
        return {s["label"].split()[2]: s for s in mirrord.status()["sessions"]}

    def traffic() -> dict[str, Any]:
        agents = mirrord.status()["agents"]
        return dict((agents[0]["link"] or {}).get("traffic", {})) if agents else {}

    wait_for(lambda: by_label()["mirror-app"]["subscriptions"], 10, "the mirror's subscription")
    sessions = by_label()
    (sub,) = sessions["alice-app"]["subscriptions"]
    assert (sub["port"], sub["mode"], sub["http_filter"]["header_filter"]) == (
        8080,
        "steal",
        "^x-user: alice$",
    )
    assert sessions["whole-app"]["subscriptions"] == []
    assert any(
        "not stolen" in w and "on_concurrent_steal" in w for w in sessions["whole-app"]["warnings"]
    )
    assert [(s["port"], s["mode"]) for s in sessions["mirror-app"]["subscriptions"]] == [
        (8081, "mirror")
    ]
    table = subprocess.run(
        [MIRRORD, "daemon", "status"],
        env={**mirrord.env, "COLUMNS": "300"},  # one line per row: nothing wrapped
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    assert "8080 steal (header_filter: ^x-user: alice$)" in table, table
    assert "8081 mirror" in table, table
    # Alice's filter still works; the refused session changed nothing
    assert get(pod, "/a", "alice") == b"alice-app GET /a x-user=alice\n"
    assert get(pod, "/b", "bob") == b"pod GET /b\n"
    _, err = stop_app(whole)
    assert "mirrord: warning: port 8080: not stolen: port 8080 is already stolen" in err, err
    # a second session with a copy of Alice's config: told why it will get nothing
    twin = start_app(
        mirrord,
        pod,
        "twin-app",
        "-f",
        config(tmp_path, "alice", {"mode": "steal", "http_filter": ALICE}),
    )
    assert get(pod, "/a", "alice") == b"alice-app GET /a x-user=alice\n"
    _, err = stop_app(twin)
    assert "another session already steals this port with the same HTTP filter" in err, err
    wait_for(lambda: "8081" in traffic(), 10, "the sniffer's figures of port 8081")
    stop_app(mirror)
    wait_for(lambda: "8081" not in traffic(), 10, "port 8081 to leave the mirrored ports")
    stop_app(alice)
    wait_for(lambda: our_rules(pod) == [], 10, "the steal rules to be removed")


def test_ctrl_c_of_a_filtered_steal_under_traffic_fails_no_request(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    """Ctrl-C in the terminal of a filtered-steal session while clients keep sending matching
    requests: each is answered by the user app until it stops, then by the pod's app. A few
    requests routed in the last moment used to get `502 ... closed the connection without a
    response`; the rules and every process of the session go too."""
    script = tmp_path / "graceful.py"
    script.write_text(GRACEFUL_APP)
    app = start_app(
        mirrord,
        pod,
        "alice-app",
        "-f",
        config(tmp_path, "alice", {"mode": "steal", "http_filter": ALICE}),
        script=str(script),
    )
    answers: list[tuple[float, bytes]] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    done = threading.Event()

    def client(keep_alive: bool) -> None:
        sock: socket.socket | None = None
        reader: Any = None
        while not done.is_set() and time.monotonic() - t0 < 30.0:
            try:
                if sock is None:
                    sock = socket.create_connection((pod.ip, 8080), timeout=10)
                    reader = sock.makefile("rb")
                sock.sendall(
                    b"GET /load HTTP/1.1\r\nHost: pod\r\nx-user: alice\r\n"
                    + (b"" if keep_alive else b"Connection: close\r\n")
                    + b"\r\n"
                )
                status = reader.readline()
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                code, answer = status.split(b" ", 2)[1], reader.read(length)
                got = code + b" " + (answer.split(b" ")[0] if code == b"200" else answer)
                if code != b"200":
                    keep_alive = False  # mirrord's 502 says `connection: close`
            except OSError as exc:
                got = f"error {exc!r}".encode()
                keep_alive = False
            with lock:
                answers.append((time.monotonic() - t0, got))
            if not keep_alive and sock is not None:
                reader.close()
                sock.close()
                sock = None
        if sock is not None:
            reader.close()
            sock.close()

    threads = [threading.Thread(target=client, args=(n % 2 == 0,)) for n in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.2)
    # Ctrl-C: in a terminal the app gets SIGINT once (mirrord run sees it comes from the
    # terminal and does not forward it); here mirrord run gets it and forwards it once.
    os.kill(app.pid, signal.SIGINT)
    app.communicate(timeout=30)
    stopped = time.monotonic() - t0
    time.sleep(2.5)
    done.set()
    for t in threads:
        t.join(timeout=30)
    assert {a for _, a in answers} <= {b"200 alice-app", b"200 pod"}, sorted(
        {a for _, a in answers if a not in (b"200 alice-app", b"200 pod")}
    )
    assert any(a == b"200 alice-app" for _, a in answers)
    # within a few seconds of the session's end only the pod answers
    assert all(a == b"200 pod" for t, a in answers if t > stopped + 2.0)
    assert any(t > stopped + 2.0 for t, _ in answers)
    wait_for(lambda: our_rules(pod) == [], 10, "the steal rules to be removed")
    # the session's app is gone; only the daemon and its (lingering) agent remain (the
    # agent's last firewall commands may still be finishing: bounded wait)
    daemon = mirrord.daemon_pid()

    def left() -> list[bytes]:
        return [
            _cmdline(pid)
            for pid in processes_with_env("MIRRORD_RUNTIME_DIR", str(mirrord.runtime))
            if pid != daemon and b"mirrord.agent" not in _cmdline(pid)
        ]

    try:
        wait_for(lambda: left() == [], 10, "the session's processes to exit")
    except AssertionError:
        raise AssertionError(left()) from None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b"mirrord.agent"  # gone meanwhile: not left over


def test_http10_and_half_closed_requests_on_a_filtered_port_get_what_they_get_without_mirrord(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    """HTTP/1.0 requests (curl -0, load balancers' health checks, old clients) on a filtered
    port got an empty reply, matched or not; a request whose body the client cut short with
    a half-close hung both ends."""
    cut_short = b"POST /cut HTTP/1.1\r\nHost: pod\r\nContent-Length: 10\r\n\r\n12345"
    old_style = b"GET /old HTTP/1.0\r\n\r\n"
    without = {req: http(pod, req, half_close=True) for req in (cut_short, old_style)}
    assert body(without[cut_short]) == b"pod POST /cut\n12345"
    app = start_app(
        mirrord,
        pod,
        "alice-app",
        "-f",
        config(tmp_path, "alice", {"mode": "steal", "http_filter": ALICE}),
    )
    for req, answer in without.items():
        assert body(http(pod, req, half_close=True)) == body(answer), req
    assert body(http(pod, old_style)) == b"pod GET /old\n"
    matched = http(pod, b"GET /mine HTTP/1.0\r\nx-user: alice\r\n\r\n")
    assert matched.split(b"\r\n")[0].endswith(b" 200 OK"), matched
    assert body(matched) == b"alice-app GET /mine x-user=alice\n"
    # the user app sees the cut-short request end (its server gives up on it): an answer
    # comes at once, not after the client's timeout
    start = time.monotonic()
    http(pod, cut_short.replace(b"Host: pod", b"Host: pod\r\nx-user: alice"), half_close=True)
    assert time.monotonic() - start < 5
    stop_app(app)
    wait_for(lambda: our_rules(pod) == [], 10, "the steal rules to be removed")


# A user app that prints how much of each request body it received.
UPLOAD_APP = """
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        want, got = int(self.headers["Content-Length"]), 0
        try:
            while got < want and (chunk := self.rfile.read(min(65536, want - got))):
                got += len(chunk)
        finally:
            os.write(1, f"seen {self.path} {got}\\n".encode())
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
srv = http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H)
srv.daemon_threads = True
print(8080, flush=True)
srv.serve_forever()
"""


def post(pod: LocalPod, path: str, size: int) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: pod\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    )
    return http(pod, head.encode() + os.urandom(size))


def test_mirrored_uploads_of_10_mb_all_reach_the_app_and_a_dropped_one_is_said(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    """A 10 MB upload arrives at the pod faster than the agent relays it to the user app: one
    in three was dropped (the agent kept 8 MiB per mirrored flow) with nothing said but a
    line in the agent's log. Now they all arrive; a flow dropped because the user app does
    not read (stopped in a debugger, here SIGSTOP) is a warning in `mirrord run`."""
    script = tmp_path / "upload.py"
    script.write_text(UPLOAD_APP)
    app = start_app(mirrord, pod, "upload-app", script=str(script))
    time.sleep(0.5)  # the mirror's subscription follows listen() asynchronously
    for i in range(3):
        assert body(post(pod, f"/up{i}", 10 * 1024 * 1024)).startswith(b"pod POST /up")
    (user_app,) = Path(f"/proc/{app.pid}/task/{app.pid}/children").read_text().split()
    os.kill(int(user_app), signal.SIGSTOP)
    try:
        assert body(post(pod, "/stuck", 40 * 1024 * 1024)).startswith(b"pod POST /stuck")
        wait_for(
            lambda: any(
                "mirrored connection" in w
                for s in mirrord.status()["sessions"]
                for w in s["warnings"]
            ),
            15,
            "the dropped-flow warning",
        )
    finally:
        os.kill(int(user_app), signal.SIGCONT)
    time.sleep(0.5)
    out, err = stop_app(app)
    seen = [line for line in out.splitlines() if line.startswith("seen /up")]
    assert sorted(seen) == [f"seen /up{i} {10 * 1024 * 1024}" for i in range(3)], out
    assert "port 8080: a mirrored connection from" in err and "was dropped" in err, err
