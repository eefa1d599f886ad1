"""A scripted agent peer for the daemon's unit tests: the real `AgentConnection` (agent role)
on one end of a socketpair, answering a few requests the way the agent does.

This is not a stand-in for the agent in end-to-end tests (those run `mirrord-agent`): it lets
the daemon's own logic (request id mapping, channels, the credit window, loss) be tested with
exact control over what the agent sends and when.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from mirrord.protocol import (
    CLOSED,
    INITIAL_WINDOW,
    NEED_DATA,
    AgentConnection,
    AgentRole,
    InvalidRequest,
    Message,
    Received,
)
from mirrord.protocol import messages as m

SECRET = "test-secret"
SCRIPTED_PID_TARGET = "pid/424242"


@dataclass
class ScriptedAgent:
    """Answers FileOpen/EnvRequest/Connect/Subscribe; records everything it received."""

    env: dict[str, str] = field(default_factory=lambda: {"POD_VAR": "pod-value"})
    received: list[tuple[int, Message]] = field(default_factory=list)
    invalid: list[InvalidRequest] = field(default_factory=list)  # answered with their errno
    channels: dict[int, m.ChannelOpen] = field(default_factory=dict)
    hold_replies: bool = False  # collect requests in `held` instead of answering
    held: list[tuple[int, Message]] = field(default_factory=list)
    conn: AgentConnection | None = None
    stream: anyio.abc.SocketStream | None = None
    on_data: Callable[[int, m.Data], None] | None = None
    streams: int = 0
    stalled: bool = False  # like SIGSTOP: nothing answered, nothing read after the current read
    killed: bool = False
    # (channel, conn id) -> Data bytes it may still send (the daemon's Credit adds to it)
    windows: dict[tuple[int, int], int] = field(default_factory=dict)

    def disconnect(self) -> None:
        """End the stream (the daemon reads EOF), as an agent closing it does."""
        if self.stream is not None:
            self.stream.extra(SocketAttribute.raw_socket).shutdown(socket.SHUT_RDWR)

    def kill(self) -> None:
        """Die like a SIGKILLed process: the socket closes with the daemon's unread bytes in
        it (stall first to leave some), so the daemon's next read fails with ECONNRESET."""
        self.killed = True
        if self.stream is not None:
            self.stream.extra(SocketAttribute.raw_socket).close()

    _lock: anyio.Lock = field(default_factory=anyio.Lock)

    def send_window(self, channel: int, conn_id: int) -> int:
        """How many Data bytes the daemon credited this connection for (the scripted agent
        honours the window unless a test means to overrun it)."""
        return self.windows.get((channel, conn_id), INITIAL_WINDOW)

    async def send(self, msg: Message, channel: int) -> None:
        assert self.conn is not None and self.stream is not None
        if isinstance(msg, m.Data):
            key = (channel, msg.conn_id)
            self.windows[key] = self.send_window(*key) - len(msg.data)
        async with self._lock:  # several test tasks write; frames must not interleave
            await self.stream.send(self.conn.send(msg, channel))

    async def serve(self, stream: anyio.abc.SocketStream) -> None:
        self.streams += 1
        self.stream = stream
        # as the agent: a forwarded request it cannot decode costs that request only
        self.conn = conn = AgentConnection(
            AgentRole.AGENT, secret=SECRET, invalid_requests_as_events=True
        )
        async with stream:
            while True:
                while self.stalled and not self.killed:
                    await anyio.sleep(0.01)
                if self.killed:
                    return
                try:
                    data = await stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    data = b""
                conn.receive_data(data)
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        break
                    if event is CLOSED:
                        return
                    if isinstance(event, InvalidRequest):
                        self.invalid.append(event)
                        reply = m.ErrorReply(
                            request_id=event.request_id, errno=event.errno, message=event.reason
                        )
                        await self.send(reply, event.channel)
                        continue
                    assert isinstance(event, Received)
                    msg = event.message
                    if isinstance(msg, m.Hello):
                        async with self._lock:
                            await stream.send(conn.welcome(agent_version="scripted", target="t"))
                        continue
                    self.received.append((event.channel, msg))
                    await self.handle(event.channel, msg)

    async def handle(self, channel: int, msg: Message) -> None:
        if self.stalled:
            return  # a stopped process answers nothing
        if isinstance(msg, m.ChannelOpen):
            self.channels[channel] = msg
            return
        if isinstance(msg, m.Credit):
            key = (channel, msg.conn_id)
            self.windows[key] = self.send_window(*key) + msg.amount
            return
        if isinstance(msg, m.Data):
            if self.on_data is not None:
                self.on_data(channel, msg)
            return
        if not isinstance(msg, m.Request):
            return
        if self.hold_replies and not isinstance(msg, m.EnvRequest):
            self.held.append((channel, msg))
            return
        await self.send(self.reply_to(msg), channel)

    def reply_to(self, msg: Any) -> Message:
        if isinstance(msg, m.EnvRequest):
            return m.EnvReply(request_id=msg.request_id, env=dict(self.env))
        if isinstance(msg, m.FileOpen):
            return m.FileOpened(request_id=msg.request_id, handle=len(msg.path))
        if isinstance(msg, m.Connect):
            return m.Connected(
                request_id=msg.request_id,
                conn_id=msg.conn_id,
                local_address="10.0.0.1",
                local_port=40000,
            )
        if isinstance(msg, m.Subscribe):
            return m.Subscribed(request_id=msg.request_id, port=msg.port, warnings=[])
        return m.Ok(request_id=msg.request_id)


class ScriptedHandle:
    """An `AgentHandle` whose stream is a socketpair served by a `ScriptedAgent`."""

    def __init__(self, agent: ScriptedAgent, tg: anyio.abc.TaskGroup, key: str) -> None:
        self.agent = agent
        self.tg = tg
        self.key = key
        self.description = f"scripted agent {key}"
        self.secret = SECRET
        self.stopped = False

    async def connect(self) -> anyio.abc.ByteStream:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        # the agent's end reads only when asked: unread bytes stay in the kernel (see `kill`)
        agent_side = await anyio.abc.UNIXSocketStream.from_socket(theirs)
        self.tg.start_soon(self.agent.serve, agent_side)
        return await anyio.abc.SocketStream.from_socket(ours)

    async def stop(self) -> None:
        self.stopped = True

    def alive(self) -> bool:
        return not self.stopped


class ScriptedBackend:
    name = "scripted"

    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self.tg = tg
        self.agents: dict[str, ScriptedAgent] = {}
        self.started: list[ScriptedHandle] = []

    def handles(self, target: str) -> bool:
        # pid/424242 stands for a target the config package accepts (it checks kinds)
        return target.startswith("scripted/") or target == SCRIPTED_PID_TARGET

    async def start_agent(
        self, target: str, config: Any, progress: Callable[[str], None]
    ) -> ScriptedHandle:
        progress(f"scripted agent for {target}")
        agent = self.agents.setdefault(target, ScriptedAgent())
        handle = ScriptedHandle(agent, self.tg, f"scripted:{target}")
        self.started.append(handle)
        return handle
