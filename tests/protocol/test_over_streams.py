"""The sans-IO objects driven over real anyio socket streams, under asyncio and trio: the shape
the daemon (asyncio) and the agent (trio) both use."""

from __future__ import annotations

import socket

import anyio
import anyio.abc
import pytest

from mirrord.protocol import NEED_DATA, AgentConnection, AgentRole, Received, messages
from tests.protocol.helpers import SECRET

pytestmark = pytest.mark.anyio


async def _events(stream: anyio.abc.ByteStream, conn: AgentConnection, n: int) -> list[Received]:
    out: list[Received] = []
    with anyio.fail_after(10):
        while len(out) < n:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await stream.receive())
                continue
            assert isinstance(event, Received)
            out.append(event)
    return out


async def test_handshake_and_requests_over_a_socket_pair() -> None:
    a, b = socket.socketpair()
    ds = await anyio.abc.UNIXSocketStream.from_socket(a)
    ag = await anyio.abc.UNIXSocketStream.from_socket(b)
    async with ds, ag:
        daemon = AgentConnection(AgentRole.DAEMON, secret=SECRET)
        agent = AgentConnection(AgentRole.AGENT, secret=SECRET)
        await ds.send(daemon.hello("t"))
        (hello,) = await _events(ag, agent, 1)
        assert isinstance(hello.message, messages.Hello)
        await ag.send(agent.welcome(agent_version="1", target="pid/1"))
        await _events(ds, daemon, 1)
        big = b"z" * (messages.MAX_DATA_CHUNK - 64)
        requests = [messages.FileWrite(request_id=i, handle=3, data=big) for i in range(1, 6)]
        async with anyio.create_task_group() as tg:

            async def send_all() -> None:
                for r in requests:
                    await ds.send(daemon.send(r, 9))

            tg.start_soon(send_all)
            got = await _events(ag, agent, len(requests))
        assert [e.message for e in got] == requests
        assert {e.channel for e in got} == {9}
