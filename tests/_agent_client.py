"""The one daemon-side agent client of the tests: speaks the agent protocol to a real agent
over one real stream (its unix socket, or a Kubernetes port-forward).

Owns: the handshake, requests matched to replies by (channel, request id), connections
(outgoing ones it opens, incoming ones the agent announces) as `AgentConn` objects that honour
the credit window both ways, and what arrives unasked (TrafficStats, Fatal, stray replies).
No layer and no daemon: what the tests check is what the daemon would receive.
Does not own: starting the agent (`tests/_agent_process.py`).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from mirrord._frames import FrameReader, PassedFd
from mirrord.protocol import CLOSED, NEED_DATA, AgentConnection, AgentRole, Message, Received
from mirrord.protocol import messages as m
from tests._agent_process import AgentProc

__all__ = ["AgentClient", "AgentConn", "AgentError"]

_CHUNK = 64 * 1024
_HANDSHAKE_TIMEOUT = 10.0
_REQUEST_TIMEOUT = 30.0


class AgentError(Exception):
    """The agent answered a request with ErrorReply."""

    def __init__(self, reply: m.ErrorReply) -> None:
        super().__init__(f"errno {reply.errno}: {reply.message}")
        self.errno = reply.errno
        self.message = reply.message
        self.reply = reply


class AgentConn:
    """One connection on a channel as the daemon sees it: outgoing (`AgentClient.connect`) or
    incoming (announced by the agent's IncomingConnection, `announce`)."""

    def __init__(
        self,
        client: AgentClient,
        channel: int,
        conn_id: int,
        announce: m.IncomingConnection | None = None,
    ) -> None:
        self.client = client
        self.channel = channel
        self.conn_id = conn_id
        self._announce = announce
        self._inbox: collections.deque[bytes | None] = collections.deque()
        self._arrived = anyio.Event()
        self._credit = anyio.Event()
        # Data bytes we may still send (the agent's Credit adds to it), as the daemon's Flow
        self.send_window = client.conn.initial_window
        self.closed = anyio.Event()
        self.closed_errno: int | None = None
        self.eof = False

    @property
    def announce(self) -> m.IncomingConnection:
        """The agent's IncomingConnection of an incoming connection."""
        assert self._announce is not None, f"{self!r} is an outgoing connection"
        return self._announce

    def __repr__(self) -> str:
        state = "closed" if self.closed.is_set() else "eof" if self.eof else "open"
        return f"<AgentConn channel={self.channel} conn_id={self.conn_id} {state}>"

    def _push(self, item: bytes | None) -> None:
        self._inbox.append(item)
        self._arrived.set()

    def _end(self, errno: int | None) -> None:
        self.closed_errno = errno
        self._push(None)
        self.closed.set()
        self._credit.set()

    async def send(self, data: bytes, chunk: int = _CHUNK) -> None:
        """Data within the send window, waiting for Credit; BrokenResourceError once closed."""
        view = memoryview(data)
        while view:
            while (window := self.send_window) <= 0:
                if self.closed.is_set():
                    raise anyio.BrokenResourceError
                self._credit = anyio.Event()
                await self._credit.wait()
            n = min(window, chunk, len(view))
            self.send_window -= n
            await self.client.send(m.Data(conn_id=self.conn_id, data=bytes(view[:n])), self.channel)
            view = view[n:]

    async def shutdown(self) -> None:
        """Shutdown (no more data from us); nothing once closed or the agent is gone."""
        if self.closed.is_set():
            return
        with contextlib.suppress(anyio.BrokenResourceError):
            await self.client.send(m.Shutdown(conn_id=self.conn_id), self.channel)

    async def close(self) -> None:
        await self.client.send(m.ConnClose(conn_id=self.conn_id), self.channel)

    async def receive(self) -> bytes:
        """The next bytes (credited back), or b"" at Shutdown/ConnClose."""
        if self.eof:
            return b""
        while not self._inbox:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        item = self._inbox.popleft()
        if item is None:
            self.eof = True
            return b""
        if not self.closed.is_set():
            with contextlib.suppress(anyio.BrokenResourceError):  # the agent is gone meanwhile
                await self.client.send(
                    m.Credit(conn_id=self.conn_id, amount=len(item)), self.channel
                )
        return item

    async def receive_exactly(self, n: int) -> bytes:
        """Up to `n` bytes: fewer only if the connection ended first."""
        out = bytearray()
        while len(out) < n and (chunk := await self.receive()):
            out += chunk
        return bytes(out)

    async def receive_all(self) -> bytes:
        out = bytearray()
        while chunk := await self.receive():
            out += chunk
        return bytes(out)


class AgentClient:
    """`incoming[channel]` (set by the test) receives that channel's incoming connections;
    `stats` keeps TrafficStats, `fatals` every (channel, Fatal), `fatal` the control channel's;
    `other` every other (channel, message) nobody waited for."""

    def __init__(self, stream: anyio.abc.ByteStream, secret: str, *, handover: bool = True) -> None:
        self.stream = stream
        # fds the agent handed over (SCM_RIGHTS, on a unix stream), in frame order
        self._frames = FrameReader(stream, receive_fds=handover)
        features = [m.FEATURE_HANDOVER] if self._frames.receives_fds else []
        self.conn = AgentConnection(AgentRole.DAEMON, secret=secret, features=features)
        self._welcome: m.Welcome | None = None
        self._rid = itertools.count(1)
        self._conn_ids = itertools.count(2, 2)  # the daemon's ids are even
        self._waiting: dict[tuple[int, int], tuple[anyio.Event, list[Message]]] = {}
        self.conns: dict[tuple[int, int], AgentConn] = {}
        self.incoming: dict[int, MemoryObjectSendStream[AgentConn]] = {}
        self.stats: list[m.TrafficStats] = []
        self.fatals: list[tuple[int, m.Fatal]] = []
        self.fatal: m.Fatal | None = None
        self.other: list[tuple[int, Message]] = []
        self.ended = anyio.Event()
        self._lock = anyio.Lock()
        self.handed: dict[tuple[int, int], PassedFd] = {}  # (channel, request id) -> its fd

    @property
    def welcome(self) -> m.Welcome:
        """The agent's Welcome (opened with `welcome=True`)."""
        assert self._welcome is not None, "opened without waiting for the Welcome"
        return self._welcome

    def __repr__(self) -> str:
        return f"<AgentClient conns={len(self.conns)} ended={self.ended.is_set()}>"

    # -- opening

    @classmethod
    @asynccontextmanager
    async def open(cls, agent: AgentProc, *, welcome: bool = True) -> AsyncIterator[AgentClient]:
        """A client of a started agent (`tests/_agent_process.py`)."""
        async with cls.open_unix(agent.socket, agent.secret, welcome=welcome) as client:
            yield client

    @classmethod
    @asynccontextmanager
    async def open_unix(
        cls, path: str, secret: str, *, welcome: bool = True
    ) -> AsyncIterator[AgentClient]:
        """A client of the agent listening on the unix socket `path`."""
        stream = await anyio.connect_unix(path)
        async with cls.over(stream, secret, welcome=welcome) as client:
            yield client

    @classmethod
    @asynccontextmanager
    async def over(
        cls,
        stream: anyio.abc.ByteStream,
        secret: str,
        *,
        welcome: bool = True,
        handover: bool = True,
    ) -> AsyncIterator[AgentClient]:
        """A client over an open stream (closed on exit). With `welcome`, the Welcome has
        arrived on entry; without it, the Hello is sent and the rest is up to the agent.
        `handover` False: the Hello does not offer to take fds (as a daemon behind a proxy)."""
        client = cls(stream, secret, handover=handover)
        async with stream, anyio.create_task_group() as tg:
            await stream.send(client.conn.hello(client="tests"))
            if welcome:
                await client._read_welcome()
            tg.start_soon(client._reader)
            try:
                yield client
            finally:
                tg.cancel_scope.cancel()

    async def _read_welcome(self) -> None:
        with anyio.fail_after(_HANDSHAKE_TIMEOUT):
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    self.conn.receive_data(await self.stream.receive())
                    continue
                assert isinstance(event, Received), event
                assert isinstance(event.message, m.Welcome), event
                self._welcome = event.message
                return

    # -- reading

    async def _reader(self) -> None:
        try:
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    try:
                        data = await self._frames.receive()
                    except (
                        anyio.EndOfStream,
                        anyio.BrokenResourceError,
                        anyio.ClosedResourceError,
                    ):
                        data = b""
                    self.conn.receive_data(data)
                    continue
                if event is CLOSED:
                    return
                if isinstance(event, Received):  # an unknown kind is skipped
                    self._route(event.channel, event.message)
        finally:
            for conn in self.conns.values():
                conn._push(None)
                conn.closed.set()
            self.ended.set()

    def _route(self, channel: int, msg: Message) -> None:
        rid = getattr(msg, "request_id", None)
        if m.passes_fd(msg):
            passed = self._frames.take_fd()
            assert passed is not None, f"{msg} came without its fd"
            self.handed[(channel, rid or 0)] = passed
        if rid is not None and (channel, rid) in self._waiting:
            event, slot = self._waiting.pop((channel, rid))
            slot.append(msg)
            event.set()
        elif isinstance(msg, m.IncomingConnection):
            conn = AgentConn(self, channel, msg.conn_id, msg)
            self.conns[(channel, msg.conn_id)] = conn
            tx = self.incoming.get(channel)
            if tx is not None:
                tx.send_nowait(conn)
        elif isinstance(msg, m.TrafficStats):
            self.stats.append(msg)
        elif (conn_id := getattr(msg, "conn_id", None)) is not None and (
            channel,
            conn_id,
        ) in self.conns:
            self._route_conn(self.conns[(channel, conn_id)], msg)
        else:
            if isinstance(msg, m.Fatal):
                self.fatals.append((channel, msg))
                if channel == 0:
                    self.fatal = msg
            self.other.append((channel, msg))

    def _route_conn(self, conn: AgentConn, msg: Message) -> None:
        if isinstance(msg, m.Data):
            conn._push(msg.data)
        elif isinstance(msg, m.Credit):
            conn.send_window += msg.amount
            conn._credit.set()
        elif isinstance(msg, m.Shutdown):
            conn._push(None)
        elif isinstance(msg, m.ConnClose):
            conn._end(msg.errno)
            del self.conns[(conn.channel, conn.conn_id)]

    # -- sending

    async def send(self, msg: Message, channel: int = 0) -> None:
        """One message; BrokenResourceError once the agent connection has ended (a relay of
        ours may still be sending when the agent dies)."""
        async with self._lock:
            if self.ended.is_set():
                raise anyio.BrokenResourceError("the agent connection has ended")
            await self.stream.send(self.conn.send(msg, channel))

    async def send_raw(self, frames: bytes) -> None:
        """Frames made with `conn.send`, in one write (as a daemon's batch arrives)."""
        async with self._lock:
            await self.stream.send(frames)

    async def request(
        self,
        channel: int,
        make: Callable[[int], Message],
        *,
        timeout: float = _REQUEST_TIMEOUT,
        rid: int | None = None,
    ) -> Any:
        """The reply to `make(request_id)`; AgentError for an ErrorReply."""
        rid = next(self._rid) if rid is None else rid
        event = anyio.Event()
        slot: list[Message] = []
        self._waiting[(channel, rid)] = (event, slot)
        await self.send(make(rid), channel)
        with anyio.fail_after(timeout):
            await event.wait()
        reply = slot[0]
        if isinstance(reply, m.ErrorReply):
            raise AgentError(reply)
        return reply

    async def request_passing(
        self, channel: int, make: Callable[[int], Message], *, timeout: float = _REQUEST_TIMEOUT
    ) -> tuple[Any, PassedFd | None]:
        """`request`, and the fd the agent handed over with the reply (the caller owns it)."""
        rid = next(self._rid)
        reply = await self.request(channel, lambda _: make(rid), timeout=timeout, rid=rid)
        return reply, self.handed.pop((channel, rid), None)

    # -- channels, files, connections

    async def open_channel(
        self, number: int, *, pid: int | None = None, parent: int | None = None
    ) -> None:
        await self.send(
            m.ChannelOpen(
                pid=1000 + number if pid is None else pid, parent=parent, label=f"test {number}"
            ),
            number,
        )

    async def close_channel(self, number: int) -> None:
        await self.send(m.ChannelClose(reason="test"), number)

    async def env(self, channel: int) -> dict[str, str]:
        reply = await self.request(
            channel, lambda r: m.EnvRequest(request_id=r, include=[], exclude=[])
        )
        assert isinstance(reply, m.EnvReply), reply
        return reply.env

    async def read_file(self, channel: int, path: bytes) -> bytes:
        opened = await self.request(channel, lambda r: m.FileOpen(request_id=r, path=path, flags=0))
        out = bytearray()
        while True:
            data = await self.request(
                channel, lambda r: m.FileRead(request_id=r, handle=opened.handle, size=65536)
            )
            if not data.data:
                break
            out += data.data
        await self.request(channel, lambda r: m.FileClose(request_id=r, handle=opened.handle))
        return bytes(out)

    async def connect(
        self, channel: int, address: str, port: int, protocol: str = "tcp"
    ) -> AgentConn:
        """An outgoing connection the agent makes from the target's network namespace."""
        conn_id = next(self._conn_ids)
        conn = AgentConn(self, channel, conn_id)
        self.conns[(channel, conn_id)] = conn
        try:
            await self.request(
                channel,
                lambda r: m.Connect(
                    request_id=r, conn_id=conn_id, protocol=protocol, address=address, port=port
                ),
            )
        except BaseException:
            self.conns.pop((channel, conn_id), None)
            raise
        return conn
