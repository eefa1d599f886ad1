"""A minimal daemon side of the agent protocol, for tests that talk to a real agent through a
port-forward: handshake, one channel, one request."""

from __future__ import annotations

import anyio
import anyio.abc

from mirrord.protocol import NEED_DATA, AgentConnection, AgentRole, Message, Received
from mirrord.protocol.messages import ChannelOpen, EnvReply, EnvRequest, Welcome


class DaemonSide:
    def __init__(self, stream: anyio.abc.ByteStream, secret: str) -> None:
        self.stream = stream
        self.conn = AgentConnection(AgentRole.DAEMON, secret=secret)

    async def _next(self) -> Received:
        for _ in range(10000):
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                self.conn.receive_data(await self.stream.receive())
                continue
            if isinstance(ev, Received):
                return ev
        raise AssertionError("no event")

    async def handshake(self) -> Welcome:
        await self.stream.send(self.conn.hello(client="kube-test"))
        with anyio.fail_after(10):
            ev = await self._next()
        assert isinstance(ev.message, Welcome), ev
        return ev.message

    async def request(self, channel: int, msg: Message) -> Message:
        await self.stream.send(self.conn.send(msg, channel))
        with anyio.fail_after(10):
            while True:
                ev = await self._next()
                if ev.channel == channel and getattr(ev.message, "request_id", None) == getattr(
                    msg, "request_id", None
                ):
                    return ev.message

    async def env(self, channel: int = 1) -> dict[str, str]:
        await self.stream.send(self.conn.send(ChannelOpen(pid=4242), channel))
        reply = await self.request(channel, EnvRequest(request_id=1, include=[], exclude=[]))
        assert isinstance(reply, EnvReply), reply
        return reply.env
