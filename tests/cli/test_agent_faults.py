"""What the user is told when the agent fails, and what is left of it: a session opened on a
stopped (SIGSTOP) agent says the agent did not answer in time; a dead agent is dropped from
`mirrord daemon status`, and what the daemon kept for it (its socket and secret file in the
runtime directory) is removed, whether a session still used it or it was lingering. Real
daemon, real agent, a namespace pod."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod, PodSpec
from tests.cli.conftest import Mirrord, agent_pids, python_app, wait_for

pytestmark = pytest.mark.netns


def _agents(mirrord: Mirrord) -> list[dict[str, object]]:
    return list(mirrord.status()["agents"])


@pytest.mark.parametrize("in_use", [True, False], ids=["with-a-session", "lingering"])
def test_a_killed_agent_leaves_status_and_its_secret_is_removed(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], in_use: bool
) -> None:
    pod = make_pod(PodSpec(env={"POD_VAR": "v"}))
    target = f"pid/{pod.pid}"
    mirrord.env["MIRRORD_DAEMON_AGENT_LINGER"] = "120"  # a lingering agent stays until killed
    if in_use:
        proc = mirrord.popen("run", "-t", target, "--", "sh", "-c", "echo ready; exec sleep 60")
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    else:
        done = mirrord.run("run", "-t", target, "--", "true")
        assert done.returncode == 0, done.stderr
    [agent] = wait_for(lambda: agent_pids(mirrord.runtime, target), 20, "the agent")
    [entry] = _agents(mirrord)
    assert entry["alive"] is True
    secrets = list(mirrord.runtime.glob("agent-*.secret"))
    assert len(secrets) == 1
    os.kill(agent, signal.SIGKILL)
    started = time.monotonic()
    wait_for(lambda: not _agents(mirrord), 15, "the dead agent to leave `daemon status`")
    assert time.monotonic() - started < 15
    assert not secrets[0].exists()
    assert not list(mirrord.runtime.glob("agent-*.sock"))


def test_a_session_on_a_stopped_agent_says_it_did_not_answer(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod]
) -> None:
    """The new session shares the running agent, which is stopped: the user was told "the
    agent could not read the target's environment: environment read (EIO)" (the daemon's own
    channel close taken for the agent's answer). Takes the request timeout (30 s)."""
    pod = make_pod(PodSpec(env={"POD_VAR": "v"}))
    target = f"pid/{pod.pid}"
    proc = mirrord.popen("run", "-t", target, "--", "sh", "-c", "echo ready; exec sleep 120")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    [agent] = wait_for(lambda: agent_pids(mirrord.runtime, target), 20, "the agent")
    os.kill(agent, signal.SIGSTOP)
    try:
        result = mirrord.run("run", "-t", target, "--", "true", timeout=120)
    finally:
        os.kill(agent, signal.SIGCONT)
    assert result.returncode == 1, result.stderr
    assert "did not answer" in result.stderr and "within 30 s" in result.stderr, result.stderr
    assert "environment read" not in result.stderr and "EIO" not in result.stderr


SILENT_SERVER = """
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9321))
s.listen(1)
print("ready", flush=True)
s.settimeout(60)
conn, _ = s.accept()
time.sleep(60)  # never reads
"""

UPLOAD_APP = """
import socket, time
c = socket.create_connection(("127.0.0.1", 9321), timeout=20)
c.setblocking(False)
chunk, sent, idle_since = b"u" * (1 << 20), 0, time.monotonic()
while sent < 256 * (1 << 20) and time.monotonic() - idle_since < 3:
    try:
        sent += c.send(chunk)
        idle_since = time.monotonic()
    except BlockingIOError:
        time.sleep(0.01)
print(sent, flush=True)
"""


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_an_upload_to_a_pod_that_does_not_read_stays_in_the_kernel(
    mirrord: Mirrord, make_pod: Callable[..., LocalPod], tmp_path: Path
) -> None:
    """The app uploads to a pod service that never reads: the daemon reads only what the
    agent's credit window allows, so the app's writes stop after the buffers on the way (a
    4 GiB upload used to grow the daemon to 3.1 GB)."""
    pod = make_pod(PodSpec(env={"POD_VAR": "v"}))
    server = pod.popen_in_pod([sys.executable, "-c", SILENT_SERVER])
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        assert mirrord.run("daemon", "start").returncode == 0
        daemon = mirrord.daemon_pid()
        assert daemon is not None
        before = _rss(daemon)
        result = mirrord.run(
            "run", "-t", f"pid/{pod.pid}", "--", *python_app(tmp_path, UPLOAD_APP), timeout=120
        )
        assert result.returncode == 0, result.stderr
        sent = int(result.stdout.strip())
        grown = _rss(daemon) - before
    finally:
        server.kill()
        server.communicate(timeout=10)
    assert 0 < sent < 64 * (1 << 20), f"the app wrote {sent} bytes to a peer that reads none"
    assert grown < 64 * (1 << 20), f"the daemon grew by {grown} bytes"
