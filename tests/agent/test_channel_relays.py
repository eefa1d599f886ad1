"""The agent's table of a channel's relays (`ChannelRelays`) and what the incoming code learns
from it: the daemon's refusal of a connection must reach the filter as ECONNREFUSED (so the
target's app answers the request the user app never saw), also when the channel closes right
after it, as it does when the session ends on Ctrl-C."""

from __future__ import annotations

import errno

import anyio
import pytest

from mirrord.agent._channel_relays import ChannelRelays
from mirrord.agent._incoming_pipe import pipe_pair
from mirrord.protocol import INITIAL_WINDOW
from mirrord.protocol import messages as m
from mirrord.protocol._base import Message

pytestmark = pytest.mark.anyio


class _DaemonSide:
    """The channel's link as the relays see it: what they send, in order (the daemon's
    stream is the test itself)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.changed = anyio.Event()
        self.is_ready = True

    def send_nowait(self, msg: Message) -> None:
        self.sent.append(msg)
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_ready(self) -> None:
        await anyio.lowlevel.checkpoint()

    def ready(self) -> bool:
        return self.is_ready

    async def data_sent(self, conn_id: int) -> int:
        with anyio.fail_after(5):
            while True:
                n = sum(
                    len(x.data) for x in self.sent if isinstance(x, m.Data) and x.conn_id == conn_id
                )
                if n:
                    return n
                await self.changed.wait()


@pytest.mark.parametrize(
    ("credited", "refused", "told"),
    [
        (False, True, errno.ECONNREFUSED),
        (True, True, errno.ECONNREFUSED),
        # credited and not refused: the user app may have seen the request, no replay
        (True, False, errno.ECONNRESET),
    ],
)
async def test_a_refused_connection_stays_refused_when_the_channel_closes_next(
    credited: bool, refused: bool, told: int
) -> None:
    daemon = _DaemonSide()
    relays = ChannelRelays(daemon, 1, INITIAL_WINDOW)
    filter_end, relay_end = pipe_pair(names=("filter", "relay"))
    relay = relays.add(2, relay_end, "conn 2")
    async with anyio.create_task_group() as tg:
        tg.start_soon(relays.run, relay)
        await filter_end.send(b"GET /matched HTTP/1.1\r\nHost: pod\r\n\r\n")
        sent = await daemon.data_sent(2)
        if credited:  # the daemon wrote the request into the user app's socket ...
            relays.receive(m.Credit(conn_id=2, amount=sent))
        if refused:  # ... which the app never accept()ed: the daemon refuses the connection
            relays.receive(m.ConnClose(conn_id=2, errno=errno.ECONNREFUSED))
        relays.abort_all()  # the session ends: its channel closes at once
    assert filter_end.peer_errno == told
    with pytest.raises(anyio.BrokenResourceError):
        await filter_end.receive()


async def test_a_pipe_end_tells_the_first_reason_it_ended_only() -> None:
    a, b = pipe_pair()
    a.abort(errno.ECONNREFUSED)
    a.abort(errno.ECONNRESET)
    assert b.peer_errno == errno.ECONNREFUSED
    c, d = pipe_pair()
    await c.aclose()
    c.abort(errno.ECONNRESET)  # closed cleanly first: that stands
    assert d.peer_errno == 0
    e, f = pipe_pair()
    await e.send_eof()  # a half-close is not an end
    e.abort(errno.ECONNRESET)
    assert f.peer_errno == errno.ECONNRESET


async def test_bytes_written_to_a_relayed_pipe_go_out_in_the_writers_call_and_in_order() -> None:
    """A mirrored request written into the pipe of its connection's relay becomes the Data to
    the daemon in the writer's call (no task wake-up), unless the window does not hold it or
    the daemon is behind: then the pipe keeps it for the relay's task, and what is written
    after it waits behind it."""
    daemon = _DaemonSide()
    relays = ChannelRelays(daemon, 1, 100)
    mirror_end, relay_end = pipe_pair(names=("mirror", "relay"))
    relay = relays.add(3, relay_end, "conn 3")

    def data() -> list[bytes]:
        return [x.data for x in daemon.sent if isinstance(x, m.Data)]

    async with anyio.create_task_group() as tg:
        tg.start_soon(relays.run, relay)
        await anyio.wait_all_tasks_blocked()
        assert mirror_end.send_nowait(b"GET /one HTTP/1.1\r\n\r\n")
        assert data() == [b"GET /one HTTP/1.1\r\n\r\n"] and relay_end.unread == 0
        daemon.is_ready = False  # the daemon is behind: the pipe keeps the bytes
        assert mirror_end.send_nowait(b"two")
        assert relay_end.unread == 3 and len(data()) == 1
        daemon.is_ready = True
        assert mirror_end.send_nowait(b"three")  # behind what is unread, never before it
        assert relay_end.unread == 8
        await anyio.wait_all_tasks_blocked()  # the relay's task takes them, in order
        assert b"".join(data()) == b"GET /one HTTP/1.1\r\n\r\ntwothree"
        assert relay_end.unread == 0
        left = 100 - len(b"".join(data()))  # of the window
        big = b"x" * 100  # more than the window holds: the task sends some, then waits
        assert mirror_end.send_nowait(big)
        await anyio.wait_all_tasks_blocked()
        assert b"".join(data()).endswith(b"x" * left) and relay_end.unread == 100 - left
        relays.receive(m.Credit(conn_id=3, amount=100))
        await anyio.wait_all_tasks_blocked()
        assert b"".join(data()).endswith(big) and relay_end.unread == 0
        relays.abort_all()


async def test_a_read_waiting_while_bytes_were_handed_over_stays_within_the_window() -> None:
    """The relay's task waits to read up to the whole window; bytes handed over directly
    meanwhile spend part of it: what the task then reads beyond the window goes back into
    the pipe until the daemon credits it (a Data beyond the window breaks the protocol)."""
    daemon = _DaemonSide()
    relays = ChannelRelays(daemon, 1, 100)
    writer, relay_end = pipe_pair(names=("filter", "relay"))
    relay = relays.add(5, relay_end, "conn 5")

    def sent() -> int:
        return sum(len(x.data) for x in daemon.sent if isinstance(x, m.Data))

    async with anyio.create_task_group() as tg:
        tg.start_soon(relays.run, relay)
        await anyio.wait_all_tasks_blocked()  # the task waits to read up to 100 bytes
        assert writer.send_nowait(b"a" * 60)  # handed over: 40 left of the window
        assert sent() == 60
        assert writer.send_nowait(b"b" * 80)  # more than the window: queued, the task reads
        await anyio.wait_all_tasks_blocked()
        assert sent() == 100 and relay_end.unread == 40
        relays.receive(m.Credit(conn_id=5, amount=100))
        await anyio.wait_all_tasks_blocked()
        assert sent() == 140 and relay_end.unread == 0
        data = b"".join(x.data for x in daemon.sent if isinstance(x, m.Data))
        assert data == b"a" * 60 + b"b" * 80
        relays.abort_all()
