"""The figures of the benchmark suite (issue: every figure beside its direct baseline)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench._core import Figure, NotAvailable, Result, median_of, timed
from bench._env import BULK_FILE, SMALL_FILE, BenchEnv

__all__ = ["figures"]

PY = sys.executable


def _runs(env: BenchEnv, full: int, quick: int) -> int:
    return quick if env.quick else full


# ---------------------------------------------------------------- startup


def startup_warm(env: BenchEnv) -> Result:
    env.require_run()
    env.run(["true"])  # warm: daemon and agent running
    n = _runs(env, 15, 5)
    warm = median_of(lambda: timed(lambda: env.run(["true"])), n)
    # Waited for as `env.run` waits (pipes read to their end by `communicate`): a bare
    # `wait(timeout)` polls with sleeps of 0.5, 1, 2, 4, 8 ms, which made a 10 ms start read
    # as 16 ms.
    base = median_of(
        lambda: timed(
            lambda: subprocess.run(
                [PY, "-c", "pass"], capture_output=True, text=True, check=True, timeout=60
            )
        ),
        n,
    )
    env.startup_warm = warm  # type: ignore[attr-defined]
    return Result(warm, base, "s")


def startup_cold(env: BenchEnv) -> Result:
    env.require_run()
    warm = getattr(env, "startup_warm", None)
    if warm is None:
        startup_warm(env)
        warm = env.startup_warm  # type: ignore[attr-defined]
    samples = []
    for _ in range(_runs(env, 3, 2)):
        env.stop_daemon()
        time.sleep(0.5)  # let the agent linger out of the picture
        samples.append(timed(lambda: env.run(["true"])))
    return Result(statistics.median(samples), warm, "s", note="baseline: startup_warm")


# ---------------------------------------------------------------- files


_FILE_SMALL = textwrap.dedent(
    """
    import os, sys, time
    n = int(sys.argv[1]); path = sys.argv[2]
    for _ in range(20):
        fd = os.open(path, os.O_RDONLY); os.read(fd, 4096); os.close(fd)
    t = time.perf_counter()
    for _ in range(n):
        fd = os.open(path, os.O_RDONLY)
        assert len(os.read(fd, 4096)) == 4096
        os.close(fd)
    print((time.perf_counter() - t) / n)
    """
)


def _pingpong_rtt(n: int) -> float:
    a, b = socket.socketpair()

    def echo() -> None:
        for _ in range(n):
            b.sendall(b.recv(64))

    t = threading.Thread(target=echo)
    t.start()
    start = time.perf_counter()
    for _ in range(n):
        a.sendall(b"x" * 32)
        a.recv(64)
    elapsed = time.perf_counter() - start
    t.join()
    a.close()
    b.close()
    return elapsed / n


def file_small(env: BenchEnv, port_forward: bool = False) -> Result:
    env.require_run()
    n = _runs(env, 2000, 300)
    argv = [PY, "-c", _FILE_SMALL, str(n), SMALL_FILE]
    per_op = median_of(
        lambda: float(env.run(argv, port_forward=port_forward).stdout.split()[-1]),
        _runs(env, 5, 3),
        warmup=0,
    )
    base = median_of(lambda: _pingpong_rtt(n), 5)
    return Result(per_op, base, "s/op", note="baseline: one unix-socket round trip in Python")


_FILE_READS = textwrap.dedent(
    """
    import os, sys, time
    n = int(sys.argv[1]); path = sys.argv[2]
    fd = os.open(path, os.O_RDONLY)
    for _ in range(200):
        os.pread(fd, 4096, 0)
    t = time.perf_counter()
    for _ in range(n):
        assert len(os.pread(fd, 4096, 0)) == 4096
    per_read = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(100):
        os.close(os.open(path, os.O_RDONLY))
    print((time.perf_counter() - t) / 100, per_read)
    """
)


def file_small_handover(env: BenchEnv) -> Result:
    """4 KiB reads of a remote file handed over (a local target): the kernel's own reads of
    the pod's file, beside the same reads through /proc/P/root. The open still costs one
    agent round trip: the note shows it (open+close per op, mirrord vs direct)."""
    env.require_run()
    n = str(_runs(env, 20000, 3000))
    direct_path = f"/proc/{env.pod.pid}/root{SMALL_FILE}"
    runs = _runs(env, 5, 3)
    via = [
        [float(x) for x in env.run([PY, "-c", _FILE_READS, n, SMALL_FILE], handover=True)
         .stdout.split()[-2:]]
        for _ in range(runs)
    ]  # fmt: skip
    direct = [
        [float(x) for x in subprocess.run(
            [PY, "-c", _FILE_READS, n, direct_path], capture_output=True, text=True, check=True
        ).stdout.split()[-2:]]
        for _ in range(runs)
    ]  # fmt: skip
    read, base = statistics.median(v[1] for v in via), statistics.median(d[1] for d in direct)
    opened = statistics.median(v[0] for v in via)
    direct_open = statistics.median(d[0] for d in direct)
    note = f"open+close {1e6 * opened:.0f} µs (direct {1e6 * direct_open:.1f} µs)"
    return Result(read, base, "s/read", note=note)


_FILE_BULK = textwrap.dedent(
    """
    import sys, time
    t = time.perf_counter(); total = 0
    with open(sys.argv[1], "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
    print(total / (time.perf_counter() - t))
    """
)


def file_bulk(env: BenchEnv, port_forward: bool = False, handover: bool = False) -> Result:
    env.require_run()
    direct_path = f"/proc/{env.pod.pid}/root{BULK_FILE}"
    runs = _runs(env, 3, 2)
    argv = [PY, "-c", _FILE_BULK, BULK_FILE]
    thr = median_of(
        lambda: float(
            env.run(argv, port_forward=port_forward, handover=handover).stdout.split()[-1]
        ),
        runs,
        0,
    )
    base = median_of(
        lambda: float(
            subprocess.run(
                [PY, "-c", _FILE_BULK, direct_path], capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        ),
        runs,
    )
    return Result(thr / 1e6, base / 1e6, "MB/s")


_FILE_WRITE_SMALL = textwrap.dedent(
    """
    import os, sys, time
    n = int(sys.argv[1]); path = sys.argv[2]; block = b"w" * 4096
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    for _ in range(n):
        os.write(fd, block)
    os.close(fd)
    print(n * 4096 / (time.perf_counter() - t))
    """
)

# bigger than the layer's fetch limit (8 MiB): the remote file is handle-backed, as a large
# file updated in place is (a smaller one is written into a memfd cache and written back whole)
_WRITE_FILE_SIZE = 16 * 1024 * 1024


def file_write_small(env: BenchEnv) -> Result:
    """4 KiB writes (open, n writes, close: what was written is on the target when close
    returns) into an existing remote file, beside the same writes into the same kind of file
    in the pod's file system written directly through /proc/P/root."""
    env.require_run()
    root = Path(f"/proc/{env.pod.pid}/root")
    remote, direct = "/data/write-remote.bin", root / "data/write-direct.bin"
    for path in (root / remote.lstrip("/"), direct):
        with open(path, "wb") as f:
            f.truncate(_WRITE_FILE_SIZE)
    n = _runs(env, 2048, 512)
    runs = _runs(env, 5, 3)
    argv = [PY, "-c", _FILE_WRITE_SMALL, str(n), remote]
    thr = median_of(lambda: float(env.run(argv, "--fs-mode", "write").stdout.split()[-1]), runs)
    base = median_of(
        lambda: float(
            subprocess.run(
                [PY, "-c", _FILE_WRITE_SMALL, str(n), str(direct)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[-1]
        ),
        runs,
    )
    written = (root / remote.lstrip("/")).read_bytes()[: n * 4096]
    if written != b"w" * (n * 4096):
        raise RuntimeError("the remote file does not hold what was written")
    return Result(thr / 1e6, base / 1e6, "MB/s", note=f"{n} writes of 4 KiB, close included")


# ---------------------------------------------------------------- layer bypass

_BYPASS_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) return 1;
        close(fd);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.9f\n", ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9) / n);
    return 0;
}
"""


def layer_bypass(env: BenchEnv) -> Result:
    env.require_run()
    src = env.tmp / "bypass.c"
    exe = env.tmp / "bypass"
    src.write_text(_BYPASS_C)
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True, timeout=120)
    local = env.tmp / "local-file"
    local.write_bytes(b"x")
    n = str(_runs(env, 100_000, 60_000))
    pairs = _runs(env, 41, 31)
    # A few % is what is measured, and this shared VM's noise is of the same size. So: both
    # loops pinned to the same core (migrations cost more than the effect), run as many short
    # pairs back to back in one session (a load change hits both halves of a pair alike; each
    # half goes first in every other pair), and the ratio is the median of the pairs' ratios,
    # not the ratio of two medians taken at different times.
    pin = ["taskset", "-c", str((os.cpu_count() or 1) - 1)]
    if shutil.which("taskset") is None:
        pin = []
    loop = [*pin, str(exe), n, str(local)]

    def once(environ: dict[str, str] | None) -> float:
        out = subprocess.run(loop, capture_output=True, text=True, check=True, env=environ)
        return float(out.stdout.split()[-1])

    under, plain, ratios = [], [], []
    with env.session_env() as session:
        for i in range(pairs):
            if i % 2:
                p = once(None)
                u = once(session)
            else:
                u = once(session)
                p = once(None)
            under.append(u)
            plain.append(p)
            ratios.append(u / p)
    note = f"median of {pairs} paired ratios" + (", pinned to one core" if pin else "")
    return Result(
        statistics.median(under),
        statistics.median(plain),
        "s/op",
        note=note,
        ratio=statistics.median(ratios),
    )


# ---------------------------------------------------------------- system-call supervisor

_OPEN_LOOP_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    long want = atol(argv[3]);
    char buf[4096];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) return 1;
        if (want > 0 && read(fd, buf, sizeof buf) != want) return 2;
        close(fd);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.9f\n", ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9) / n);
    return 0;
}
"""


def _open_loop(env: BenchEnv, static: bool) -> Path:
    src = env.tmp / "open_loop.c"
    exe = env.tmp / ("open_loop_static" if static else "open_loop")
    if not exe.exists():
        src.write_text(_OPEN_LOOP_C)
        flags = ["-static"] if static else []
        subprocess.run(["gcc", "-O2", *flags, "-o", str(exe), str(src)], check=True, timeout=120)
    return exe


def _per_op(env: BenchEnv, argv: list[str]) -> float:
    """The loop's own time per operation, run through `mirrord run` (a static program gets the
    supervisor by itself; the start of the session is outside the measured loop)."""
    return float(env.run(argv).stdout.split()[-1])


def _supervised_vs_plain(env: BenchEnv, argv: list[str], note: str) -> Result:
    """A static program's loop run through `mirrord run` (under the supervisor) beside the same
    loop run directly: medians of its own time per operation."""
    runs = _runs(env, 7, 3)
    under = median_of(lambda: _per_op(env, argv), runs, warmup=0)
    plain = median_of(
        lambda: float(subprocess.run(argv, capture_output=True, text=True, check=True).stdout),
        runs,
        warmup=0,
    )
    return Result(under, plain, "s/op", note=f"{note}medians of {runs}")


def syscall_bypass(env: BenchEnv) -> Result:
    """A local open+close of a static program trapped by the supervisor and continued, beside
    the same loop with no filter (issue 17: <= 15 us; the notes measured 10-13 us)."""
    env.require_run()
    exe = _open_loop(env, static=True)
    local = env.tmp / "local-file"
    local.write_bytes(b"x")
    argv = [str(exe), str(_runs(env, 20_000, 5_000)), str(local), "0"]
    return _supervised_vs_plain(env, argv, "")


_UNTRAPPED_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    int fd = open(argv[2], O_RDONLY);
    char c;
    struct timespec a, b;
    if (fd < 0) return 1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        if (pread(fd, &c, 1, 0) != 1) return 1;
        getppid();
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.9f\n", ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9) / n);
    return 0;
}
"""


def syscall_untrapped(env: BenchEnv) -> Result:
    """Calls the supervisor's filter lets through (pread + getppid on a local fd) in a static
    program under the supervisor, beside the same loop with no filter (issue 17: <= 1.5x)."""
    env.require_run()
    src = env.tmp / "untrapped.c"
    exe = env.tmp / "untrapped_static"
    if not exe.exists():
        src.write_text(_UNTRAPPED_C)
        subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(src)], check=True, timeout=120)
    local = env.tmp / "local-file"
    local.write_bytes(b"x")
    argv = [str(exe), str(_runs(env, 500_000, 100_000)), str(local)]
    return _supervised_vs_plain(env, argv, "pread+getppid, ")


def syscall_remote_open(env: BenchEnv) -> Result:
    """A remote open+read 4 KiB+close served by the supervisor (a static program) beside the
    same loop served by the layer (the program linked dynamically)."""
    env.require_run()
    n = str(_runs(env, 1000, 200))
    runs = _runs(env, 5, 3)
    served = median_of(
        lambda: _per_op(env, [str(_open_loop(env, static=True)), n, SMALL_FILE, "4096"]),
        runs,
        warmup=0,
    )
    layer = median_of(
        lambda: _per_op(env, [str(_open_loop(env, static=False)), n, SMALL_FILE, "4096"]),
        runs,
        warmup=0,
    )
    return Result(served, layer, "s/op", note="baseline: the layer, same file")


# ---------------------------------------------------------------- outgoing

_RR = textwrap.dedent(
    """
    import socket, sys, time
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.create_connection((host, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(50):
        s.sendall(b"x"); s.recv(1)
    t = time.perf_counter()
    for _ in range(n):
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    print((time.perf_counter() - t) / n)
    """
)

_BULK = textwrap.dedent(
    """
    import socket, sys, threading, time
    host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.create_connection((host, port), timeout=60)
    chunk = b"y" * (1 << 16)
    def send():
        sent = 0
        while sent < total:
            s.sendall(chunk); sent += len(chunk)
    t = time.perf_counter()
    th = threading.Thread(target=send); th.start()
    got = 0
    while got < total:
        data = s.recv(1 << 20)
        if not data: raise SystemExit("short echo")
        got += len(data)
    th.join()
    print(total / (time.perf_counter() - t))
    """
)


def _echo_port(env: BenchEnv) -> int:
    port = env.pod.spec.echo_port
    if port is None:
        raise NotAvailable("the pod has no echo service")
    return int(port)


def _outgoing(
    env: BenchEnv, script: str, arg: str, runs: int, port_forward: bool, *, handover: bool = False
) -> tuple[float, float]:
    """Median of `script` run through mirrord against the pod's echo service on the pod's
    loopback, and run directly from this machine against the pod's address."""
    env.require_run()
    port = str(_echo_port(env))

    def direct() -> float:
        out = subprocess.run(
            [PY, "-c", script, env.pod.ip, port, arg], capture_output=True, text=True, check=True
        )
        return float(out.stdout.split()[-1])

    argv = [PY, "-c", script, "127.0.0.1", port, arg]
    via = median_of(
        lambda: float(
            env.run(argv, port_forward=port_forward, handover=handover).stdout.split()[-1]
        ),
        runs,
        0,
    )
    return via, median_of(direct, runs)


def outgoing_rr(env: BenchEnv, port_forward: bool = False, handover: bool = False) -> Result:
    n = str(_runs(env, 3000, 500))
    via, direct = _outgoing(env, _RR, n, _runs(env, 5, 3), port_forward, handover=handover)
    return Result(via, direct, "s/rtt", note=f"added latency {1e6 * (via - direct):.0f} µs")


def _last_number(argv: list[str]) -> float:
    """The last number a measuring script printed (run on this machine, bounded)."""
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120)
    return float(out.stdout.split()[-1])


@contextlib.contextmanager
def _bare_forwarders(*hops: list[str], chunk: int = 0) -> Iterator[str]:
    """Start the bare forwarders of bench/_floor.py, last hop first: each of `hops` is its
    `KIND LISTEN CONNECT`, prefixed by `nsenter` arguments to run it in the pod's network
    namespace where the agent runs; `chunk`, if given, is the most one receive takes. Yields
    the `ready` port of the first hop; every process is killed on the way out."""
    root = str(Path(__file__).resolve().parent.parent)
    procs: list[subprocess.Popen[str]] = []
    port = ""
    try:
        for hop in reversed(hops):
            proc = subprocess.Popen(
                [*hop[:-3], PY, "-m", "bench._floor", *hop[-3:], *([str(chunk)] if chunk else [])],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=root,
                env={**os.environ, "PYTHONPATH": root},
            )
            procs.append(proc)
            assert proc.stdout is not None
            ready = proc.stdout.readline().split()  # bounded: the process prints or exits
            if ready[:1] != ["ready"]:
                raise RuntimeError(f"bare forwarder {hop} did not start")
            port = ready[1]
        yield port
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate(timeout=30)


def _through_forwarders(
    env: BenchEnv, first: str, second: str, script: str, arg: str, *, chunk: int = 0
) -> float:
    """`script ARG` (`_RR` or `_BULK`) from this machine through two bare forwarders: `first`
    on this machine, `second` in the pod's network namespace, joined by a unix socket (as the
    daemon and a local agent are); the second connects to the pod's echo service on the pod's
    loopback, as the agent does for the outgoing figures."""
    path = str(env.tmp / f"floor-{time.monotonic_ns()}.sock")
    in_pod = ["nsenter", "-t", str(env.pod.pid), "-n"]
    try:
        with _bare_forwarders(
            [first, "tcp", path],
            [*in_pod, second, path, f"127.0.0.1:{_echo_port(env)}"],
            chunk=chunk,
        ) as port:
            return _last_number([PY, "-c", script, "127.0.0.1", port, arg])
    finally:
        Path(path).unlink(missing_ok=True)


_UNIX_RR = textwrap.dedent(
    """
    import socket, sys, time
    path, n = sys.argv[1], int(sys.argv[2])
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    def rt():
        s.sendall(b"x" * 32)
        got = 0
        while got < 32:
            data = s.recv(64)
            assert data, "the forwarder closed the connection"
            got += len(data)
    for _ in range(50):
        rt()
    t = time.perf_counter()
    for _ in range(n):
        rt()
    print((time.perf_counter() - t) / n)
    """
)


def file_small_floor(env: BenchEnv) -> Result:
    """A 32-byte request and reply from a process over a unix socket (as the layer reaches the
    daemon), through a bare asyncio forwarder to a bare trio task that answers it (as the agent
    answers a small file request inline): the floor that the daemon's and the agent's event
    loops set under `file_small` (one round trip per open+read+close), beside its baseline."""
    n = _runs(env, 2000, 300)
    runs = _runs(env, 5, 3)

    def once() -> float:
        stamp = time.monotonic_ns()
        first, second = (str(env.tmp / f"floor-{stamp}-{i}.sock") for i in (1, 2))
        try:
            with _bare_forwarders(["asyncio", first, second], ["trio", second, "echo"]):
                return _last_number([PY, "-c", _UNIX_RR, first, str(n)])
        finally:
            for path in (first, second):
                Path(path).unlink(missing_ok=True)

    floor = median_of(once, runs, 0)
    base = median_of(lambda: _pingpong_rtt(n), 5)
    return Result(floor, base, "s/rt", note="baseline: file_small's (a unix round trip in Python)")


def outgoing_rr_floor(env: BenchEnv) -> Result:
    """`_RR` through a bare asyncio forwarder and a bare trio forwarder (the event loops the
    daemon and the agent run on, doing nothing but forward) against the direct round trip:
    the floor those loops set under `outgoing_rr`. The note gives the same through two plain
    `select` loops, the floor of any two-process relay."""
    env.require_run()
    port = str(_echo_port(env))
    n = str(_runs(env, 3000, 500))
    runs = _runs(env, 5, 3)

    def direct() -> float:
        out = subprocess.run(
            [PY, "-c", _RR, env.pod.ip, port, n], capture_output=True, text=True, check=True
        )
        return float(out.stdout.split()[-1])

    loops = median_of(lambda: _through_forwarders(env, "asyncio", "trio", _RR, n), runs)
    plain = median_of(lambda: _through_forwarders(env, "select", "select", _RR, n), runs)
    base = median_of(direct, runs)
    return Result(
        loops,
        base,
        "s/rtt",
        note=f"added {1e6 * (loops - base):.0f} µs; two select loops {plain / base:.2f}x",
        extra={"select_loops": plain},
    )


def outgoing_bulk(env: BenchEnv, port_forward: bool = False, handover: bool = False) -> Result:
    runs = _runs(env, 3, 2)
    via, direct = _outgoing(env, _BULK, str(env.bulk_size), runs, port_forward, handover=handover)
    return Result(via / 1e6, direct / 1e6, "MB/s", note="echoed both ways")


def outgoing_bulk_floor(env: BenchEnv) -> Result:
    """`_BULK` through a bare asyncio forwarder and a bare trio forwarder, each receiving
    256 KiB at a time as mirrord's relays do, against the direct echo: the floor that two
    relaying processes on those loops set under `outgoing_bulk`. The note gives the same
    through two plain `poll` loops."""
    env.require_run()
    port, size = str(_echo_port(env)), str(env.bulk_size)
    runs = _runs(env, 3, 2)

    def direct() -> float:
        return _last_number([PY, "-c", _BULK, env.pod.ip, port, size])

    def through(first: str, second: str) -> float:
        from mirrord.daemon._link import RELAY_CHUNK

        return _through_forwarders(env, first, second, _BULK, size, chunk=RELAY_CHUNK)

    loops = median_of(lambda: through("asyncio", "trio"), runs, 0)
    plain = median_of(lambda: through("select", "select"), runs, 0)
    base = median_of(direct, runs)
    return Result(
        loops / 1e6,
        base / 1e6,
        "MB/s",
        note=f"echoed both ways; two poll loops {plain / base:.2f}x",
        extra={"poll_loops": plain / 1e6},
    )


# ---------------------------------------------------------------- scale

_SCALE = textwrap.dedent(
    """
    import os, socket, sys
    n, path, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            ok = 1
            try:
                with open(path, "rb") as f:
                    ok &= len(f.read()) == 4096
                ok &= bool(socket.getaddrinfo("bench-only.internal", 80))
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                s.sendall(b"ping"); ok &= s.recv(4) == b"ping"; s.close()
            except Exception as e:
                print("child failed:", e, file=sys.stderr); ok = 0
            os._exit(0 if ok else 1)
        pids.append(pid)
    failed = sum(os.waitpid(p, 0)[1] != 0 for p in pids)
    print(failed)
    """
)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


SCALE_RSS_BUDGET_MIB = 50.0  # issue 18: the daemon's RSS after 100 processes


def scale_procs(env: BenchEnv) -> Result:
    env.require_run()
    port = _echo_port(env)
    out = env.run([PY, "-c", _SCALE, "100", SMALL_FILE, str(port)], timeout=600)
    failed = int(out.stdout.split()[-1])
    pid = env.daemon_pid()
    rss = _rss_mib(pid) if pid else None
    if failed:
        raise RuntimeError(f"{failed} of 100 processes failed")
    return Result(
        rss, SCALE_RSS_BUDGET_MIB, "MiB daemon RSS", note="100 of 100 processes succeeded"
    )


# ---------------------------------------------------------------- incoming


def _incoming(env: BenchEnv) -> None:
    env.require_run()
    raise NotAvailable("incoming traffic through `mirrord run` is measured once steal lands")


def steal_rps(env: BenchEnv) -> Result:
    from bench._incoming import steal_rps as run

    return run(env)


def steal_latency(env: BenchEnv) -> Result:
    from bench._incoming import steal_latency as run

    return run(env)


def steal_h2_rps(env: BenchEnv) -> Result:
    from bench._incoming_h2 import steal_h2_rps as run

    return run(env)


def steal_grpc_latency(env: BenchEnv) -> Result:
    from bench._incoming_grpc import steal_grpc_latency as run

    return run(env)


def mirror_capacity(env: BenchEnv) -> Result:
    from bench._incoming import mirror_capacity as run

    return run(env)


_PF = "through the API server's port-forward"


def _port_forward_figures(env: BenchEnv) -> list[Figure]:
    """The file and outgoing figures again with the agent reached as a cluster user reaches it
    (`pod/NAME` through the in-process API server's TLS websocket port-forward), beside the
    same baselines measured in the same call."""

    def pf(fn: Callable[..., Result]) -> Callable[[bool], Result]:
        def run(quick: bool) -> Result:
            result = fn(env, port_forward=True)
            if env.cluster.portforwards_opened() == 0:
                raise RuntimeError("the sessions did not reach the agent through a port-forward")
            return result

        return run

    return [
        Figure(
            "file_small_pf", f"file_small, {_PF}", "unix ping-pong RTT", "lower", 4, pf(file_small)
        ),
        Figure(
            "file_bulk_pf",
            f"file_bulk, {_PF}",
            "read via /proc/P/root",
            "higher",
            0.3,
            pf(file_bulk),
        ),
        Figure(
            "outgoing_rr_pf", f"outgoing_rr, {_PF}", "direct to pod IP", "lower", 4, pf(outgoing_rr)
        ),
        Figure(
            "outgoing_bulk_pf",
            f"outgoing_bulk, {_PF}",
            "direct to pod IP",
            "higher",
            0.3,
            pf(outgoing_bulk),
        ),
    ]


_HO = "handed over (local target)"


def _handover_figures(env: BenchEnv) -> list[Figure]:
    """The file and outgoing figures with hand-over on: the agent passes the open file or the
    connected socket itself, so only the open or connect crosses daemon and agent (every
    other figure runs relayed, `feature.*.handover` false, as a cluster target has it)."""
    return [
        Figure(
            "file_small_handover",
            f"4 KiB pread of a remote file, {_HO}",
            "same reads via /proc/P/root",
            "lower",
            1.2,
            lambda quick: file_small_handover(env),
        ),
        Figure(
            "file_bulk_handover",
            f"file_bulk, {_HO}",
            "read via /proc/P/root",
            "higher",
            0.9,
            lambda quick: file_bulk(env, handover=True),
        ),
        Figure(
            "outgoing_rr_handover",
            f"outgoing_rr, {_HO}",
            "direct to pod IP",
            "lower",
            1.2,
            lambda quick: outgoing_rr(env, handover=True),
        ),
        Figure(
            "outgoing_bulk_handover",
            f"outgoing_bulk, {_HO}",
            "direct to pod IP",
            "higher",
            0.9,
            lambda quick: outgoing_bulk(env, handover=True),
        ),
    ]


def figures(env: BenchEnv) -> list[Figure]:
    def f(fn: Callable[[BenchEnv], Result]) -> Callable[[bool], Result]:
        return lambda quick: fn(env)

    return [
        Figure(
            "startup_warm",
            "mirrord run -t pid/P -- true (warm)",
            "python3 -c pass",
            "lower",
            3,
            f(startup_warm),
        ),
        Figure(
            "startup_cold", "same, nothing running", "startup_warm", "report", None, f(startup_cold)
        ),
        Figure(
            "file_small",
            "open+read 4 KiB+close, remote",
            "unix ping-pong RTT",
            "lower",
            3,  # issue 18
            f(file_small),
        ),
        Figure(
            "file_small_floor",
            "one round trip through bare asyncio + trio (the loops' floor)",
            "unix ping-pong RTT",
            "report",
            None,
            f(file_small_floor),
        ),
        Figure(
            "file_bulk",
            "read the bulk file, remote",
            "read via /proc/P/root",
            "higher",
            0.4,  # issue 18
            f(file_bulk),
        ),
        Figure(
            "file_write_small",
            "4 KiB writes to a remote file",
            "same writes via /proc/P/root",
            "higher",
            0.3,  # issue 18
            f(file_write_small),
        ),
        Figure(
            "layer_bypass",
            "local open+close under the layer",
            "without the layer",
            "lower",
            1.03,
            f(layer_bypass),
        ),
        Figure(
            "syscall_bypass",
            "local open+close trapped by the supervisor",
            "no filter",
            "report",
            None,
            f(syscall_bypass),
        ),
        Figure(
            "syscall_untrapped",
            "pread+getppid under the supervisor's filter",
            "no filter",
            "lower",
            1.5,
            f(syscall_untrapped),
        ),
        Figure(
            "syscall_remote_open",
            "remote open+read 4 KiB+close, supervisor",
            "the layer",
            "lower",
            1.5,
            f(syscall_remote_open),
        ),
        Figure(
            "outgoing_rr",
            "1-byte request/response, outgoing",
            "direct to pod IP",
            "lower",
            3,  # issue 18
            f(outgoing_rr),
        ),
        Figure(
            "outgoing_rr_floor",
            "outgoing_rr through bare asyncio + trio forwarders (the loops' floor)",
            "direct to pod IP",
            "report",
            None,
            f(outgoing_rr_floor),
        ),
        Figure(
            "outgoing_bulk",
            "bulk echo through outgoing",
            "direct to pod IP",
            "higher",
            0.6,  # issue 18
            f(outgoing_bulk),
        ),
        Figure(
            "outgoing_bulk_floor",
            "outgoing_bulk through bare asyncio + trio forwarders (the loops' floor)",
            "direct to pod IP",
            "report",
            None,
            f(outgoing_bulk_floor),
        ),
        *_handover_figures(env),
        *_port_forward_figures(env),
        Figure(
            "steal_rps",
            "HTTP/1.1 keep-alive req/s, 8 conns, stolen",
            "app directly",
            "higher",
            0.7,  # issue 18
            f(steal_rps),
        ),
        Figure(
            "steal_latency",
            "p50 added latency per stolen request",
            "app directly",
            "report",
            None,
            f(steal_latency),
        ),
        Figure(
            "steal_h2_rps",
            "h2c req/s, 8 conns, through a filtered steal (unmatched)",
            "pod's app directly",
            "higher",
            0.5,
            f(steal_h2_rps),
        ),
        Figure(
            "steal_grpc_latency",
            "gRPC unary p50 through a filtered steal (unmatched)",
            "pod's app directly",
            "report",
            None,
            f(steal_grpc_latency),
        ),
        Figure(
            "mirror_capacity",
            "highest rate mirrored, 0 drops, 0 misses",
            "pod server's rate",
            "higher",
            0.95,  # issue 18
            f(mirror_capacity),
        ),
        Figure(
            "scale_procs",
            "100 processes: file+DNS+outgoing, daemon RSS",
            f"budget {SCALE_RSS_BUDGET_MIB:g} MiB",
            "lower",
            1.0,  # issue 18: at most 50 MiB, in the daemon that served every figure before
            f(scale_procs),
        ),
    ]
