"""The agent's memory is bounded under any peer: a daemon that does not read its replies is
paused, then closed with the reason logged; connections that have not authenticated are capped
in number and in the bytes the agent reads from each. Raw sockets driven by the sans-IO
protocol object play the misbehaving peer; the agent is real."""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable

import anyio
import pytest

from mirrord.agent._server import MAX_HANDSHAKING
from mirrord.agent._session import HELLO_LIMIT, UNREAD_TIMEOUT_ENV
from mirrord.localpod import LocalPod
from mirrord.protocol import (
    NEED_DATA,
    AgentConnection,
    AgentRole,
    Received,
    RemoteProtocolError,
)
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient
from tests._agent_process import AgentProc

pytestmark = pytest.mark.netns

MiB = 1024 * 1024


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.05)


def _authenticated(agent: AgentProc) -> tuple[socket.socket, AgentConnection]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(agent.socket)
    sock.settimeout(10)
    conn = AgentConnection(AgentRole.DAEMON, secret=agent.secret)
    sock.sendall(conn.hello(client="tests"))
    while (event := conn.next_event()) is NEED_DATA:
        conn.receive_data(sock.recv(65536))
    assert isinstance(event, Received) and isinstance(event.message, m.Welcome), event
    sock.sendall(conn.send(m.ChannelOpen(pid=1, label="unread"), 1))
    return sock, conn


def _read_to_end(sock: socket.socket, timeout: float, keep: int = 0) -> bytes | None:
    """Read until the agent closes (keeping the first `keep` bytes); None if it did not close
    within `timeout`."""
    sock.settimeout(1)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1024 * 1024)
        except TimeoutError:
            continue
        except OSError:
            return data
        if not chunk:
            return data
        if len(data) < keep:
            data += chunk[: keep - len(data)]
    return None


def _closed_by_agent(sock: socket.socket, timeout: float) -> bool:
    return _read_to_end(sock, timeout) is not None


async def _still_serves(agent: AgentProc) -> None:
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        assert await client.read_file(1, b"/app/test.txt") == b"hello from the pod\n"


def test_replies_a_daemon_does_not_read_are_bounded_then_it_is_closed(
    pod: LocalPod, make_agent: Callable[..., AgentProc], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(UNREAD_TIMEOUT_ENV, "3")
    agent = make_agent(f"pid/{pod.pid}")
    sock, conn = _authenticated(agent)
    with sock:
        stat = b"".join(
            conn.send(m.FileStat(request_id=i, path=b"/app/test.txt"), 1) for i in range(1, 2001)
        )
        sock.sendall(stat)  # warm-up: read and answered (threads, caches) before measuring
        _wait_for(lambda: select.select([sock], [], [], 0)[0] != [], 10, "first replies")
        time.sleep(1.0)
        before = _rss(agent.pid)
        # Up to 300,000 more requests (≈100 B of reply each), never reading a reply: the agent
        # stops reading them once its queue is full, so our sends stall.
        sock.setblocking(False)
        batch = b"".join(
            conn.send(m.FileStat(request_id=i, path=b"/app/test.txt"), 1) for i in range(3000, 6000)
        )
        sent_batches, view = 0, memoryview(b"")
        stalled_since = time.monotonic()
        while sent_batches < 100 and time.monotonic() - stalled_since < 3.0:
            if not view:
                view, sent_batches = memoryview(batch), sent_batches + 1
            if not select.select([], [sock], [], 0.5)[1]:
                continue
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                continue
            except OSError:
                break  # closed by the agent already (a slow machine): that is the point too
            stalled_since = time.monotonic()
        assert sent_batches < 100, "the agent read every request while none of its replies was"
        grown = _rss(agent.pid) - before
        assert grown < 16 * MiB, f"agent grew {grown / MiB:.1f} MiB"
        # Nothing taken for 3 s: closed, and the log says why.
        _wait_for(lambda: "does not read its replies" in agent.log(), 30, "the reason")
        sock.setblocking(True)
        assert _closed_by_agent(sock, 30)
    anyio.run(_still_serves, agent, backend="trio")
    assert "Traceback" not in agent.log()


def test_connections_that_have_not_authenticated_are_capped_in_number(
    pod: LocalPod, make_agent: Callable[..., AgentProc]
) -> None:
    agent = make_agent(f"pid/{pod.pid}")
    idle: list[socket.socket] = []
    try:
        for _ in range(MAX_HANDSHAKING + 8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(s)
            s.connect(agent.socket)
        # The ones past the cap are closed at once; the others wait for their Hello (10 s).
        closed: set[socket.socket] = set()
        deadline = time.monotonic() + 3
        while len(closed) < 8 and time.monotonic() < deadline:
            readable, _, _ = select.select([s for s in idle if s not in closed], [], [], 0.2)
            for s in readable:
                try:
                    if not s.recv(4096):
                        closed.add(s)
                except OSError:
                    closed.add(s)
        assert 8 <= len(closed) < len(idle), len(closed)
        assert "authenticating already" in agent.log()
    finally:
        for s in idle:
            s.close()
    # Once those are gone a daemon gets in again.
    _wait_for(lambda: _try_serves(agent), 30, "a daemon served after the idle ones left")
    assert "Traceback" not in agent.log()


def _try_serves(agent: AgentProc) -> bool:
    try:
        anyio.run(_still_serves, agent, backend="trio")
    except (OSError, AssertionError, anyio.EndOfStream, anyio.BrokenResourceError):
        return False
    return True


def test_connections_that_have_not_authenticated_are_capped_in_buffered_bytes(
    pod: LocalPod, make_agent: Callable[..., AgentProc]
) -> None:
    agent = make_agent(f"pid/{pod.pid}")
    before = _rss(agent.pid)
    # Each announces a frame of 2 MiB - 1 (the protocol's limit) and sends up to 2 MiB of
    # it, never a Hello: the agent must not buffer it.
    header = struct.pack("!I", 2 * MiB - 1)
    body = b"\xa0" * (2 * MiB)
    conns: list[socket.socket] = []
    try:
        for _ in range(24):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conns.append(s)
            s.connect(agent.socket)
            s.setblocking(False)
            s.send(header)
        pending = {s: memoryview(body) for s in conns}
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], 0.5)
            for s in writable:
                try:
                    pending[s] = pending[s][s.send(pending[s][: 256 * 1024]) :]
                except BlockingIOError:
                    continue
                except OSError:  # closed by the agent
                    del pending[s]
                    continue
                if not pending[s]:
                    del pending[s]
        grown = _rss(agent.pid) - before
        assert grown < 20 * MiB, f"agent grew {grown / MiB:.1f} MiB"
        answers = []
        for s in conns:
            s.setblocking(True)
            answers.append(_read_to_end(s, 15, keep=4096))
        assert None not in answers  # every one closed by the agent
        # Those that got past the cap were told why (the others were closed at accept).
        told = [a for a in answers if a]
        assert told
        for answer in told:
            conn = AgentConnection(AgentRole.DAEMON, secret="")
            conn.receive_data(answer)
            with pytest.raises(RemoteProtocolError, match="handshake_too_large"):
                conn.next_event()
        assert "without a valid Hello" in agent.log()
        assert HELLO_LIMIT <= 64 * 1024
    finally:
        for s in conns:
            s.close()
    anyio.run(_still_serves, agent, backend="trio")
    assert "Traceback" not in agent.log()
