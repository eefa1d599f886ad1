"""Incoming traffic end to end: `mirrord run` (CLI, daemon, agent, preloaded layer) with a
real HTTP server as the user app, a local pod as the target, and a client on the pod's host
side talking to the pod's IP."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mirrord.localpod import LocalPod
from tests.cli.conftest import MIRRORD, Mirrord

pytestmark = [pytest.mark.netns, pytest.mark.slow]

APP = str(Path(__file__).with_name("_local_app.py"))


def get(
    pod: LocalPod, method: str, path: str, *, user: str = "", body: bytes | None = None
) -> tuple[bytes, str]:
    conn = http.client.HTTPConnection(pod.ip, 8080, timeout=15)
    try:
        conn.request(method, path, body=body, headers={"x-user": user} if user else {})
        resp = conn.getresponse()
        return resp.read(), resp.getheader("X-Peer") or ""
    finally:
        conn.close()


def our_rules(pod: LocalPod) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", pod.netns, "sh", "-c", "iptables-save; nft list ruleset"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if "MRD_" in line or "mirrord_" in line]


def start_app(
    mirrord: Mirrord, pod: LocalPod, *args: str, log: bool = False, host: str = "0.0.0.0"
) -> object:
    """The user app on `host` (`::`: both families) port 8080 under `mirrord run`."""
    argv = [sys.executable, APP, "local", host, "8080", *(["log"] if log else [])]
    proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", *args, "--", *argv)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "8080", proc.stderr.read() if proc.stderr else line
    return proc


def stop_app(proc: object) -> str:
    assert isinstance(proc, subprocess.Popen)
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return str(out)


def wait_for(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    *,
    transient: tuple[type[BaseException], ...] = (),
) -> None:
    """Until `predicate()` holds (bounded); one that raises one of `transient` has not held
    yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except transient:
            pass
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# A connection stolen between an agent's death and the rules' removal is reset: the pod
# answering again is waited for through such resets.
ENDING = (ConnectionResetError,)


@pytest.mark.parametrize("mirrord_log", ["warn,mirrord=debug", "info", None])
def test_mirrord_log_asking_for_debug_shows_the_daemon_subscribed_port_on_stderr(
    mirrord: Mirrord, pod: LocalPod, mirrord_log: str | None
) -> None:
    """As mirrord's own end-to-end tests wait for it: with `MIRRORD_LOG=warn,mirrord=debug`
    the layer says `daemon subscribed port 8080` on the app's stderr by the time listen()
    returned; with a filter that leaves mirrord's debug out, or none, it says nothing."""
    if mirrord_log is not None:
        mirrord.env["MIRRORD_LOG"] = mirrord_log
    app = start_app(mirrord, pod, "--steal")
    assert get(pod, "GET", "/logged")[0] == b"local GET /logged x-user=\n"
    assert isinstance(app, subprocess.Popen)
    app.terminate()
    _, err = app.communicate(timeout=30)
    subscribed = [line for line in err.splitlines() if "daemon subscribed port 8080" in line]
    if mirrord_log == "warn,mirrord=debug":
        assert len(subscribed) == 1, err
        assert subscribed[0].startswith("mirrord-layer[")
    else:
        assert subscribed == [], err
        assert "mirrord-layer[" not in err


def test_mirrord_run_steal_every_method_then_the_pod_again(mirrord: Mirrord, pod: LocalPod) -> None:
    app = start_app(mirrord, pod, "--steal")
    for method in ("GET", "POST", "PUT", "DELETE"):
        body = method.encode() * 3 if method in ("POST", "PUT") else None
        out, peer = get(pod, method, "/e2e", body=body)
        assert out == f"local {method} /e2e x-user=\n".encode() + (body or b"")
        assert peer == pod.host_ip  # accept()/getpeername() name the real client
    stop_app(app)
    # `mirrord run` exits once the agent ended the steal: the very next request is the pod's
    assert get(pod, "GET", "/after")[0] == b"pod GET /after\n"
    wait_for(lambda: our_rules(pod) == [])


