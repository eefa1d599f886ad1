"""The daemon under load and under failure, end to end (real agent, real layer, local pods):
a session of 100 forked processes, and a daemon killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod, PodSpec
from tests.cli.conftest import Mirrord, pid_alive, python_app, wait_for

pytestmark = pytest.mark.netns

FORKS_APP = """
import os, socket, sys
N = 100
pids = []
for i in range(N):
    pid = os.fork()
    if pid == 0:
        ok = 0
        try:
            with open("/app/test.txt") as f:
                ok += f.read() == "pod-only file\\n"
            with socket.create_connection(("127.0.0.1", 7777), timeout=20) as s:
                msg = f"hello {i}".encode()
                s.sendall(msg)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                ok += got == msg
        except Exception as exc:
            print(f"child {i}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(0 if ok == 2 else 1)
    pids.append(pid)
failed = sum(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) != 0 for p in pids)
print(f"done {N - failed}/{N}", flush=True)
sys.exit(1 if failed else 0)
"""


def _rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_session_of_100_forked_processes_all_succeed_in_bounded_memory(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(PodSpec(files={"/app/test.txt": b"pod-only file\n"}))
    result = mirrord.run(
        "run", "-t", f"pid/{pod.pid}", "--", *python_app(tmp_path, FORKS_APP), timeout=110
    )
    assert "done 100/100" in result.stdout, result.stderr[-3000:]
    assert result.returncode == 0
    status = mirrord.status()
    daemon_pid = status["daemon"]["pid"]
    assert _rss_peak_kib(daemon_pid) < 150 * 1024
    [agent] = status["agents"]
    assert agent["streams_opened"] == 1  # 101 processes, one agent connection
    assert status["daemon"]["layer_connections_total"] >= 101


KILL_APP = """
import errno, os, sys, time
print("ready", flush=True)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        with open("/app/test.txt") as f:
            f.read()
    except OSError as exc:
        print(f"error {errno.errorcode.get(exc.errno, exc.errno)} {time.time():.3f}", flush=True)
        sys.exit(0)
    time.sleep(0.05)
print("no error", flush=True)
sys.exit(1)
"""


def test_sigkill_of_the_daemon_gives_errors_not_hangs_and_the_next_run_works(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    pod = make_pod(PodSpec(files={"/app/test.txt": b"pod-only file\n"}))
    proc = mirrord.popen("run", "-t", f"pid/{pod.pid}", "--", *python_app(tmp_path, KILL_APP))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # a few remote reads succeed first
    daemon = mirrord.daemon_pid()
    assert daemon is not None
    killed_at = time.time()
    os.kill(daemon, signal.SIGKILL)
    out, err = proc.communicate(timeout=20)
    lines = [line for line in out.splitlines() if line.startswith("error ")]
    assert lines, (out, err)
    _, code, when = lines[0].split()
    assert float(when) - killed_at < 2.0
    assert proc.returncode == 0
    wait_for(lambda: not pid_alive(daemon), 5, "the killed daemon to be gone")
    again = mirrord.run("run", "-t", f"pid/{pod.pid}", "--", "cat", "/app/test.txt")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "pod-only file\n"
    assert mirrord.daemon_pid() != daemon
    del code
