"""HTTP/2 figure: filtered h2c requests/s through a filtered steal vs the pod's app directly.

The pod's app is the h2c test server (`tests/incoming/_h2_app.py`, the h2 library) started
inside the pod; the load is `conns` h2 connections from this machine, each sending requests
one after another (closed loop) with no `x-user` header. `mirrord run` steals the port with a
header filter (`x-user: bench`) that these requests do not match: each goes through the
agent's HTTP/2 router to the pod's app, as the pod's own traffic does while a developer
filters theirs. The baseline is the same load straight to the pod's app, before the steal.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events

from bench._core import NotAvailable, Result
from bench._env import BenchEnv
from bench._incoming import _require_incoming

__all__ = ["steal_h2_rps"]

H2_APP = Path(__file__).resolve().parents[1] / "tests" / "incoming" / "_h2_app.py"
PORT = 8097
CONNS = 8


def _h2_client_loop(
    host: str, port: int, seconds: float, user: str | None = None
) -> tuple[int, bytes]:
    """Requests one after another on one h2c connection for `seconds` (at least one): how
    many, and the body of the last."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        stop = time.monotonic() + seconds
        done = 0
        headers = [(":method", "GET"), (":path", "/b"), (":scheme", "http"), (":authority", "p")]
        if user is not None:
            headers.append(("x-user", user))
        body = bytearray()
        while done == 0 or time.monotonic() < stop:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers, end_stream=True)
            sock.sendall(conn.data_to_send())
            body.clear()
            ended = False
            while not ended:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("the server closed the connection")
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived):
                        body += ev.data or b""
                        conn.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                        ended = True
                    elif isinstance(ev, h2.events.StreamReset):
                        raise ConnectionError(f"stream reset: {ev.error_code!r}")
                pending = conn.data_to_send()
                if pending:
                    sock.sendall(pending)
            done += 1
        return done, bytes(body)


def _load(host: str, port: int, seconds: float) -> float:
    counts: list[int] = []
    errors: list[str] = []

    def worker() -> None:
        try:
            counts.append(_h2_client_loop(host, port, seconds)[0])
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(CONNS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    elapsed = time.monotonic() - start
    if errors:
        raise RuntimeError(f"h2 load generator failed: {errors[0]}")
    return sum(counts) / elapsed


def _stolen(host: str) -> bool:
    return _h2_client_loop(host, PORT, 0, "bench")[1].startswith(b"user ")


def steal_h2_rps(env: BenchEnv) -> Result:
    _require_incoming(env)
    if not H2_APP.is_file():
        raise NotAvailable(f"the h2c test app is missing ({H2_APP})")
    pod = env.pod
    site = os.path.dirname(os.path.dirname(h2.__file__))
    python = os.path.realpath(sys.executable)
    server = pod.popen_in_pod(
        [python, str(H2_APP), "pod", "0.0.0.0", str(PORT)], env={**pod.env, "PYTHONPATH": site}
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != str(PORT).encode():
            raise RuntimeError("the pod's h2c app did not start")
        seconds = 3.0 if env.quick else 8.0
        _load(pod.ip, PORT, 0.5)  # warm-up
        direct = _load(pod.ip, PORT, seconds)
        config = env.tmp / "h2-filter.json"
        http_filter = {"header_filter": "^x-user: bench$", "ports": [PORT]}
        incoming = {"mode": "steal", "http_filter": http_filter}
        config.write_text(json.dumps({"feature": {"network": {"incoming": incoming}}}))
        argv = [sys.executable, str(H2_APP), "user", "0.0.0.0", str(PORT)]
        app = subprocess.Popen(
            env.run_argv(argv, "-f", str(config)),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env.env(),
        )
        try:
            assert app.stdout is not None
            if not app.stdout.readline().strip():
                raise RuntimeError("the user app did not start under mirrord run")
            deadline = time.monotonic() + 30  # the subscription follows listen()
            while not _stolen(pod.ip):
                if time.monotonic() > deadline:
                    raise RuntimeError("the filter never stole a matching request")
                time.sleep(0.1)
            _load(pod.ip, PORT, 0.5)
            filtered = _load(pod.ip, PORT, seconds)
        finally:
            app.terminate()
            try:
                app.wait(10)
            except subprocess.TimeoutExpired:
                app.kill()
                app.wait(10)
    finally:
        server.kill()
        server.wait(10)
    return Result(
        filtered, direct, "req/s", note=f"{CONNS} h2c connections, requests the filter leaves"
    )
