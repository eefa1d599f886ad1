"""A daemon stand-in for the incoming tests: starts a real `mirrord-agent` subprocess and
speaks the agent protocol to it over its unix socket.

Only what the incoming tests need: channels, requests matched to replies, incoming
connections as `Conn` objects that honour the credit window both ways, TrafficStats kept.
"""

from __future__ import annotations

import collections
import itertools
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from mirrord.protocol import CLOSED, NEED_DATA, AgentConnection, AgentRole, Message, Received
from mirrord.protocol import messages as m

__all__ = ["Agent", "AgentClient", "AgentError", "Conn", "start_agent", "stop_agent"]


# ---------------------------------------------------------------- the agent process


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    socket: str
    secret: str
    runtime_dir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return (self.runtime_dir / "agent.log").read_text(errors="replace")
        except OSError:
            return ""


def start_agent(target: str, *, env: dict[str, str] | None = None) -> Agent:
    runtime = Path(tempfile.mkdtemp(prefix="mrdinc"))
    secret = "incoming-test-secret"
    (runtime / "agent.secret").write_text(secret)
    sock = str(runtime / "agent.sock")
    argv = [sys.executable, "-m", "mirrord.agent", "--target", target, "--listen", f"unix:{sock}"]
    argv += ["--secret-file", str(runtime / "agent.secret"), "--idle-timeout", "60"]
    with open(runtime / "agent.log", "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "MIRRORD_RUNTIME_DIR": str(runtime), **(env or {})},
        )
    agent = Agent(proc, sock, secret, runtime)
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + 20
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n") and (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            byte = os.read(proc.stdout.fileno(), 1)
            if not byte:
                break
            line += byte
    if not line.startswith(b"mirrord-agent ready"):
        stop_agent(agent)
        raise AssertionError(f"agent not ready: {line!r}; log:\n{agent.log()}")
    return agent


def stop_agent(agent: Agent) -> None:
    if agent.proc.poll() is None:
        agent.proc.terminate()
        try:
            agent.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait(timeout=10)
    if agent.proc.stdout is not None:
        agent.proc.stdout.close()
    shutil.rmtree(agent.runtime_dir, ignore_errors=True)


# ---------------------------------------------------------------- the protocol client


class AgentError(Exception):
    def __init__(self, reply: m.ErrorReply) -> None:
        super().__init__(f"errno {reply.errno}: {reply.message}")
        self.errno = reply.errno
        self.message = reply.message


