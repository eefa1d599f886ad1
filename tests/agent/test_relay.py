"""The agent's relays (the shared engine: `Flow` + `FlowRelay`, docs/relay.md) as a daemon
and a target's app see them: a real agent next to a real local pod, driven by the daemon
stand-in; the pod's side is a real server process whose report is the assertion."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import anyio
import pytest

from mirrord.localpod import LocalPod
from mirrord.protocol import INITIAL_WINDOW, Message
from mirrord.protocol import messages as m
from tests._agent_client import AgentClient
from tests._agent_process import AgentProc

pytestmark = [pytest.mark.netns, pytest.mark.anyio]

# A pod-side server for one connection: it waits for "go" on stdin (so the agent queues what
# the daemon sends meanwhile), then reads to the end and prints what it saw: the byte count
# and how the connection ended. Its small receive buffer keeps what the kernel holds small.
_SINK = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.bind(("127.0.0.1", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
sys.stdin.readline()
n = 0
try:
    while data := c.recv(65536):
        n += len(data)
    print(n, "eof", flush=True)
except ConnectionResetError:
    print(n, "reset", flush=True)
"""


def _sink(pod: LocalPod) -> tuple[subprocess.Popen[bytes], int]:
    server = pod.popen_in_pod([sys.executable, "-c", _SINK], stdin=subprocess.PIPE)
    assert server.stdout is not None
    return server, int(server.stdout.readline())


async def _report(server: subprocess.Popen[bytes]) -> str:
    """The sink's last line, once it is told to read (bounded: it ends with its connection)."""
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(b"go\n")
    server.stdin.flush()
    with anyio.fail_after(30):
        line = await anyio.to_thread.run_sync(server.stdout.readline)
    return line.decode().strip()


async def test_the_daemons_clean_close_still_delivers_what_it_sent_before(
    agent: AgentProc, pod: LocalPod
) -> None:
    server, port = _sink(pod)
    payload = os.urandom(INITIAL_WINDOW)  # the whole window: most of it queued in the agent
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        conn = await client.connect(1, "127.0.0.1", port)
        await conn.send(payload)
        await conn.close()  # ConnClose(0) without a Shutdown first: the user app closed
        # the target's app reads only now: the agent wrote the queued bytes, then the EOF
        assert await _report(server) == f"{len(payload)} eof"
        # the daemon closed: the agent sends nothing back for the connection
        assert not conn.closed.is_set()


async def test_the_daemons_reset_resets_the_targets_app(agent: AgentProc, pod: LocalPod) -> None:
    server, port = _sink(pod)
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        conn = await client.connect(1, "127.0.0.1", port)
        await conn.send(b"before the reset")
        await client.send(m.ConnClose(conn_id=conn.conn_id, errno=errno.ECONNRESET), 1)
        # what the user app's reset drops: the queue; the target's app sees a reset
        assert (await _report(server)).endswith(" reset")


async def test_a_daemon_breaking_a_connections_rules_loses_that_connection_only(
    agent: AgentProc, pod: LocalPod
) -> None:
    server, port = _sink(pod)
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        conn = await client.connect(1, "127.0.0.1", port)
        # the Shutdown and the Data after it in one write, as one batch of a daemon arrives:
        # the agent meets the broken rule before its writer could pass the EOF on (sent
        # apart, the target's app may read that EOF first and then meet the reset)
        await client.send_raw(
            client.conn.send(m.Shutdown(conn_id=conn.conn_id), 1)
            + client.conn.send(m.Data(conn_id=conn.conn_id, data=b"after my Shutdown"), 1)
        )
        with anyio.fail_after(10):
            await conn.closed.wait()
        assert conn.closed_errno == errno.EPROTO
        assert (await _report(server)).endswith(" reset")
        # the channel and the agent go on: another connection on the same channel echoes
        echo = await client.connect(1, pod.ip, 7777)
        await echo.send(b"still here")
        await echo.shutdown()
        with anyio.fail_after(10):
            assert await echo.receive_all() == b"still here"
            await echo.closed.wait()
        assert echo.closed_errno == 0


async def test_a_udp_association_ends_with_the_daemons_shutdown(
    agent: AgentProc, pod: LocalPod
) -> None:
    async with AgentClient.open(agent) as client:
        await client.open_channel(1)
        conn = await client.connect(1, "127.0.0.1", 9, protocol="udp")  # nobody listens
        await conn.send(b"lost, as on any network")
        await conn.shutdown()  # UDP has no half-close: the association ends cleanly
        with anyio.fail_after(10):
            await conn.closed.wait()
        assert conn.closed_errno == 0


_UDP_SINK = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0)); s.settimeout(10)
print(s.getsockname()[1], flush=True)
try:
    print(s.recv(100).decode(), flush=True)
except TimeoutError:
    print("nothing came", flush=True)
"""


@pytest.mark.parametrize("close", ["ConnClose", "ChannelClose"])
async def test_a_datagram_sent_just_before_the_end_still_goes_out(
    agent: AgentProc, pod: LocalPod, close: str
) -> None:
    # the user app sent a datagram and closed its socket (ConnClose) or exited (ChannelClose):
    # in one batch, as a slow agent reads them, before its writer could run
    sink = pod.popen_in_pod([sys.executable, "-c", _UDP_SINK])
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        async with AgentClient.open(agent) as client:
            await client.open_channel(1)
            conn = await client.connect(1, "127.0.0.1", port, protocol="udp")
            end: Message = (
                m.ConnClose(conn_id=conn.conn_id)
                if close == "ConnClose"
                else m.ChannelClose(reason="process exited")
            )
            await client.send_raw(
                client.conn.send(m.Data(conn_id=conn.conn_id, data=b"the last datagram"), 1)
                + client.conn.send(end, 1)
            )
            with anyio.fail_after(20):
                line = await anyio.to_thread.run_sync(sink.stdout.readline)
        assert line.decode().strip() == "the last datagram"
    finally:
        sink.kill()
        sink.wait(timeout=5)
