"""The one launcher of a real `mirrord-agent` subprocess for the tests.

Owns: starting the agent with its own temporary runtime directory (socket, secret, log; never
~/.mirrord), waiting for its ready line, and stopping it (terminate, then kill) with the
directory removed, also when the test failed. Does not own: speaking the agent protocol
(`tests/_agent_client.py`) or the pods the agent targets (`mirrord.localpod`).
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AgentProc", "start_agent", "stop_agent"]

_READY_TIMEOUT = 20.0
_SETTLE_TIMEOUT = 20.0  # after the ready line, for the incoming service
_STOP_TIMEOUT = 15.0
_SETTLED_STARTED = "incoming traffic service started"  # the agent's log lines (_server.py)
_SETTLED_FAILED = "incoming traffic is unavailable"


@dataclass
class AgentProc:
    proc: subprocess.Popen[bytes]
    socket: str
    secret: str
    runtime_dir: Path
    ready_line: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.runtime_dir / "agent.log"

    def log(self) -> str:
        """The agent's stderr so far ("" once the runtime directory is gone)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


def _read_ready_line(proc: subprocess.Popen[bytes]) -> bytes:
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
    return line


def start_agent(
    target: str,
    *extra: str,
    secret: str = "test-secret",
    runtime_dir: Path | None = None,
    env: dict[str, str] | None = None,
    listen: str | None = None,
    secret_in_env: bool = False,
    settled: bool = True,
) -> AgentProc:
    """A ready agent for `target` (`pid/N`, `container/ID`), with `extra` arguments and `env`
    on top of this process's environment. It listens on `agent.sock` in its runtime directory
    (`socket`), or on `listen` (`tcp:HOST:PORT`; `socket` is then ""); it reads the secret from
    a file, or from $MIRRORD_AGENT_SECRET with `secret_in_env`. With `settled` it returns once
    the incoming service, loaded after the ready line, has started (or failed) too. Raises
    AssertionError (with the log), the agent stopped, if it never says it is ready or
    settled."""
    runtime = runtime_dir or Path(tempfile.mkdtemp(prefix="mrdag"))
    sock = "" if listen else str(runtime / "agent.sock")
    argv = [sys.executable, "-m", "mirrord.agent", "--target", target]
    argv += ["--listen", listen or f"unix:{sock}", *extra]
    env = {**os.environ, "MIRRORD_RUNTIME_DIR": str(runtime), **(env or {})}
    if secret_in_env:
        env["MIRRORD_AGENT_SECRET"] = secret
    else:
        secret_path = runtime / "agent.secret"
        secret_path.write_text(secret)
        argv += ["--secret-file", str(secret_path)]
    with open(runtime / "agent.log", "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    line = _read_ready_line(proc)
    agent = AgentProc(proc, sock, secret, runtime, line.decode(errors="replace"))
    if not line.startswith(b"mirrord-agent ready") or not line.endswith(b"\n"):
        log_text = agent.log()
        stop_agent(agent)
        raise AssertionError(f"agent not ready: {line!r}; log:\n{log_text}")
    if settled:
        try:
            _wait_settled(agent)
        except AssertionError:
            stop_agent(agent)
            raise
    return agent


def _wait_settled(agent: AgentProc) -> None:
    """Until the agent's incoming service, loaded after the ready line, has started or failed
    (its log says which): the tests that count the agent's fds or threads see it at rest."""
    deadline = time.monotonic() + _SETTLE_TIMEOUT
    text = ""
    while time.monotonic() < deadline and agent.proc.poll() is None:
        text = agent.log()
        if _SETTLED_STARTED in text or _SETTLED_FAILED in text:
            return
        time.sleep(0.01)
    state = (
        "exited" if agent.proc.poll() is not None else f"still running after {_SETTLE_TIMEOUT:g} s"
    )
    raise AssertionError(
        f"the agent's incoming service neither started nor failed ({state}); log:\n{text}"
    )


def stop_agent(agent: AgentProc) -> None:
    if agent.proc.poll() is None:
        agent.proc.terminate()
        try:
            agent.proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait(timeout=10)
    if agent.proc.stdout is not None:
        agent.proc.stdout.close()
    shutil.rmtree(agent.runtime_dir, ignore_errors=True)
