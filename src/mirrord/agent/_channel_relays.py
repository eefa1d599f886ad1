"""A channel's relayed connections: the table of their relays and the daemon's messages to them.

Owns: one `FlowRelay` (the engine shared with the daemon, docs/relay.md) per connection of a
channel, outgoing (even conn ids, the daemon's) or incoming (odd, the agent's), TCP or UDP;
routing the daemon's `Data` / `Credit` / `Shutdown` / `ConnClose` to them; what a broken rule
of the daemon's costs (that connection, reset on both sides: `ConnClose(EPROTO)`); telling
the incoming code why its stream ended (`PipeEnd.abort`); forgetting each relay when it ends.
Does not own: making the sockets (`_outgoing.py`, the incoming code), the requests that
start them (`_channel.py`), the flow's rules (`mirrord.protocol.Flow`), or the relay tasks'
I/O (`mirrord._relay.FlowRelay`).
"""

from __future__ import annotations

import errno
import logging

import anyio.abc

from mirrord._relay import FlowRelay, RelayLink
from mirrord.agent._incoming_pipe import PipeEnd
from mirrord.protocol import Flow, FlowState, RemoteProtocolError
from mirrord.protocol import messages as m

__all__ = ["CONN_MESSAGES", "ChannelRelays"]

log = logging.getLogger("mirrord.agent")

# The most one Data carries from a relayed socket: one read of the socket per message, and
# the daemon's write of it to the user app is one system call.
_READ_CHUNK = 256 * 1024
# The daemon's messages for one of the channel's connections.
CONN_MESSAGES = (m.Data, m.Credit, m.Shutdown, m.ConnClose)


class ChannelRelays:
    """The relays of channel `number`; `link` (the channel) carries their messages."""

    def __init__(self, link: RelayLink, number: int, initial_window: int) -> None:
        self._link = link
        self.number = number
        self._window = initial_window
        self._relays: dict[int, FlowRelay] = {}

    def __repr__(self) -> str:
        return f"<ChannelRelays channel={self.number} conns={len(self._relays)}>"

    def __len__(self) -> int:
        return len(self._relays)

    def __contains__(self, conn_id: int) -> bool:
        return conn_id in self._relays

    def get(self, conn_id: int) -> FlowRelay | None:
        return self._relays.get(conn_id)

    def add(
        self,
        conn_id: int,
        stream: anyio.abc.ByteStream | anyio.abc.ConnectedUDPSocket,
        description: str,
    ) -> FlowRelay:
        """A relay for connection `conn_id` over `stream` (its task: `run`)."""
        flow = Flow(
            conn_id,
            window=self._window,
            max_chunk=_READ_CHUNK,
            datagram=isinstance(stream, anyio.abc.ConnectedUDPSocket),
        )
        relay = FlowRelay(flow, self._link, stream, description=description)
        self._relays[conn_id] = relay
        return relay

    async def run(self, relay: FlowRelay) -> None:
        """`relay`'s task: relay until the connection ends, then forget it."""
        try:
            await relay.run()
        finally:
            conn_id = relay.flow.conn_id
            if self._relays.get(conn_id) is relay:
                del self._relays[conn_id]

    def receive(self, msg: m.Data | m.Credit | m.Shutdown | m.ConnClose) -> None:
        """One of the daemon's messages for a connection (dropped when the connection ended
        here while it was on its way)."""
        relay = self._relays.get(msg.conn_id)
        if relay is None:
            return
        before = relay.flow.state
        try:
            relay.receive(msg)
        except RemoteProtocolError as exc:
            # The daemon broke this connection's rules (Data after its Shutdown, or beyond the
            # window): the connection is reset on both sides, the channel goes on.
            log.warning("channel %d: %s: the connection is reset", self.number, exc.message)
            if before is not FlowState.DRAINING:  # the daemon's side is still there
                self._link.send_nowait(m.ConnClose(conn_id=msg.conn_id, errno=errno.EPROTO))
            return
        if isinstance(msg, m.ConnClose) and msg.errno and isinstance(relay.stream, PipeEnd):
            # The user app's side was reset: the incoming code learns why at once
            # (ECONNREFUSED: the app never got the bytes, so the target's app may answer).
            relay.stream.abort(msg.errno)

    def fail(self, conn_id: int, errno_: int) -> None:
        """Give connection `conn_id` up: the daemon is told `ConnClose(errno_)` at once."""
        relay = self._relays.get(conn_id)
        if relay is not None:
            relay.fail(errno_)

    def abort_all(self) -> None:
        """End every relay without telling the daemon (the channel is gone). A stream from the
        incoming code learns why: ECONNREFUSED when the daemon never credited a byte (its
        user app never saw the connection, so the target's app may answer instead)."""
        for relay in list(self._relays.values()):
            told = relay.flow.finished  # ended already (e.g. refused): its stream was told why
            errno_ = relay.abort()
            if isinstance(relay.stream, PipeEnd) and not told:
                relay.stream.abort(errno_)
