"""The relay shell (`mirrord._relay.FlowRelay`): two relays joined by an in-order wire, each
over a real socket pair to a user app (and, last, over the real agent stream), under asyncio (the daemon's backend) and trio (the
agent's)."""

from __future__ import annotations

import errno
import math
import select
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from mirrord._frames import FrameReader, FrameWriter
from mirrord._relay import FlowRelay, RawSocketStream
from mirrord.protocol import (
    NEED_DATA,
    AgentConnection,
    Flow,
    FlowState,
    Message,
    Received,
    RemoteProtocolError,
)
from mirrord.protocol import messages as m
from tests.protocol.helpers import agent_pair

pytestmark = pytest.mark.anyio
CONN = 2


class _Wire:
    """One direction of the agent stream, in order: a relay's messages to the other relay."""

    def __init__(self) -> None:
        self.tx, self.rx = anyio.create_memory_object_stream[Message](math.inf)
        self.sent: list[Message] = []

    def send_nowait(self, msg: Message) -> None:
        self.sent.append(msg)
        self.tx.send_nowait(msg)

    async def wait_ready(self) -> None:
        await anyio.lowlevel.checkpoint()

    def ready(self) -> bool:
        return True

    async def pump(self, to: FlowRelay) -> None:
        async for msg in self.rx:
            to.receive(msg)


@dataclass
class Relayed:
    app_a: anyio.abc.SocketStream  # the user app on the daemon's side, say
    app_b: anyio.abc.SocketStream  # the target's app on the agent's side
    relay_a: FlowRelay
    relay_b: FlowRelay
    wire_ab: _Wire


async def _stream(sock: socket.socket) -> anyio.abc.SocketStream:
    if sock.family == socket.AF_UNIX:
        return await anyio.abc.UNIXSocketStream.from_socket(sock)
    return await anyio.abc.SocketStream.from_socket(sock)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
    return client, server


@asynccontextmanager
async def relayed(
    *, window: int = 1024 * 1024, drain_timeout: float = 60.0, b_tcp: bool = False
) -> AsyncIterator[Relayed]:
    app_a_sock, relay_a_sock = socket.socketpair()
    relay_b_sock, app_b_sock = _tcp_pair() if b_tcp else socket.socketpair()
    wire_ab, wire_ba = _Wire(), _Wire()
    relay_a = FlowRelay(
        Flow(CONN, window=window), wire_ab, await _stream(relay_a_sock), description="a"
    )
    relay_b = FlowRelay(
        Flow(CONN, window=window),
        wire_ba,
        await _stream(relay_b_sock),
        description="b",
        drain_timeout=drain_timeout,
    )
    app_a, app_b = await _stream(app_a_sock), await _stream(app_b_sock)
    async with app_a, app_b, _running(relay_a, relay_b):
        yield Relayed(app_a, app_b, relay_a, relay_b, wire_ab)


