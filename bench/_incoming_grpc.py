"""gRPC figure: unary call latency through a filtered steal vs the pod's app directly.

The pod's app is the grpcio test server (`tests/incoming/_grpc_app.py`) started inside the
pod; the load is one grpcio channel from this machine making unary `/mirrord.Echo/Say` calls
one after another (closed loop). `mirrord run` steals the port with a metadata filter
(`x-user: bench`): calls without it go through the agent's HTTP/2 router to the pod's app
(the figure: what the steal adds to the pod's own traffic), calls with it reach the user app
(the same server, run under mirrord on this machine; reported beside). The baseline is the
same calls straight to the pod's app, before the steal, in the same run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench._core import NotAvailable, Result
from bench._env import BenchEnv
from bench._incoming import _require_incoming

__all__ = ["steal_grpc_latency"]

GRPC_APP = Path(__file__).resolve().parents[1] / "tests" / "incoming" / "_grpc_app.py"
PORT = 8098


def _calls(target: str, seconds: float, user: str | None) -> list[float]:
    """Latencies (s) of unary calls one after another for `seconds` (at least 20)."""
    import grpc

    metadata = [("x-user", user)] if user is not None else None
    latencies: list[float] = []
    with grpc.insecure_channel(target) as channel:
        say = channel.unary_unary("/mirrord.Echo/Say")
        say(b"warm", metadata=metadata, timeout=20)  # the connection is made
        stop = time.monotonic() + seconds
        while len(latencies) < 20 or time.monotonic() < stop:
            start = time.perf_counter()
            say(b"x", metadata=metadata, timeout=20)
            latencies.append(time.perf_counter() - start)
    return latencies


def _answer(target: str, user: str) -> bytes:
    import grpc

    with grpc.insecure_channel(target) as channel:
        answer: bytes = channel.unary_unary("/mirrord.Echo/Say")(
            b"probe", metadata=[("x-user", user)], timeout=20
        )
        return answer


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def _start_user_app(env: BenchEnv) -> subprocess.Popen[bytes]:
    config = env.tmp / "grpc-filter.json"
    http_filter = {"header_filter": "^x-user: bench$", "ports": [PORT]}
    incoming = {"mode": "steal", "http_filter": http_filter}
    config.write_text(json.dumps({"feature": {"network": {"incoming": incoming}}}))
    argv = [sys.executable, str(GRPC_APP), "user", "0.0.0.0", str(PORT)]
    app = subprocess.Popen(
        env.run_argv(argv, "-f", str(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env.env(),
    )
    assert app.stdout is not None
    if not app.stdout.readline().strip():
        app.kill()
        app.wait(10)
        raise RuntimeError("the gRPC user app did not start under mirrord run")
    return app


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _through_steal(env: BenchEnv, target: str, seconds: float) -> tuple[list[float], list[float]]:
    """(unmatched calls' latencies, matched calls' latencies) under a filtered steal."""
    app = _start_user_app(env)
    try:
        deadline = time.monotonic() + 30  # the subscription follows listen()
        while not _answer(target, "bench").startswith(b"user "):
            if time.monotonic() > deadline:
                raise RuntimeError("the filter never stole a matching call")
            time.sleep(0.1)
        return _calls(target, seconds, None), _calls(target, seconds / 2, "bench")
    finally:
        _stop(app)


def steal_grpc_latency(env: BenchEnv) -> Result:
    _require_incoming(env)
    try:
        import grpc
    except ImportError:
        raise NotAvailable("grpcio is not installed (the `test` extra)") from None
    if not GRPC_APP.is_file():
        raise NotAvailable(f"the gRPC test app is missing ({GRPC_APP})")
    pod = env.pod
    site = os.path.dirname(os.path.dirname(grpc.__file__))
    python = os.path.realpath(sys.executable)
    server = pod.popen_in_pod(
        [python, str(GRPC_APP), "pod", "0.0.0.0", str(PORT)], env={**pod.env, "PYTHONPATH": site}
    )
    target = f"{pod.ip}:{PORT}"
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != str(PORT).encode():
            raise RuntimeError("the pod's gRPC app did not start")
        seconds = 3.0 if env.quick else 8.0
        _calls(target, 0.5, None)  # warm-up
        direct = _calls(target, seconds, None)
        unmatched, matched = _through_steal(env, target, seconds)
    finally:
        server.kill()
        server.wait(10)
    p50, p99, d50, d99 = (
        _pct(unmatched, 50),
        _pct(unmatched, 99),
        _pct(direct, 50),
        _pct(direct, 99),
    )
    m50, m99 = _pct(matched, 50), _pct(matched, 99)
    note = (
        f"unary, unmatched calls to the pod's app: added p50 {1e6 * (p50 - d50):.0f} µs, "
        f"p99 {1e6 * (p99 - d99):.0f} µs; matched calls to the user app: p50 "
        f"{1e6 * m50:.0f} µs, p99 {1e6 * m99:.0f} µs"
    )
    extra = {"p50": p50, "p99": p99, "direct_p50": d50, "direct_p99": d99}
    extra |= {"user_app_p50": m50, "user_app_p99": m99}
    return Result(p50, d50, "s (p50)", note=note, extra=extra)