def test_mirrord_run_with_a_header_filter(mirrord: Mirrord, pod: LocalPod, tmp_path: Path) -> None:
    config = tmp_path / "mirrord.json"
    config.write_text(
        json.dumps(
            {
                "feature": {
                    "network": {
                        "incoming": {
                            "mode": "steal",
                            "http_filter": {"header_filter": "^x-user: alice$", "ports": [8080]},
                        }
                    }
                }
            }
        )
    )
    app = start_app(mirrord, pod, "-f", str(config))
    assert get(pod, "GET", "/a", user="alice")[0] == b"local GET /a x-user=alice\n"
    assert get(pod, "GET", "/b", user="bob")[0] == b"pod GET /b\n"
    assert get(pod, "POST", "/c", body=b"x")[0] == b"pod POST /c\nx"
    stop_app(app)
    wait_for(lambda: our_rules(pod) == [])


def test_mirrord_run_mirror_gets_a_copy_while_the_pod_answers(
    mirrord: Mirrord, pod: LocalPod
) -> None:
    app = start_app(mirrord, pod, log=True)
    time.sleep(0.5)  # the subscription follows listen() asynchronously
    for i in range(5):
        assert get(pod, "GET", f"/m{i}")[0] == f"pod GET /m{i}\n".encode()
    time.sleep(1.0)
    out = stop_app(app)
    print(out)
    # separate connections: the app may serve them in any order
    assert sorted(line for line in out.splitlines() if line.startswith("seen")) == [
        f"seen GET /m{i}" for i in range(5)
    ]


