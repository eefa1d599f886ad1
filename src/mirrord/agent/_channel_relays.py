"""A channel's relayed connections: the agent's side of the shared relay table.

Owns: building one `FlowRelay` (the engine shared with the daemon, docs/relay.md) per
connection of a channel, outgoing (even conn ids, the daemon's) or incoming (odd, the
agent's), TCP or UDP, with the agent's window and read size; telling the incoming code why
its stream ended (`PipeEnd.abort`). The table itself, the routing of the daemon's `Data` /
`Credit` / `Shutdown` / `ConnClose` and what a broken rule of the daemon's costs (that
connection: `ConnClose(EPROTO)`) are `mirrord._relay.RelayTable`'s. Does not own: making the
sockets (`_outgoing.py`, the incoming code), the requests that start them (`_channel.py`),
the flow's rules (`mirrord.protocol.Flow`), or the relay tasks' I/O (`FlowRelay`).
"""

from __future__ import annotations

import anyio.abc

from mirrord._relay import CONN_MESSAGES, FlowRelay, RelayLink, RelayTable
from mirrord.agent._incoming_pipe import PipeEnd
from mirrord.protocol import Flow
from mirrord.protocol import messages as m

__all__ = ["CONN_MESSAGES", "ChannelRelays"]

# The most one Data carries from a relayed socket: one read of the socket per message, and
# the daemon's write of it to the user app is one system call.
_READ_CHUNK = 256 * 1024


class ChannelRelays(RelayTable):
    """The relays of channel `number`; `link` (the channel) carries their messages."""

    def __init__(self, link: RelayLink, number: int, initial_window: int) -> None:
        super().__init__(link, f"channel {number}")
        self.number = number
        self._window = initial_window

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
        return self.register(FlowRelay(flow, self.link, stream, description=description))

    def receive(self, msg: m.Data | m.Credit | m.Shutdown | m.ConnClose) -> FlowRelay | None:
        relay = super().receive(msg)
        if (
            relay is not None
            and isinstance(msg, m.ConnClose)
            and msg.errno
            and isinstance(relay.stream, PipeEnd)
        ):
            # The user app's side was reset: the incoming code learns why at once
            # (ECONNREFUSED: the app never got the bytes, so the target's app may answer).
            relay.stream.abort(msg.errno)
        return relay

    def abort_all(self) -> list[tuple[FlowRelay, int]]:
        """End every relay without telling the daemon (the channel is gone). A stream from the
        incoming code learns why: ECONNREFUSED when the daemon never credited a byte (its
        user app never saw the connection, so the target's app may answer instead)."""
        aborted = super().abort_all()  # those that had ended (e.g. refused) told theirs
        for relay, errno_ in aborted:
            if isinstance(relay.stream, PipeEnd):
                relay.stream.abort(errno_)
        return aborted