@asynccontextmanager
async def _running(relay_a: FlowRelay, relay_b: FlowRelay) -> AsyncIterator[None]:
    """Both relays and the two directions of the wire between them, as tasks."""
    wire_ab, wire_ba = relay_a.link, relay_b.link
    assert isinstance(wire_ab, _Wire) and isinstance(wire_ba, _Wire)
    async with (
        wire_ab.tx,
        wire_ab.rx,
        wire_ba.tx,
        wire_ba.rx,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(wire_ab.pump, relay_b)
        tg.start_soon(wire_ba.pump, relay_a)
        tg.start_soon(relay_a.run)
        tg.start_soon(relay_b.run)
        yield
        tg.cancel_scope.cancel()


async def _read_all(stream: anyio.abc.SocketStream) -> bytes:
    out = bytearray()
    with anyio.fail_after(60):
        while True:
            try:
                out += await stream.receive()
            except anyio.EndOfStream:
                return bytes(out)


async def _exchange(app: anyio.abc.SocketStream, data: bytes) -> bytes:
    """A user app that sends `data` and its EOF while it reads everything until the EOF (an
    app that only wrote first would stall under any flow control, as over TCP)."""

    async def write() -> None:
        await app.send(data)
        await app.send_eof()

    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        received = await _read_all(app)
    return received


async def _until(check: object, what: str) -> None:
    assert callable(check)
    with anyio.fail_after(30):
        while not check():
            await anyio.sleep(0.01)


async def test_both_ways_under_a_small_window() -> None:
    a_bytes = bytes(range(256)) * 12 * 1024  # 3 MiB
    b_bytes = bytes(range(255, -1, -1)) * 8 * 1024  # 2 MiB
    async with relayed(window=64 * 1024) as r:
        got: dict[str, bytes] = {}

        async def side(name: str, app: anyio.abc.SocketStream, data: bytes) -> None:
            got[name] = await _exchange(app, data)

        async with anyio.create_task_group() as tg:
            tg.start_soon(side, "a", r.app_a, a_bytes)
            tg.start_soon(side, "b", r.app_b, b_bytes)
        with anyio.fail_after(30):
            await r.relay_a.finished.wait()
            await r.relay_b.finished.wait()
        assert got == {"a": b_bytes, "b": a_bytes}
        assert r.relay_a.flow.state is FlowState.CLOSED
        assert r.relay_b.flow.state is FlowState.CLOSED
        # no Data beyond the window: the largest Data is at most 64 KiB
        assert max(len(x.data) for x in r.wire_ab.sent if isinstance(x, m.Data)) <= 64 * 1024


async def test_a_clean_close_drains_what_was_queued_first() -> None:
    payload = b"q" * (768 * 1024)  # more than the socket pair buffers: queued in the relay
    async with relayed() as r:
        await r.app_b.send_eof()  # the target's app is done writing, but reads nothing yet
        await r.app_a.send(payload)
        await r.app_a.send_eof()
        assert await _read_all(r.app_a) == b""
        # a got b's Shutdown and wrote its EOF: it closes, while b still holds a's data
        await _until(lambda: r.relay_b.flow.state is FlowState.DRAINING, "b draining")
        assert r.relay_b.flow.queued > 0
        assert await _read_all(r.app_b) == payload  # nothing was dropped, then the EOF
        with anyio.fail_after(30):
            await r.relay_b.finished.wait()
        assert r.relay_b.flow.state is FlowState.CLOSED


async def test_the_drain_is_bounded_in_time() -> None:
    async with relayed(drain_timeout=0.5) as r:
        await r.app_b.send_eof()
        await r.app_a.send(b"r" * (768 * 1024))  # the target's app never reads it
        await r.app_a.send_eof()
        with anyio.fail_after(30):
            await r.relay_b.finished.wait()
        assert r.relay_b.flow.state is FlowState.RESET


async def test_a_failure_resets_the_other_side() -> None:
    async with relayed(b_tcp=True) as r:
        await r.app_a.send(b"hello")
        with anyio.fail_after(30):
            assert await r.app_b.receive() == b"hello"
        r.relay_a.fail(errno.ECONNRESET)
        with anyio.fail_after(30):
            await r.relay_b.finished.wait()
        assert r.relay_b.flow.close_errno == errno.ECONNRESET
        with pytest.raises(anyio.BrokenResourceError), anyio.fail_after(30):
            await r.app_b.receive()  # the target's app sees a reset, not a clean end


async def test_a_peer_breaking_the_rules_ends_the_connection_with_a_reset() -> None:
    async with relayed() as r:
        r.relay_b.receive(m.Shutdown(conn_id=CONN))
        with pytest.raises(RemoteProtocolError, match="peer Data in state IN_DONE"):
            r.relay_b.receive(m.Data(conn_id=CONN, data=b"late"))
        with anyio.fail_after(30):
            await r.relay_b.finished.wait()
        assert r.relay_b.flow.reset_socket


async def test_abort_ends_without_telling_the_peer() -> None:
    async with relayed() as r:
        assert r.relay_a.abort() == errno.ECONNREFUSED  # b never credited a byte
        with anyio.fail_after(30):
            await r.relay_a.finished.wait()
        assert not any(isinstance(x, m.ConnClose) for x in r.wire_ab.sent)
        assert await _read_all(r.app_a) == b""


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the daemon's: its writer runs first
async def test_what_the_app_sent_before_its_reset_reaches_the_peer_first() -> None:
    """A user app answers and closes with the next request unread (an HTTP/1.0 server): its
    kernel resets the connection. The relay's next write then fails, and its reader has not
    read the answer yet (the writer's wake-up runs before the loop polls the socket): the
    answer, still in the socket, goes to the peer before the reset (a mirrored request was
    taken as unanswered and sent to the user app again, the next ones never)."""
    relay_sock, app = _tcp_pair()
    wire = _Wire()
    # the daemon's socket stream for a user app's connection (read only under credit)
    relay = FlowRelay(Flow(CONN, window=1024 * 1024), wire, RawSocketStream(relay_sock))
    answer = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with wire.tx, wire.rx, anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        relay.receive(m.Data(conn_id=CONN, data=b"GET /r0 HTTP/1.1\r\n\r\n"))
        with anyio.fail_after(30):
            while not select.select([app], [], [], 0)[0]:
                await anyio.sleep(0.01)
        # from here to the second Data, nothing awaits: the loop does not poll the socket
        app.recv(7)  # the app read a part of the request, answers and closes: a reset
        app.sendall(answer)
        app.close()
        relay.receive(m.Data(conn_id=CONN, data=b"GET /r1 HTTP/1.1\r\n\r\n"))
        with anyio.fail_after(30):
            await relay.finished.wait()
        tg.cancel_scope.cancel()
    sent = [(type(x).__name__, getattr(x, "data", getattr(x, "errno", None))) for x in wire.sent]
    data = b"".join(d for kind, d in sent if kind == "Data" and isinstance(d, bytes))
    assert data == answer, sent
    assert sent[-1] in (("ConnClose", errno.EPIPE), ("ConnClose", errno.ECONNRESET))


class _AgentStreamLink:
    """A relay's link over the real agent stream: `AgentConnection` frames on a `FrameWriter`."""

    def __init__(self, conn: AgentConnection, writer: FrameWriter) -> None:
        self.conn = conn
        self.writer = writer

    def send_nowait(self, msg: Message) -> None:
        self.writer.send_nowait(self.conn.send(msg, CHANNEL))

    async def wait_ready(self) -> None:
        await self.writer.wait_queued_below(1024 * 1024)

    def ready(self) -> bool:
        return self.writer.queued_bytes <= 1024 * 1024


async def _serve_stream(
    conn: AgentConnection, stream: anyio.abc.ByteStream, relays: dict[int, FlowRelay]
) -> None:
    """The reader of one end of the agent stream: connection messages to their relay."""
    reader = FrameReader(stream)
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            try:
                conn.receive_data(await reader.receive())
            except anyio.EndOfStream:
                return
            continue
        assert isinstance(event, Received)
        msg = event.message
        if isinstance(msg, m.Data | m.Credit | m.Shutdown | m.ConnClose):
            relays[msg.conn_id].receive(msg)


CHANNEL = 3


async def test_the_whole_engine_over_the_agent_stream() -> None:
    # Flow + FrameWriter/FrameReader + AgentConnection + FlowRelay, daemon end and agent end
    # of one stolen connection, over a real socket pair as the agent stream.
    window = 128 * 1024
    daemon, agent = agent_pair(initial_window=window)
    conn_id = 5  # odd: the agent's
    daemon_sock, agent_sock = socket.socketpair()
    user_app, daemon_relay_sock = socket.socketpair()
    agent_relay_sock, target_app = socket.socketpair()
    from_target = bytes(range(256)) * 4096  # 1 MiB, the request
    from_user = bytes(range(255, -1, -1)) * 2048  # 512 KiB, the answer
    async with (
        await _stream(daemon_sock) as daemon_stream,
        await _stream(agent_sock) as agent_stream,
        await _stream(user_app) as user,
        await _stream(target_app) as target,
    ):
        daemon_writer = FrameWriter(daemon_stream, "daemon")
        agent_writer = FrameWriter(agent_stream, "agent")
        agent_writer.send_nowait(
            agent.send(
                m.IncomingConnection(
                    conn_id=conn_id,
                    port=80,
                    remote_address="10.0.0.9",
                    remote_port=40000,
                    local_address="10.0.0.2",
                    local_port=80,
                    mode="steal",
                ),
                CHANNEL,
            )
        )
        daemon.receive_data(await daemon_stream.receive())
        assert isinstance(drain_one(daemon), m.IncomingConnection)
        relay_d = FlowRelay(
            Flow(conn_id, window=window, incoming=True),
            _AgentStreamLink(daemon, daemon_writer),
            await _stream(daemon_relay_sock),
        )
        relay_a = FlowRelay(
            Flow(conn_id, window=window, max_chunk=256 * 1024),
            _AgentStreamLink(agent, agent_writer),
            await _stream(agent_relay_sock),
        )
        got: dict[str, bytes] = {}

        async def app(name: str, s: anyio.abc.SocketStream, data: bytes) -> None:
            got[name] = await _exchange(s, data)

        async with anyio.create_task_group() as tg:
            for task in (daemon_writer.run, agent_writer.run, relay_d.run, relay_a.run):
                tg.start_soon(task)
            tg.start_soon(_serve_stream, daemon, daemon_stream, {conn_id: relay_d})
            tg.start_soon(_serve_stream, agent, agent_stream, {conn_id: relay_a})
            async with anyio.create_task_group() as apps:
                apps.start_soon(app, "target", target, from_target)
                apps.start_soon(app, "user", user, from_user)
            with anyio.fail_after(30):
                await relay_d.finished.wait()
                await relay_a.finished.wait()
            tg.cancel_scope.cancel()
        assert got == {"user": from_target, "target": from_user}
        assert relay_d.flow.state is FlowState.CLOSED
        assert relay_a.flow.state is FlowState.CLOSED


def drain_one(conn: AgentConnection) -> Message:
    event = conn.next_event()
    assert isinstance(event, Received)
    return event.message


async def _udp_pair() -> tuple[anyio.abc.ConnectedUDPSocket, anyio.abc.ConnectedUDPSocket]:
    """Two loopback UDP sockets connected to each other."""
    first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    second = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (first, second):
        s.bind(("127.0.0.1", 0))
    first.connect(second.getsockname())
    second.connect(first.getsockname())
    return (
        await anyio.abc.ConnectedUDPSocket.from_socket(first),
        await anyio.abc.ConnectedUDPSocket.from_socket(second),
    )


async def test_datagrams_both_ways_then_the_app_closes() -> None:
    app_a, relay_a_sock = await _udp_pair()
    relay_b_sock, app_b = await _udp_pair()
    wire_ab, wire_ba = _Wire(), _Wire()
    relay_a = FlowRelay(Flow(CONN, datagram=True), wire_ab, relay_a_sock)
    relay_b = FlowRelay(Flow(CONN, datagram=True), wire_ba, relay_b_sock)
    datagrams = [bytes([i]) * (1000 + i) for i in range(5)]
    async with app_a, app_b, _running(relay_a, relay_b):
        received = []
        with anyio.fail_after(30):
            for datagram in datagrams:
                await app_a.send(datagram)
                received.append(await app_b.receive())  # one at a time: UDP may drop bursts
            await app_b.send(b"answer")
            assert await app_a.receive() == b"answer"
        assert received == datagrams  # whole, never split or joined
        relay_a.socket_closed()
        with anyio.fail_after(30):
            await relay_a.finished.wait()
            await relay_b.finished.wait()
        assert relay_a.flow.state is FlowState.CLOSED
        assert relay_b.flow.state is FlowState.CLOSED
        assert [x for x in wire_ab.sent if isinstance(x, m.ConnClose)] == [
            m.ConnClose(conn_id=CONN, errno=0)
        ]


async def test_a_datagram_flow_needs_a_udp_socket() -> None:
    a, b = socket.socketpair()
    wire = _Wire()
    async with await _stream(a) as sa, await _stream(b), wire.tx, wire.rx:
        with pytest.raises(ValueError, match="datagram flow"):
            FlowRelay(Flow(CONN, datagram=True), wire, sa)