def test_two_sessions_share_one_port_with_alice_and_bob_filters(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    apps = []
    for user in ("alice", "bob"):
        config = tmp_path / f"{user}.json"
        http_filter = {"header_filter": f"^x-user: {user}$", "ports": [8080]}
        incoming = {"mode": "steal", "http_filter": http_filter}
        config.write_text(json.dumps({"feature": {"network": {"incoming": incoming}}}))
        argv = [sys.executable, APP, f"{user}-app", "0.0.0.0", "8080"]
        proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", "-f", str(config), "--", *argv)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "8080"
        apps.append(proc)
    for _ in range(3):
        assert get(pod, "GET", "/a", user="alice")[0] == b"alice-app GET /a x-user=alice\n"
        assert get(pod, "GET", "/b", user="bob")[0] == b"bob-app GET /b x-user=bob\n"
        assert get(pod, "GET", "/c", user="carol")[0] == b"pod GET /c\n"
    sessions = mirrord.status()["sessions"]
    assert len(sessions) == 2
    for proc in apps:
        stop_app(proc)
    wait_for(lambda: our_rules(pod) == [])


# The user app of the mirror load test: http.server as people write it, with socketserver's
# default listen backlog of 5 (a deeper queue would hide the resets that once lost requests).
_LOGGING_APP = """
import http.server, os, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        os.write(1, f"seen {self.path}\\n".encode())  # one write: threads do not interleave
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    def get_request(self):
        time.sleep(0.02)  # a busy app (or one under a debugger) accepts slowly
        return super().get_request()
srv = Server(("0.0.0.0", 8080), H)
srv.daemon_threads = True
print(8080, flush=True)
srv.serve_forever()
"""


def _open_loop_client(pod: LocalPod, conn: int, requests: int, interval: float) -> list[bytes]:
    """`requests` GETs on one keep-alive connection, one every `interval` seconds (open loop:
    a late response does not delay the next request's schedule). Returns the answers."""
    answers: list[bytes] = []
    with socket.create_connection((pod.ip, 8080), timeout=15) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        due = time.monotonic()
        for i in range(requests):
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            due += interval
            sock.sendall(f"GET /c{conn}/r{i} HTTP/1.1\r\nHost: pod\r\n\r\n".encode())
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = reader.readline()
                assert line, "the pod's server closed the connection"
                head += line
            length = next(
                int(h.split(b":")[1])
                for h in head.lower().split(b"\r\n")
                if h.startswith(b"content-length:")
            )
            answers.append(reader.read(length))
        reader.close()
    return answers


def test_mirror_1000_requests_on_20_keep_alive_connections_all_seen_in_order(
    mirrord: Mirrord, pod: LocalPod
) -> None:
    """Issue 7's acceptance, through `mirrord run`: 1,000 requests on 20 keep-alive
    connections at ~1,500 req/s (open loop) are all answered by the pod's server, and the user
    app sees every one of them (each request as a connection of its own), with zero kernel
    drops."""
    conns, per_conn, rate = 20, 50, 1500.0
    proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", sys.executable, "-c", _LOGGING_APP)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "8080", proc.stderr.read() if proc.stderr else line
    lines: list[str] = []

    def read_lines() -> None:
        assert proc.stdout is not None
        for text in proc.stdout:  # until the app exits
            if text.startswith("seen "):
                lines.append(text)

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    with concurrent.futures.ThreadPoolExecutor(conns) as pool:
        futures = [
            pool.submit(_open_loop_client, pod, n, per_conn, conns / rate) for n in range(conns)
        ]
        answers = [f.result(timeout=60) for f in futures]
    for n, got in enumerate(answers):  # every request answered by the pod's own server
        assert got == [f"pod GET /c{n}/r{i}\n".encode() for i in range(per_conn)]
    # each request is a connection of its own, and this app accepts one per 20 ms: the last
    # ones arrive ~20 s after the client is done (more on a loaded machine)
    deadline = time.monotonic() + 90
    while len(lines) < conns * per_conn and time.monotonic() < deadline:
        time.sleep(0.1)

    # the agent's sniffer counters (TrafficStats, every 2 s) reached the daemon: zero drops
    def counted() -> dict[str, int]:
        return dict(_agent_link(mirrord).get("traffic", {}).get("8080", {}))

    wait_for(lambda: counted().get("packets", 0) >= conns * per_conn)
    assert counted()["kernel_drops"] == 0
    proc.terminate()
    proc.wait(timeout=30)
    reader.join(timeout=10)
    seen: dict[str, list[int]] = {}
    for text in lines:
        path = text.split()[1]
        assert path.count("/") == 2, lines[:3]
        conn, req = path.strip("/").split("/")
        seen.setdefault(conn, []).append(int(req[1:]))
    assert sorted(seen) == sorted(f"c{n}" for n in range(conns))
    for conn, reqs in seen.items():
        # each request is a mirrored connection of its own (mirror works per HTTP request):
        # the app's threads log them in the order they run, each exactly once
        assert sorted(reqs) == list(range(per_conn)), conn


def test_a_second_session_with_on_concurrent_steal_override_takes_the_port(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    def steal_app(name: str, *flags: str) -> subprocess.Popen[str]:
        argv = [sys.executable, APP, name, "0.0.0.0", "8080"]
        proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", *flags, "--", *argv)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "8080"
        return proc

    first = steal_app("first-app", "--steal")
    assert get(pod, "GET", "/a")[0] == b"first-app GET /a x-user=\n"
    config = tmp_path / "override.json"
    incoming = {"mode": "steal", "on_concurrent_steal": "override"}
    config.write_text(json.dumps({"feature": {"network": {"incoming": incoming}}}))
    second = steal_app("second-app", "-f", str(config))
    assert get(pod, "GET", "/b")[0] == b"second-app GET /b x-user=\n"
    warnings = [w for s in mirrord.status()["sessions"] for w in s["warnings"]]
    assert any("took the steal over" in w for w in warnings), warnings
    stop_app(second)
    stop_app(first)
    wait_for(lambda: our_rules(pod) == [])


def test_with_a_filter_only_its_ports_are_stolen_unless_incoming_ports_lists_them(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    http_filter = {"header_filter": "^x-user: alice$", "ports": [9999]}
    config = tmp_path / "filter-elsewhere.json"
    incoming: dict[str, object] = {"mode": "steal", "http_filter": http_filter}
    config.write_text(json.dumps({"feature": {"network": {"incoming": incoming}}}))
    app = start_app(mirrord, pod, "-f", str(config))
    # 8080 is not a filtered port: not stolen at all, even Alice's request stays with the pod
    assert get(pod, "GET", "/a", user="alice")[0] == b"pod GET /a\n"
    warnings = [w for s in mirrord.status()["sessions"] for w in s["warnings"]]
    assert any(w.startswith("port 8080: not stolen") for w in warnings), warnings
    stop_app(app)
    assert our_rules(pod) == []
    # listed in incoming.ports: stolen whole
    incoming["ports"] = [8080]
    config.write_text(json.dumps({"feature": {"network": {"incoming": incoming}}}))
    app = start_app(mirrord, pod, "-f", str(config))
    assert get(pod, "GET", "/b", user="bob")[0] == b"local GET /b x-user=bob\n"
    stop_app(app)
    wait_for(lambda: our_rules(pod) == [])


def test_agent_options_of_the_config_reach_the_agent(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"agent": {"nftables": True, "clean_iptables_on_start": True}}))
    app = start_app(mirrord, pod, "--steal", "-f", str(config))
    assert get(pod, "GET", "/n")[0] == b"local GET /n x-user=\n"
    # agent.nftables: true -> the steal rules are an nft table, no iptables chain
    rules = our_rules(pod)
    assert any(line.startswith("table ip mirrord_") for line in rules), rules
    assert not any("MRD_" in line for line in rules), rules
    (agent,) = mirrord.status()["agents"]
    environ = Path(f"/proc/{agent['pid']}/environ").read_bytes().split(b"\0")
    assert b"MIRRORD_AGENT_NFTABLES=true" in environ
    assert b"MIRRORD_AGENT_CLEAN_IPTABLES_ON_START=true" in environ
    stop_app(app)
    wait_for(lambda: our_rules(pod) == [])


def _agent_link(mirrord: Mirrord) -> dict[str, Any]:
    agents = mirrord.status()["agents"]
    return dict(agents[0]["link"] or {}) if agents else {}


def test_kernel_drops_are_shown_in_daemon_status_and_warned_in_mirrord_run(
    mirrord: Mirrord, pod: LocalPod
) -> None:
    # A small sniffer buffer and a stopped agent: the kernel must drop what does not fit.
    mirrord.env["MIRRORD_AGENT_SNIFFER_BUFFER"] = str(64 * 1024)
    app = start_app(mirrord, pod, log=True)
    agent_pid = mirrord.status()["agents"][0]["pid"]
    os.kill(agent_pid, signal.SIGSTOP)
    try:
        body = os.urandom(4 * 1024 * 1024)
        out, _ = get(pod, "POST", "/big", body=body)
        assert out == b"pod POST /big\n" + body  # the pod's own traffic is not affected
    finally:
        os.kill(agent_pid, signal.SIGCONT)
    wait_for(lambda: _agent_link(mirrord).get("kernel_drops", 0) > 0)
    (session,) = mirrord.status()["sessions"]
    assert session["kernel_drops"]["8080"] > 0
    table = subprocess.run(
        [MIRRORD, "daemon", "status"],
        env={**mirrord.env, "COLUMNS": "250"},  # one line per row: nothing wrapped
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert re.search(r"8080 \([1-9][0-9]*\)", table.stdout), table.stdout
    assert isinstance(app, subprocess.Popen)
    app.terminate()
    _, err = app.communicate(timeout=30)
    assert "mirrord: warning: port 8080: the agent's sniffer lost" in err, err


HOLDER = """
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9990))
s.listen(4)
print("ready", flush=True)
held = [s.accept()[0]]  # never closed: a peer that keeps its side open
time.sleep(60)
"""

STEALING_HOLDER_APP = """
import os, socket, sys
held = socket.create_connection((sys.argv[1], 9990), timeout=10)
held.sendall(b"hello")
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080))
srv.listen(8)
print("8080", flush=True)
sys.stdin.readline()
os._exit(0)
"""


def test_stealing_stops_at_once_when_the_app_exits_with_a_connection_still_open(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    """An exited process's outgoing connections are given time to pass on what the app wrote
    (at most `STREAM_CLOSE_MAX`, 5 s, when the pod's peer keeps its side open), but its
    ports are released first: the pod answers again, and the rules are gone, well before."""
    holder = pod.popen_in_pod([sys.executable, "-c", HOLDER])
    app = None
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
        config = tmp_path / "mirrord.json"
        outgoing = {"handover": False}  # relayed, as for a cluster target
        config.write_text(json.dumps({"feature": {"network": {"outgoing": outgoing}}}))
        app = mirrord.popen(
            "run", "-t", f"pid/{pod.pid}", "--steal", "-f", str(config), "--",
            sys.executable, "-c", STEALING_HOLDER_APP, pod.ip,
            stdin=subprocess.PIPE,
        )  # fmt: skip
        assert app.stdout is not None and app.stdin is not None
        assert app.stdout.readline().strip() == "8080", app.stderr.read() if app.stderr else ""
        wait_for(lambda: our_rules(pod) != [])
        app.stdin.write("exit\n")
        app.stdin.flush()
        assert app.wait(timeout=30) == 0
        exited = time.monotonic()
        wait_for(lambda: our_rules(pod) == [], timeout=10)
        wait_for(lambda: get(pod, "GET", "/again")[0] == b"pod GET /again\n", timeout=10)
        assert time.monotonic() - exited < 3.0  # not after the 5 s the connection may take
    finally:
        if app is not None:
            app.kill()
            app.wait(timeout=10)
        holder.kill()
        holder.wait(timeout=10)


ANSWER_THEN_EXIT_APP = """
import os, socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080))
srv.listen(8)
print("8080", flush=True)
conn, _ = srv.accept()
data = b""
while b"\\r\\n\\r\\n" not in data:
    data += conn.recv(65536)
body = bytes(range(256)) * (6 * 4096)  # 6 MiB: more than the daemon reads under one window
conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
os._exit(0)  # at once: nothing closed by the app, the kernel closes its sockets
"""


def test_an_answer_written_just_before_the_app_exits_reaches_the_stolen_connections_client(
    mirrord: Mirrord, pod: LocalPod, tmp_path: Path
) -> None:
    """The daemon passes on what an exited process wrote to a stolen connection before it
    closes the process's channel, as for its outgoing connections (closing at once reset the
    connection and cut the answer short)."""
    app = mirrord.popen(
        "run", "-t", f"pid/{pod.pid}", "--steal", "--", sys.executable, "-c", ANSWER_THEN_EXIT_APP
    )  # fmt: skip
    try:
        assert app.stdout is not None
        assert app.stdout.readline().strip() == "8080", app.stderr.read() if app.stderr else ""
        wait_for(lambda: our_rules(pod) != [])
        with socket.create_connection((pod.ip, 8080), timeout=20) as client:
            client.sendall(b"GET /big HTTP/1.1\r\nHost: pod\r\n\r\n")
            received = bytearray()
            while chunk := client.recv(1 << 20):  # until the end (a reset raises)
                received += chunk
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK"), head[:200]
        assert len(body) == 6 * 1024 * 1024
        assert body == bytes(range(256)) * (6 * 4096)
        assert app.wait(timeout=30) == 0
    finally:
        app.kill()
        app.wait(timeout=10)
