"""Nothing of a session stays in the daemon after it closes: 1,000 sessions opened and closed
against a real agent (`mirrord-agent` for `pid/N`, this test's own process), each with a layer
process that asked the agent something, then every Session, LayerProcess and environment is
checked to be gone and the agent link to hold no registration, channel or request of theirs."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path

import anyio
import pytest

from mirrord.daemon._backend import LocalAgentBackend
from mirrord.daemon._daemon import Daemon
from mirrord.daemon._link import AgentLink
from mirrord.daemon._runtime import RuntimePaths
from mirrord.daemon._session import LayerProcess, Session
from mirrord.protocol import messages as m
from tests.daemon.test_daemon_logic import Control, LayerPeer

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(os.geteuid() != 0, reason="the agent for pid/N runs as root"),
]

SESSIONS = 1000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _one_session(
    daemon: Daemon, control: Control, paths: RuntimePaths, target: str
) -> tuple[weakref.ref[Session], weakref.ref[LayerProcess], dict[str, str], AgentLink]:
    reply = await control.call("create_session", target=target, config={}, client_pid=os.getpid())
    assert reply["ok"], reply
    session_id = reply["result"]["session"]
    session = daemon.sessions[session_id]
    peer = await LayerPeer.open(paths.layer_socket, session_id, pid=os.getpid())
    try:
        stat = await peer.request(m.FileStat(request_id=7, path=b"/", follow=True))
        assert isinstance(stat, m.StatReply) and stat.request_id == 7, stat
        process = session.processes[os.getpid()]
    finally:
        await peer.stream.aclose()
    closed = await control.call("close_session", session=session_id, reason="test")
    assert closed["ok"], closed
    assert session.state == "closed"
    return weakref.ref(session), weakref.ref(process), session.env, session.link


async def test_closed_sessions_leave_nothing_in_memory() -> None:
    root = Path(tempfile.mkdtemp(prefix="mrdl"))  # short: unix socket paths are <= 107 bytes
    paths = RuntimePaths(root)
    target = f"pid/{os.getpid()}"
    try:
        async with anyio.create_task_group() as tg:
            daemon = Daemon(paths, backends=[LocalAgentBackend(root)], idle_timeout=3600)
            await tg.start(daemon.run)
            stream = await anyio.connect_unix(paths.control_socket)
            control = Control(stream)
            sessions, processes, envs, links = [], [], [], set()
            with anyio.fail_after(600):
                for _ in range(SESSIONS):
                    session, process, env, link = await _one_session(daemon, control, paths, target)
                    sessions.append(session)
                    processes.append(process)
                    envs.append(env)
                    links.add(link)
                del session, process, env, link
                # a layer connection's end is seen by the daemon shortly after it closes
                while any(p() is not None and p().clients for p in processes):  # type: ignore[union-attr]
                    await anyio.sleep(0.05)
                await anyio.sleep(0.1)
            gc.collect()
            assert [s for s in sessions if s() is not None] == []
            assert [p for p in processes if p() is not None] == []
            assert all("MIRRORD_SESSION" in env for env in envs)
            # referenced by the list and getrefcount's argument only
            assert [sys.getrefcount(env) for env in envs] == [3] * SESSIONS
            assert daemon.sessions == {}
            assert len(links) == 1  # one agent for the one target
            (link,) = links
            assert link.is_open, link.reason
            assert link.channels == {} and link._pending == {} and link._lost_callbacks == {}
            del link, links
            await stream.aclose()
            daemon.shutdown()
            with anyio.fail_after(20):
                while paths.control_socket.exists():
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(root, ignore_errors=True)