class Conn:
    """An incoming connection as the daemon sees it."""

    def __init__(self, client: AgentClient, channel: int, announce: m.IncomingConnection) -> None:
        self.client = client
        self.channel = channel
        self.announce = announce
        self.conn_id = announce.conn_id
        self._inbox: collections.deque[bytes | None] = collections.deque()
        self._arrived = anyio.Event()
        self._credit = anyio.Event()
        self.closed = anyio.Event()
        self.closed_errno: int | None = None
        self.eof = False

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while (window := self.client.conn.send_window(self.channel, self.conn_id)) <= 0:
                if self.closed.is_set():
                    raise anyio.BrokenResourceError
                self._credit = anyio.Event()
                await self._credit.wait()
            n = min(window, 65536, len(view))
            await self.client.send(m.Data(conn_id=self.conn_id, data=bytes(view[:n])), self.channel)
            view = view[n:]

    async def shutdown(self) -> None:
        if not self.closed.is_set():
            await self.client.send(m.Shutdown(conn_id=self.conn_id), self.channel)

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
            await self.client.send(m.Credit(conn_id=self.conn_id, amount=len(item)), self.channel)
        return item

    def _push(self, item: bytes | None) -> None:
        self._inbox.append(item)
        self._arrived.set()

    async def receive_exactly(self, n: int) -> bytes:
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
    def __init__(self, stream: anyio.abc.ByteStream, secret: str) -> None:
        self.stream = stream
        self.conn = AgentConnection(AgentRole.DAEMON, secret=secret)
        self._rid = itertools.count(1)
        self._waiting: dict[tuple[int, int], tuple[anyio.Event, list[Message]]] = {}
        self.conns: dict[tuple[int, int], Conn] = {}
        self.incoming: dict[int, MemoryObjectSendStream[Conn]] = {}
        self.stats: list[m.TrafficStats] = []
        self.fatals: list[tuple[int, m.Fatal]] = []  # (channel, Fatal) the agent sent
        self._lock = anyio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(cls, agent: Agent) -> AsyncIterator[AgentClient]:
        stream = await anyio.connect_unix(agent.socket)
        client = cls(stream, agent.secret)
        async with stream, anyio.create_task_group() as tg:
            await stream.send(client.conn.hello(client="incoming-tests"))
            with anyio.fail_after(10):
                while True:
                    event = client.conn.next_event()
                    if event is NEED_DATA:
                        client.conn.receive_data(await stream.receive())
                        continue
                    assert isinstance(event, Received) and isinstance(event.message, m.Welcome)
                    break
            tg.start_soon(client._reader)
            try:
                yield client
            finally:
                tg.cancel_scope.cancel()

    async def _reader(self) -> None:
        try:
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    try:
                        data = await self.stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        data = b""
                    self.conn.receive_data(data)
                    continue
                if event is CLOSED:
                    return
                if isinstance(event, Received):
                    self._route(event.channel, event.message)
        finally:
            for conn in self.conns.values():
                conn._push(None)
                conn.closed.set()

    def _route(self, channel: int, msg: Message) -> None:
        rid = getattr(msg, "request_id", None)
        if rid is not None and (channel, rid) in self._waiting:
            event, slot = self._waiting.pop((channel, rid))
            slot.append(msg)
            event.set()
            return
        if isinstance(msg, m.IncomingConnection):
            conn = Conn(self, channel, msg)
            self.conns[(channel, msg.conn_id)] = conn
            tx = self.incoming.get(channel)
            if tx is not None:
                tx.send_nowait(conn)
            return
        if isinstance(msg, m.TrafficStats):
            self.stats.append(msg)
            return
        if isinstance(msg, m.Fatal):
            self.fatals.append((channel, msg))
            return
        conn_id = getattr(msg, "conn_id", None)
        c = self.conns.get((channel, conn_id)) if conn_id is not None else None
        if c is None:
            return
        if isinstance(msg, m.Data):
            c._push(msg.data)
        elif isinstance(msg, m.Credit):
            c._credit.set()
        elif isinstance(msg, m.Shutdown):
            c._push(None)
        elif isinstance(msg, m.ConnClose):
            c.closed_errno = msg.errno
            c._push(None)
            c.closed.set()
            c._credit.set()
            del self.conns[(channel, msg.conn_id)]

    async def send(self, msg: Message, channel: int = 0) -> None:
        async with self._lock:
            await self.stream.send(self.conn.send(msg, channel))

    async def send_raw(self, frames: bytes) -> None:
        """Frames made with `conn.send`, in one write (as a daemon's batch arrives)."""
        async with self._lock:
            await self.stream.send(frames)

    async def request(self, channel: int, make: Callable[[int], Message]) -> Any:
        rid = next(self._rid)
        event = anyio.Event()
        slot: list[Message] = []
        self._waiting[(channel, rid)] = (event, slot)
        await self.send(make(rid), channel)
        with anyio.fail_after(30):
            await event.wait()
        if isinstance(slot[0], m.ErrorReply):
            raise AgentError(slot[0])
        return slot[0]

    async def open_channel(self, number: int) -> None:
        await self.send(m.ChannelOpen(pid=1000 + number, label=f"incoming test {number}"), number)

    async def close_channel(self, number: int) -> None:
        await self.send(m.ChannelClose(reason="test"), number)
