"""Fixtures of the agent tests: a real `mirrord-agent` subprocess next to a real local pod.

Each agent gets its own temporary runtime directory (socket, secret, log), never ~/.mirrord.
Agents are stopped after the test, also on failure.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mirrord.localpod import LocalPod

_READY_TIMEOUT = 20.0


@pytest.fixture
def anyio_backend() -> str:
    # The agent under test is a subprocess; the test client only needs one backend.
    return "trio"


@dataclass
class AgentProc:
    proc: subprocess.Popen[bytes]
    socket: str
    secret: str
    runtime_dir: Path
    ready_line: str
    log_path: Path = field(default_factory=Path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


def start_agent(
    target: str, *extra: str, secret: str = "test-secret", runtime_dir: Path | None = None
) -> AgentProc:
    runtime = runtime_dir or Path(tempfile.mkdtemp(prefix="mrdag"))
    secret_path = runtime / "agent.secret"
    secret_path.write_text(secret)
    sock = str(runtime / "agent.sock")
    log_path = runtime / "agent.log"
    argv = [sys.executable, "-m", "mirrord.agent", "--target", target, "--listen", f"unix:{sock}"]
    argv += ["--secret-file", str(secret_path), *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    deadline = time.monotonic() + _READY_TIMEOUT
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n") and (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            byte = os.read(proc.stdout.fileno(), 1)
            if not byte:
                break
            line += byte
    agent = AgentProc(proc, sock, secret, runtime, line.decode(), log_path)
    if not line.endswith(b"\n"):
        stop_agent(agent)
        raise AssertionError(f"agent not ready: {line!r}; log:\n{agent.stderr_text()}")
    return agent


def stop_agent(agent: AgentProc) -> None:
    if agent.proc.poll() is None:
        agent.proc.terminate()
        try:
            agent.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait(timeout=10)
    if agent.proc.stdout is not None:
        agent.proc.stdout.close()
    shutil.rmtree(agent.runtime_dir, ignore_errors=True)


@pytest.fixture
def make_agent() -> Iterator[Callable[..., AgentProc]]:
    agents: list[AgentProc] = []

    def make(target: str, *extra: str) -> AgentProc:
        agent = start_agent(target, *extra)
        agents.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in agents:
            stop_agent(agent)


@pytest.fixture
def agent(pod: LocalPod, make_agent: Callable[..., AgentProc]) -> AgentProc:
    return make_agent(f"pid/{pod.pid}", "--idle-timeout", "60")
