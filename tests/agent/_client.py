"""A daemon stand-in for the agent tests: speaks the agent protocol over one real stream.

Requests are matched to replies by (channel, request id); connections get a `ClientConn`
that honours the credit window both ways. No layer, no daemon: what the tests check is what
the daemon would receive.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from mirrord.protocol import (
    CLOSED,
    NEED_DATA,
    AgentConnection,
    AgentRole,
    Message,
    Received,
    UnknownMessage,
)
from mirrord.protocol import messages as m

__all__ = ["AgentClient", "AgentError", "ClientConn"]


class AgentError(Exception):
    """The agent answered a request with ErrorReply."""

    def __init__(self, reply: m.ErrorReply) -> None:
        super().__init__(f"errno {reply.errno}: {reply.message}")
        self.errno = reply.errno
        self.reply = reply


class ClientConn:
    """One connection (outgoing or incoming) as the daemon sees it."""

    def __init__(self, client: AgentClient, channel: int, conn_id: int) -> None:
        self.client = client
        self.channel = channel
        self.conn_id = conn_id
        self._queue: collections.deque[bytes | None] = collections.deque()
        self._arrived = anyio.Event()
        self._credit = anyio.Event()
        self.closed_errno: int | None = None
        self.closed = anyio.Event()
        self.eof = False

    def _push(self, item: bytes | None) -> None:
        self._queue.append(item)
        self._arrived.set()

    def _on_credit(self) -> None:
        self._credit.set()

    async def send(self, data: bytes, chunk: int = 64 * 1024) -> None:
        view = memoryview(data)
        while view:
            while (window := self.client.conn.send_window(self.channel, self.conn_id)) <= 0:
                if self.closed.is_set():
                    raise anyio.BrokenResourceError
                self._credit = anyio.Event()
                await self._credit.wait()
            n = min(window, chunk, len(view))
            await self.client.send(m.Data(conn_id=self.conn_id, data=bytes(view[:n])), self.channel)
            view = view[n:]

    async def shutdown(self) -> None:
        await self.client.send(m.Shutdown(conn_id=self.conn_id), self.channel)

    async def close(self) -> None:
        await self.client.send(m.ConnClose(conn_id=self.conn_id), self.channel)

    async def receive(self) -> bytes:
        """The next bytes (credited back), or b"" at Shutdown/ConnClose."""
        if self.eof:
            return b""
        while not self._queue:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        item = self._queue.popleft()
        if item is None:
            self.eof = True
            return b""
        await self.client.send(m.Credit(conn_id=self.conn_id, amount=len(item)), self.channel)
        return item

    async def receive_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = await self.receive()
            if not chunk:
                break
            out += chunk
        return bytes(out)

    async def receive_all(self) -> bytes:
        out = bytearray()
        while chunk := await self.receive():
            out += chunk
        return bytes(out)


class AgentClient:
    def __init__(self, stream: anyio.abc.ByteStream, secret: str) -> None:
        self.stream = stream
        self.conn = AgentConnection(AgentRole.DAEMON, secret=secret)
        self._rid = itertools.count(1)
        self._conn_ids = itertools.count(2, 2)
        self._waiting: dict[tuple[int, int], tuple[anyio.Event, list[Message]]] = {}
        self.conns: dict[tuple[int, int], ClientConn] = {}
        self.incoming: list[ClientConn] = []
        self.other: list[tuple[int, Message]] = []
        self.fatal: m.Fatal | None = None
        self.ended = anyio.Event()
        self._lock = anyio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(
        cls, path: str, secret: str, *, welcome: bool = True
    ) -> AsyncIterator[AgentClient]:
        stream = await anyio.connect_unix(path)
        async with cls.over(stream, secret, welcome=welcome) as client:
            yield client

    @classmethod
    @asynccontextmanager
    async def over(
        cls, stream: anyio.abc.ByteStream, secret: str, *, welcome: bool = True
    ) -> AsyncIterator[AgentClient]:
        client = cls(stream, secret)
        async with stream, anyio.create_task_group() as tg:
            await stream.send(client.conn.hello(client="tests"))
            if welcome:
                await client._read_until_open()
            tg.start_soon(client._reader)
            try:
                yield client
            finally:
                tg.cancel_scope.cancel()

    async def _read_until_open(self) -> None:
        with anyio.fail_after(10):
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    self.conn.receive_data(await self.stream.receive())
                    continue
                assert isinstance(event, Received), event
                assert isinstance(event.message, m.Welcome), event
                self.welcome = event.message
                return

    async def _reader(self) -> None:
        try:
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    try:
                        data = await self.stream.receive()
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
                if isinstance(event, UnknownMessage):
                    continue
                assert isinstance(event, Received)
                self._route(event.channel, event.message)
        finally:
            for conn in self.conns.values():
                conn._push(None)
                conn.closed.set()
            self.ended.set()

    def _route(self, channel: int, msg: Message) -> None:
        rid = getattr(msg, "request_id", None)
        if rid is not None and (channel, rid) in self._waiting:
            event, slot = self._waiting.pop((channel, rid))
            slot.append(msg)
            event.set()
            return
        conn_id = getattr(msg, "conn_id", None)
        if isinstance(msg, m.IncomingConnection):
            conn = ClientConn(self, channel, msg.conn_id)
            self.conns[(channel, msg.conn_id)] = conn
            self.incoming.append(conn)
            return
        if conn_id is not None and (channel, conn_id) in self.conns:
            conn = self.conns[(channel, conn_id)]
            if isinstance(msg, m.Data):
                conn._push(msg.data)
            elif isinstance(msg, m.Credit):
                conn._on_credit()
            elif isinstance(msg, m.Shutdown):
                conn._push(None)
            elif isinstance(msg, m.ConnClose):
                conn.closed_errno = msg.errno
                conn._push(None)
                conn.closed.set()
                conn._on_credit()
                del self.conns[(channel, conn_id)]
            return
        if isinstance(msg, m.Fatal) and channel == 0:
            self.fatal = msg
        self.other.append((channel, msg))

    async def send(self, msg: Message, channel: int = 0) -> None:
        async with self._lock:
            await self.stream.send(self.conn.send(msg, channel))

    async def request(
        self, channel: int, make: Callable[[int], Message], *, timeout: float = 20
    ) -> Any:
        rid = next(self._rid)
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

    async def open_channel(self, number: int, *, pid: int = 1, parent: int | None = None) -> None:
        await self.send(m.ChannelOpen(pid=pid, parent=parent, label=f"test {number}"), number)

    async def close_channel(self, number: int) -> None:
        await self.send(m.ChannelClose(reason="test"), number)

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
    ) -> ClientConn:
        conn_id = next(self._conn_ids)
        conn = ClientConn(self, channel, conn_id)
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
