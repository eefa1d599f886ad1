"""The local backend's agents: the standby agent a daemon starts ahead of its first local
session (`mirrordd --standby-agent TARGET`) is the one that session gets, and one that no
session takes goes with the daemon, with its files. Real agents for this test process."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from mirrord.config import MirrordConfig
from mirrord.daemon._backend import LocalAgentBackend, LocalAgentHandle
from mirrord.daemon._exceptions import AgentStartError

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(os.geteuid() != 0, reason="the agent for pid/N runs as root"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # as the daemon


@pytest.fixture
def runtime() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="mrdb"))  # short: unix socket paths are <= 107 bytes
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _cmdline(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")  # a zombie is gone too
    except FileNotFoundError:
        return True


async def test_the_first_session_gets_the_standby_agent(runtime: Path) -> None:
    backend = LocalAgentBackend(runtime)
    target = f"pid/{os.getpid()}"
    await backend.start_standby(target)
    standby = await _standby_pid(runtime)
    assert target.encode() in _cmdline(standby)
    assert backend.standby == {"target": target, "pid": standby}  # daemon status lists it
    said: list[str] = []
    with anyio.fail_after(60):
        handle = await backend.start_agent(target, MirrordConfig.model_validate({}), said.append)
    try:
        assert handle.pid == standby and backend.standby is None
        assert said == [f"starting agent for {target}", f"agent ready for {target} (pid {standby})"]
        stream = await handle.connect()  # it listens, as any agent
        await stream.aclose()
    finally:
        await handle.stop()
        await backend.aclose()
    assert sorted(p.name for p in runtime.iterdir()) == []


async def _session_passing_the_standby(
    runtime: Path, standby_for: str, config: MirrordConfig
) -> tuple[LocalAgentBackend, LocalAgentHandle]:
    """A backend whose standby (for `standby_for`) the first session, for this process, does
    not take: the session's agent, once the standby is gone."""
    backend = LocalAgentBackend(runtime)
    await backend.start_standby(standby_for)
    standby = await _standby_pid(runtime)
    with anyio.fail_after(60):
        handle = await backend.start_agent(f"pid/{os.getpid()}", config, lambda _: None)
    assert handle.pid != standby and _gone(standby)
    assert len(list(runtime.glob("agent-*.secret"))) == 1  # the session's agent's only
    return backend, handle


async def test_a_standby_for_another_target_stops_when_the_first_session_starts(
    runtime: Path,
) -> None:
    """The session's target came from its config file, not the command line the daemon was
    started for: it gets an agent of its own, and the standby stops at once."""
    backend, handle = await _session_passing_the_standby(
        runtime, "pid/1", MirrordConfig.model_validate({})
    )
    await handle.stop()
    await backend.aclose()
    assert sorted(p.name for p in runtime.iterdir()) == []


async def test_a_session_with_agent_options_gets_an_agent_started_with_them(
    runtime: Path,
) -> None:
    """Agent options (`agent.nftables`, ...) go into an agent's environment at its exec: a
    session that sets them does not take the standby, which stops."""
    config = MirrordConfig.model_validate({"agent": {"nftables": True}})
    backend, handle = await _session_passing_the_standby(runtime, f"pid/{os.getpid()}", config)
    try:
        with open(f"/proc/{handle.pid}/environ", "rb") as f:
            assert b"MIRRORD_AGENT_NFTABLES=true" in f.read().split(b"\0")
    finally:
        await handle.stop()
        await backend.aclose()
    assert sorted(p.name for p in runtime.iterdir()) == []


async def test_a_standby_that_died_is_the_first_sessions_error(runtime: Path) -> None:
    """Killed before the session asked for it, as an agent killed during its start: the
    session is told, and nothing of it is left."""
    backend = LocalAgentBackend(runtime)
    target = f"pid/{os.getpid()}"
    await backend.start_standby(target)
    os.kill(await _standby_pid(runtime), signal.SIGKILL)
    with anyio.fail_after(60), pytest.raises(AgentStartError, match="exited with status -9"):
        await backend.start_agent(target, MirrordConfig.model_validate({}), lambda _: None)
    await backend.aclose()
    assert [p.name for p in runtime.iterdir() if not p.name.endswith(".log")] == []


async def test_a_standby_no_session_takes_goes_with_the_daemon(runtime: Path) -> None:
    backend = LocalAgentBackend(runtime)
    await backend.start_standby(f"pid/{os.getpid()}")
    standby = await _standby_pid(runtime)
    with anyio.fail_after(30):
        await backend.aclose()
    assert _gone(standby)
    assert sorted(p.name for p in runtime.iterdir()) == []
    await backend.start_standby(f"pid/{os.getpid()}")  # a closed backend starts none
    assert sorted(p.name for p in runtime.iterdir()) == []


async def _standby_pid(runtime: Path) -> int:
    """The standby agent's pid, once its process runs the agent (setpriv execs it)."""
    with anyio.fail_after(10):
        while True:
            found = [
                int(p) for p in os.listdir("/proc") if p.isdigit() and _is_agent(int(p), runtime)
            ]
            if found:
                [pid] = found
                assert b"--standby" in _cmdline(pid)
                return pid
            await anyio.sleep(0.01)


def _is_agent(pid: int, runtime: Path) -> bool:
    try:
        argv = _cmdline(pid)
    except OSError:
        return False
    return (
        b"mirrord.agent" in argv
        and any(str(runtime).encode() in a for a in argv)
        and (b"setpriv" not in argv[0])
    )
