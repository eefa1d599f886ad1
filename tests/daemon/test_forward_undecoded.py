"""The daemon forwards file, env and DNS requests and their replies without decoding them
(issue 18 item 3): it rewrites the frame head (request id, channel) and passes the body
through; against the scripted agent (real protocol objects, real sockets)."""

from __future__ import annotations

import errno
import functools
from typing import Any

import anyio
import pytest

from mirrord.protocol import LayerConnection, frame_with_head
from mirrord.protocol import messages as m
from mirrord.protocol._framing import decode_payload
from tests.daemon.test_daemon_logic import Harness

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the daemon runs on asyncio (kubernetes_asyncio needs it)


async def test_the_daemon_decodes_neither_a_forwarded_request_nor_its_reply(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, session, _ = await harness.session()
    peer = await harness.layer(session, pid=1101)
    agent = harness.agent()
    agent.hold_replies = True
    decoded: list[bytes] = []

    def counting(payload: bytes) -> Any:
        decoded.append(payload)
        return decode_payload(payload)

    # every connection in this process decodes frames through this one function
    monkeypatch.setattr("mirrord.protocol._connection.decode_payload", counting)
    request_marker = b"/the/requested/path/" + b"q" * 40
    await peer.send(m.FileFetch(request_id=41, path=request_marker, flags=0, max_size=1 << 20))
    with anyio.fail_after(10):
        while not agent.held:
            await anyio.sleep(0.005)
    channel, held = agent.held[0]
    assert isinstance(held, m.FileFetch) and held.path == request_marker
    assert channel == peer.process
    reply_marker = bytes(range(256)) * 1024  # 256 KiB of content
    await agent.send(
        m.FileFetched(request_id=held.request_id, stat=[1] * 13, handle=None, data=reply_marker),
        channel,
    )
    reply = await peer.recv()
    assert reply == m.FileFetched(request_id=41, stat=[1] * 13, handle=None, data=reply_marker)
    # decoded once each: by the scripted agent and by the layer peer, never by the daemon
    assert sum(request_marker in p for p in decoded) == 1
    assert sum(reply_marker in p for p in decoded) == 1


async def test_a_request_the_agent_cannot_decode_costs_that_request_only(
    harness: Harness,
) -> None:
    _, session, _ = await harness.session()
    peer = await harness.layer(session, pid=1201)
    other = await harness.layer(session, pid=1202)
    # FileRead's head, then bytes that are no CBOR: the daemon passes them on unread
    await peer.stream.send(frame_with_head([m.FileRead.KIND, 5], 5, b"\xff\xfe\xfd"))
    reply = await peer.recv()
    assert isinstance(reply, m.ErrorReply) and reply.request_id == 5
    assert reply.errno == errno.EINVAL
    assert harness.agent().invalid  # the agent answered it; its stream goes on
    after = await peer.request(m.FileOpen(request_id=6, path=b"/ok", flags=0))
    assert after == m.FileOpened(request_id=6, handle=3)
    assert await other.request(m.EnvRequest(request_id=1, include=[], exclude=[])) == m.EnvReply(
        request_id=1, env=dict(harness.agent().env)
    )


async def test_a_reply_for_a_layer_connection_that_closed_is_dropped_and_forgotten(
    harness: Harness,
) -> None:
    _, session, _ = await harness.session()
    main = await harness.layer(session, pid=1301)
    thread = await harness.layer(session, pid=1301)
    agent = harness.agent()
    agent.hold_replies = True
    await thread.send(m.FileOpen(request_id=1, path=b"/slow", flags=0))
    with anyio.fail_after(10):
        while not agent.held:
            await anyio.sleep(0.005)
    await thread.stream.aclose()
    harness.streams.remove(thread.stream)
    link = harness.daemon.sessions[session].link
    assert link.statistics()["pending_requests"] == 1
    channel, held = agent.held.pop()
    await agent.send(agent.reply_to(held), channel)
    with anyio.fail_after(10):
        while link.statistics()["pending_requests"]:
            await anyio.sleep(0.005)
    agent.hold_replies = False
    # the process's other connection is served as before
    assert await main.request(m.FileOpen(request_id=2, path=b"/ab", flags=0)) == m.FileOpened(
        request_id=2, handle=3
    )


async def test_requests_pending_when_the_process_goes_are_forgotten(harness: Harness) -> None:
    _, session, _ = await harness.session()
    peer = await harness.layer(session, pid=1401)
    agent = harness.agent()
    agent.hold_replies = True
    for rid in range(1, 6):  # a FIFO read in the target may never be answered
        await peer.send(m.FileOpen(request_id=rid, path=b"/fifo", flags=0))
    with anyio.fail_after(10):
        while len(agent.held) < 5:
            await anyio.sleep(0.005)
    link = harness.daemon.sessions[session].link
    assert link.statistics()["pending_requests"] == 5
    await peer.stream.aclose()
    harness.streams.remove(peer.stream)
    with anyio.fail_after(10):  # the process's channel closes after its fork grace
        while link.statistics()["pending_requests"]:
            await anyio.sleep(0.02)


async def test_a_reply_too_big_for_the_layer_is_an_error_for_that_request_only(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the daemon's layer side with a smaller frame limit than its agent side
    monkeypatch.setattr(
        "mirrord.daemon._layer_client.LayerConnection",
        functools.partial(LayerConnection, max_frame_size=64 * 1024),
    )
    _, session, _ = await harness.session()
    peer = await harness.layer(session, pid=1501)
    agent = harness.agent()
    agent.hold_replies = True
    await peer.send(m.FileFetch(request_id=3, path=b"/big", flags=0, max_size=1 << 20))
    with anyio.fail_after(10):
        while not agent.held:
            await anyio.sleep(0.005)
    channel, held = agent.held.pop()
    assert isinstance(held, m.FileFetch)
    big = m.FileFetched(request_id=held.request_id, stat=[0] * 13, handle=None, data=b"b" * 100_000)
    await agent.send(big, channel)
    reply = await peer.recv()
    assert isinstance(reply, m.ErrorReply) and reply.request_id == 3
    assert reply.errno == errno.EMSGSIZE
    agent.hold_replies = False
    assert harness.daemon.sessions[session].link.is_open
    assert await peer.request(m.FileOpen(request_id=4, path=b"/ok", flags=0)) == m.FileOpened(
        request_id=4, handle=3
    )
