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

    def send_nowait(self, msg: Message) -> None:
        self.sent.append(msg)
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_ready(self) -> None:
        await anyio.lowlevel.checkpoint()

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
