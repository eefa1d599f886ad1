"""The daemon's relays on the shared engine (docs/relay.md, step 5), as the user app and the
agent see them: a clean close from the agent still delivers what it sent before and then the
EOF; the agent's Data after its Shutdown costs that connection only (reset on both sides,
`ConnClose(EPROTO)`), the link and other connections go on; status counts the bytes both
ways. The scripted agent stands for the agent; the daemon, its sockets and the protocol are
real."""

from __future__ import annotations

import errno
import socket
import time

import anyio
import pytest

from mirrord.protocol import Message
from mirrord.protocol import messages as m
from tests.daemon.test_daemon_logic import Harness, LayerPeer, _connect_via_relay

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the daemon's backend


async def _connect(peer: LayerPeer, harness: Harness, port: int = 80) -> tuple[socket.socket, int]:
    """The app's end of a new outgoing relay, and its conn id."""
    sock, _ = await _connect_via_relay(peer, port=port)
    conns = [msg for _, msg in harness.agent().received if isinstance(msg, m.Connect)]
    return sock, conns[-1].conn_id


async def _peer(harness: Harness, pid: int) -> LayerPeer:
    _, session, _ = await harness.session()
    return await harness.layer(session, pid=pid)


async def _agent_got(harness: Harness, what: type[Message], conn_id: int) -> Message:
    agent = harness.agent()
    with anyio.fail_after(5):
        while True:
            for _, msg in agent.received:
                if isinstance(msg, what) and getattr(msg, "conn_id", None) == conn_id:
                    return msg
            await anyio.sleep(0.01)


def _read_all(sock: socket.socket) -> bytes:
    got = bytearray()
    for _ in range(1000):
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(got)
        got.extend(chunk)
    raise AssertionError("no EOF")


def _send_until_reset(sock: socket.socket) -> None:
    """Write to a socket whose peer was reset until the reset shows (at most 5 s)."""
    for _ in range(250):
        sock.send(b"x")
        time.sleep(0.02)


async def test_a_clean_close_from_the_agent_delivers_its_data_then_eof(harness: Harness) -> None:
    peer = await _peer(harness, 6001)
    sock, conn_id = await _connect(peer, harness)
    agent, channel = harness.agent(), peer.process
    await agent.send(m.Data(conn_id=conn_id, data=b"last words"), channel)
    await agent.send(m.ConnClose(conn_id=conn_id, errno=0), channel)
    assert await anyio.to_thread.run_sync(_read_all, sock) == b"last words"
    sock.close()


async def test_agent_data_after_its_shutdown_resets_that_connection_only(
    harness: Harness,
) -> None:
    peer = await _peer(harness, 6002)
    sock, conn_id = await _connect(peer, harness)
    agent, channel = harness.agent(), peer.process
    await agent.send(m.Shutdown(conn_id=conn_id), channel)
    await agent.send(m.Data(conn_id=conn_id, data=b"too late"), channel)
    close = await _agent_got(harness, m.ConnClose, conn_id)
    assert isinstance(close, m.ConnClose) and close.errno == errno.EPROTO
    assert await anyio.to_thread.run_sync(_read_all, sock) == b""  # the Shutdown's EOF
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        await anyio.to_thread.run_sync(_send_until_reset, sock)
    sock.close()
    # the link goes on: another connection of the same channel relays
    other, other_id = await _connect(peer, harness, port=81)
    await agent.send(m.Data(conn_id=other_id, data=b"fine"), channel)
    assert await anyio.to_thread.run_sync(other.recv, 10) == b"fine"
    other.close()


async def test_status_counts_relayed_bytes_both_ways(harness: Harness) -> None:
    control, session, _ = await harness.session()
    peer = await harness.layer(session, pid=6003)
    sock, conn_id = await _connect(peer, harness)
    agent, channel = harness.agent(), peer.process
    await agent.send(m.Data(conn_id=conn_id, data=b"x" * 1000), channel)
    assert await anyio.to_thread.run_sync(sock.recv, 2000) == b"x" * 1000
    await anyio.to_thread.run_sync(sock.sendall, b"y" * 300)
    await _agent_got(harness, m.Credit, conn_id)
    with anyio.fail_after(5):
        while True:
            result = (await control.call("status"))["result"]
            status = result["sessions"][0]
            if status["bytes_to_agent"] == 300 and status["bytes_to_user"] == 1000:
                break
            await anyio.sleep(0.02)
    assert status["relayed_connections"] == 1
    # run in this test's own loop, asyncio's (mirrordd's is uvloop: tests/cli/test_daemon_cmd)
    assert result["daemon"]["event_loop"] == "asyncio"
    sock.close()


async def test_agent_data_beyond_the_window_resets_that_connection_only(
    harness: Harness,
) -> None:
    """The agent overruns the window of a connection whose app reads nothing: that
    connection is reset (`ConnClose(EPROTO)`); the agent stream and the channel go on."""
    peer = await _peer(harness, 6004)
    stalled, conn_id = await _connect(peer, harness)  # never read
    agent, channel = harness.agent(), peer.process
    # fill the window until the daemon credits nothing more (the kernel's buffers are full)
    with anyio.fail_after(20):
        while True:
            window = agent.send_window(channel, conn_id)
            if window == 0:
                await anyio.sleep(0.3)
                if agent.send_window(channel, conn_id) == 0:
                    break
                continue
            chunk = min(window, 256 * 1024)
            await agent.send(m.Data(conn_id=conn_id, data=b"s" * chunk), channel)
    await agent.send(m.Data(conn_id=conn_id, data=b"over"), channel)  # beyond the window
    close = await _agent_got(harness, m.ConnClose, conn_id)
    assert isinstance(close, m.ConnClose) and close.errno == errno.EPROTO
    stalled.close()
    other, other_id = await _connect(peer, harness, port=81)
    await agent.send(m.Data(conn_id=other_id, data=b"still here"), channel)
    assert await anyio.to_thread.run_sync(other.recv, 20) == b"still here"
    other.close()
