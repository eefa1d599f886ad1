"""Relays belong to their session: another local user cannot ride a session's outgoing
connections.

A root session makes outgoing TCP connections to a pod-only service (which greets every client
with a secret) and sends UDP datagrams (a connected socket and a `sendto()` one) to a pod-only
UDP service, while another local user (uid 65534, `nobody`) is told every TCP listener and UDP
socket the session's daemon holds on this machine, the instant it appears, and connects to
each one and sends datagrams into each one. The daemon used to relay through a loopback
listener that accepted whoever connected first, and through UDP sockets that forwarded any
sender's datagrams into the pod; now the other user must get nothing of the pod's traffic and
none of its datagrams may reach the pod."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mirrord.localpod import LocalPod, PodSpec
from tests._other_user import OTHER_UID, python_for_the_other_user
from tests.cli.conftest import Mirrord, python_app

pytestmark = pytest.mark.netns

ROUNDS = 12
PER_ROUND = 10

SECRET_SERVER = """
import socket
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 7474))
l.listen(128)
l.settimeout(60)
print("ready", flush=True)
for n in range(1, 1000):
    c, _ = l.accept()
    c.sendall(b"pod-secret %d\\n" % n)
    c.close()
"""

UDP_SINK = """
import json, socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9494))
s.settimeout(1)
print("ready", flush=True)
seen = []
deadline = time.monotonic() + 60
while time.monotonic() < deadline and b"STOP" not in seen:
    try:
        seen.append(s.recvfrom(100)[0])
    except TimeoutError:
        pass
print(json.dumps(sorted({d.decode(errors="replace") for d in seen})), flush=True)
"""

APP = f"""
import json, socket, threading, time
got = []

def fetch():
    try:
        s = socket.create_connection(("127.0.0.1", 7474), timeout=20)
        got.append(s.makefile("rb").readline().decode().split(" ")[0])
        s.close()
    except OSError as e:
        got.append(type(e).__name__)

c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.connect(("127.0.0.1", 9494))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range({ROUNDS}):
    threads = [threading.Thread(target=fetch) for _ in range({PER_ROUND})]
    for t in threads:
        t.start()
    c.send(b"app-connected")
    u.sendto(b"app-sendto", ("127.0.0.1", 9494))
    for t in threads:
        t.join()
    time.sleep(0.1)
time.sleep(0.5)  # the other user's datagrams of the last round are on their way
c.send(b"STOP")
print(json.dumps(sorted(set(got))), len(got), flush=True)
"""

# Run as the other user: connects to each TCP port and sends into each UDP port it is told of.
OTHER_USER = """
import json, os, socket, sys, threading, time
assert os.getuid() != 0
lock = threading.Lock()
report = {"connected": 0, "read": [], "datagrams": 0}

def grab(family, port):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
        with lock:
            report["connected"] += 1
        data = s.recv(4096)
    except OSError:
        return
    finally:
        s.close()
    with lock:
        report["read"].append(data.decode(errors="replace"))

threads = []
for line in sys.stdin:
    kind, six, port = line.split()
    family = socket.AF_INET6 if six == "6" else socket.AF_INET
    if kind == "tcp":
        threads.append(threading.Thread(target=grab, args=(family, int(port))))
        threads[-1].start()
        continue
    u = socket.socket(family, socket.SOCK_DGRAM)
    for _ in range(3):
        try:
            u.sendto(b"INJECT", ("::1" if six == "6" else "127.0.0.1", int(port)))
            report["datagrams"] += 1
        except OSError:
            pass
    u.close()
for t in threads:
    t.join(timeout=5)
print(json.dumps(report), flush=True)
"""


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
    return inodes


def _endpoints(inodes: set[str]) -> set[tuple[str, str, int]]:
    """(tcp|udp, 4|6, port) of the listening TCP and all UDP sockets among `inodes`."""
    found = set()
    for kind, six in (("tcp", "4"), ("tcp", "6"), ("udp", "4"), ("udp", "6")):
        path = f"/proc/net/{kind}{'6' if six == '6' else ''}"
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[9] not in inodes:
                continue
            if kind == "tcp" and fields[3] != "0A":  # LISTEN
                continue
            found.add((kind, six, int(fields[1].rsplit(":", 1)[1], 16)))
    return found


def _tell_the_other_user(
    mirrord: Mirrord, other: subprocess.Popen[str], stop: threading.Event, told: list[str]
) -> None:
    """Every listener and UDP socket of the session's daemon, as soon as it appears."""
    assert other.stdin is not None
    seen: set[tuple[str, str, int]] = set()
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        pid = mirrord.daemon_pid()
        if pid is not None:
            for endpoint in _endpoints(_socket_inodes(pid)) - seen:
                seen.add(endpoint)
                told.append(endpoint[0])
                try:
                    other.stdin.write(" ".join(map(str, endpoint)) + "\n")
                    other.stdin.flush()
                except OSError:
                    return
        time.sleep(0.001)


def test_another_user_cannot_ride_a_sessions_relays(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(PodSpec(echo_port=None, http_port=None))
    servers = [pod.popen_in_pod([sys.executable, "-c", src]) for src in (SECRET_SERVER, UDP_SINK)]
    other = subprocess.Popen(
        [python_for_the_other_user(), "-c", OTHER_USER],
        user=OTHER_UID,
        group=OTHER_UID,
        extra_groups=[],
        cwd="/",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stop = threading.Event()
    told: list[str] = []
    scanner = threading.Thread(target=_tell_the_other_user, args=(mirrord, other, stop, told))
    try:
        for server in servers:
            assert server.stdout is not None
            assert server.stdout.readline() == b"ready\n"
        scanner.start()
        result = mirrord.run(
            "run", "-t", f"pid/{pod.pid}", "--", *python_app(tmp_path, APP), timeout=120
        )
        stop.set()
        scanner.join(timeout=10)
        report_text, other_err = other.communicate(timeout=30)
        sink_out, _ = servers[1].communicate(timeout=70)
    finally:
        stop.set()
        procs: list[subprocess.Popen[Any]] = [other, *servers]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    report = json.loads(report_text.splitlines()[-1]) if report_text else {}
    assert report, other_err
    arrived = json.loads(sink_out.decode().splitlines()[-1])
    # the other user was shown the daemon's UDP sockets (the checks below are not vacuous)
    assert "udp" in told, told
    # it read nothing of the pod's traffic, and none of its datagrams reached the pod
    assert not [r for r in report["read"] if "pod-secret" in r], report
    assert "INJECT" not in arrived, (arrived, report)
    # the session itself got every greeting, and its datagrams reached the pod
    assert result.stdout == f'["pod-secret"] {ROUNDS * PER_ROUND}\n', result.stderr
    assert "app-connected" in arrived and "app-sendto" in arrived
