"""The mirror half of the agent's incoming traffic: sniffed flows cut into requests and copied
to every mirroring channel.

Owns: `IncomingMirror`, which `IncomingService` (`_incoming.py`) holds and calls with its lock
held. It keeps the mirror subscriptions (port -> mirroring channels, (channel, port) -> HTTP
filter), the sniffer (`_mirror.py`) and its reader task, one `_MirrorFlow` per sniffed flow,
and the `TrafficStats` sent to the mirroring channels.
Does not own: the packet capture and TCP reassembly (`_mirror.py`), HTTP parsing
(`_http_filter.py`), the relay of a mirrored connection to the daemon
(`Channel.start_incoming`, agent core), or the order of subscription changes (the service's
lock).

A flow to a mirrored port is cut into HTTP/1.x requests (the filter's splitter): each request
becomes a connection of its own to every channel mirroring that port whose HTTP filter (if
any) matches it, carrying exactly the client's bytes of that request, then EOF, so every
request of a kept-alive connection reaches the user app, even an app that answers
`Connection: close`. A flow that is not HTTP stays one byte stream (to the channels without a
filter); after an `Upgrade` request the rest of the flow follows that request's connections.
Writes (the user app's replies) are discarded. A consumer that falls more than
`MIRROR_BUFFER` behind loses that connection (closed with ENOBUFS) rather than stalling the
sniffer for everyone.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from mirrord.agent._exceptions import SubscribeError
from mirrord.agent._http_filter import (
    FilterError,
    HttpFilter,
    Passthrough,
    RequestBody,
    RequestEnded,
    RequestHead,
    RequestSplitter,
    RequestStarted,
)
from mirrord.agent._incoming_netns import SyncRunner
from mirrord.agent._incoming_pipe import PipeEnd, pipe_pair
from mirrord.agent._mirror import FlowClosed, FlowData, FlowOpened, PacketSniffer
from mirrord.agent._steal import AGENT_MARK_SNIFFED
from mirrord.protocol import messages as m

__all__ = ["MIRROR_BUFFER", "IncomingMirror"]

log = logging.getLogger("mirrord.agent.incoming")

# Bytes a mirroring channel may lag behind, per flow. A burst on a fast link (a 10 MB upload
# arrives in ~20 ms over a veth) outruns the relay to the user app for a while: at 8 MiB one
# upload in three was dropped although the app read as fast as it could.
MIRROR_BUFFER = 32 * 1024 * 1024


@dataclass
class _MirrorFlow:
    """One sniffed flow of a mirrored port: its requests (cut by the splitter) and the
    mirroring connections of the request (or byte stream) in progress."""

    key: tuple[str, int, str, int]  # (client, client port, pod address, port)
    channels: list[tuple[Any, HttpFilter | None]]  # the port's mirrors when the flow opened
    splitter: RequestSplitter = field(default_factory=RequestSplitter)
    ends: list[PipeEnd] = field(default_factory=list)
    fresh: bool = False  # `ends` were opened with the flow and carry nothing yet
    passthrough: bool = False  # not HTTP: one byte stream


class IncomingMirror:
    """Mirror subscriptions and the sniffer of one agent. `stats` is the service's counter
    table (`mirrored_flows`, `mirror_overflows` are counted here); `require_tg` gives the
    service's task group or raises `SubscribeError` when the service is not running."""

    def __init__(
        self,
        netns: SyncRunner,
        stats: dict[str, int],
        require_tg: Callable[[], anyio.abc.TaskGroup],
    ) -> None:
        self.netns = netns
        self.stats = stats
        self._require_tg = require_tg
        self.mirrors: dict[int, list[Any]] = {}
        # (channel, port) -> its mirror's HTTP filter (None: every request, and non-HTTP too)
        self.mirror_filters: dict[tuple[Any, int], HttpFilter | None] = {}
        self._sniffer: PacketSniffer | None = None
        self._sniffer_scope: anyio.CancelScope | None = None
        self._flow_tables: list[dict[int, _MirrorFlow]] = []  # one per sniffer
        self._sent_stats: dict[tuple[Any, int], tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"<IncomingMirror ports={sorted(self.mirrors)} sniffer={self._sniffer is not None}>"

    def ports_of(self, channel: Any) -> set[int]:
        return {p for p, chans in self.mirrors.items() if channel in chans}

    def clear_nowait(self) -> PacketSniffer | None:
        """Forget every subscription and end every flow's connections; returns the sniffer for
        the caller to close."""
        self.mirrors.clear()
        self.mirror_filters.clear()
        for flows in self._flow_tables:
            for flow in flows.values():
                for end in flow.ends:
                    end.close_nowait()
            flows.clear()
        sniffer, self._sniffer = self._sniffer, None
        return sniffer

    async def subscribe(self, channel: Any, port: int, http_filter: dict[str, Any] | None) -> None:
        flt: HttpFilter | None = None
        if http_filter is not None:
            try:
                flt = HttpFilter.from_config(http_filter)
            except FilterError as exc:
                raise SubscribeError(errno.EINVAL, str(exc)) from None
            if not flt.applies_to(port):
                flt = None  # the filter's ports do not include this one: mirror it whole
        self.mirror_filters[(channel, port)] = flt
        chans = self.mirrors.setdefault(port, [])
        if channel not in chans:
            chans.append(channel)
        try:
            await self._update_sniffer()
        except OSError as exc:
            chans.remove(channel)
            self.mirror_filters.pop((channel, port), None)
            if not chans:
                del self.mirrors[port]
            raise SubscribeError(
                exc.errno or errno.EIO,
                f"cannot sniff port {port} in the target's network namespace: {exc} "
                "(the agent needs CAP_NET_RAW and CAP_NET_ADMIN)",
            ) from None

    async def drop(self, channel: Any, port: int) -> None:
        chans = self.mirrors.get(port)
        self._sent_stats.pop((channel, port), None)
        self.mirror_filters.pop((channel, port), None)
        if chans is not None and channel in chans:
            chans.remove(channel)
            if not chans:
                del self.mirrors[port]
            await self._update_sniffer()

    async def _update_sniffer(self) -> None:
        ports = set(self.mirrors)
        if not ports:
            if self._sniffer_scope is not None:
                self._sniffer_scope.cancel()
            # Forget it now: a Subscribe right after gets a fresh sniffer, not this one that
            # its task is about to close.
            self._sniffer = None
            self._sniffer_scope = None
            return
        if self._sniffer is None:
            runner = self.netns
            # The agent's own connections to the target's app that repeat what a client
            # outside the pod sent (unmatched filtered requests) are not mirrored: the
            # sniffer saw those bytes arrive already.
            self._sniffer = await anyio.to_thread.run_sync(
                lambda: PacketSniffer(runner.run_sync, exclude_mark=AGENT_MARK_SNIFFED)
            )
            tg = self._require_tg()
            await tg.start(self._sniff, self._sniffer)
        sniffer = self._sniffer
        await anyio.to_thread.run_sync(sniffer.set_ports, ports)

    async def _sniff(
        self, sniffer: PacketSniffer, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        # this sniffer's flows (flow ids are per sniffer) -> their requests and connections
        flows: dict[int, _MirrorFlow] = {}
        self._flow_tables.append(flows)
        with anyio.CancelScope() as scope:
            self._sniffer_scope = scope
            task_status.started()
            try:
                while True:
                    # Short waits: cancellation (unsubscribe, shutdown) is noticed within one.
                    events = await anyio.to_thread.run_sync(sniffer.read_batch, 0.1)
                    if events and self._sniffer is sniffer:
                        # (a replaced sniffer's last batch is dropped: its successor sees
                        # the same packets and delivers them)
                        self._deliver(events, flows)
            except Exception as exc:
                # The mirror stops (its flows end); steal and the rest of the agent go on.
                log.error("the mirror's sniffer failed: %r", exc, exc_info=exc)
            finally:
                if self._sniffer is sniffer:
                    self._sniffer = None
                    self._sniffer_scope = None
                sniffer.close()
                for flow in flows.values():
                    for end in flow.ends:
                        end.send_eof_nowait()
                flows.clear()
                self._flow_tables.remove(flows)

    def _deliver(self, events: list[Any], flows: dict[int, _MirrorFlow]) -> None:
        """Sniffer events -> connections to the mirroring channels. Never waits."""
        for ev in events:
            if isinstance(ev, FlowData):
                flow = flows.get(ev.flow)
                if flow is not None:
                    flow.splitter.receive_data(ev.data)
                    self._mirror_events(flow)
            elif isinstance(ev, FlowOpened):
                dport = ev.key[3]
                chans = [
                    (c, self.mirror_filters.get((c, dport))) for c in self.mirrors.get(dport, [])
                ]
                if not chans:
                    continue
                flow = _MirrorFlow(key=ev.key, channels=chans)
                # Unfiltered channels get their connection at once, as the pod's app does
                # (a client may wait for the server to speak first); it carries the first
                # request, or the whole flow if it is not HTTP.
                flow.ends = self._open_mirror(flow, None)
                flow.fresh = True
                self.stats["mirrored_flows"] += 1
                flows[ev.flow] = flow
            elif isinstance(ev, FlowClosed):
                flow = flows.pop(ev.flow, None)
                if flow is None:
                    continue
                if not ev.reset:
                    flow.splitter.receive_data(b"")
                    self._mirror_events(flow)
                for end in flow.ends:
                    if ev.reset:
                        end.close_nowait()
                    else:
                        end.send_eof_nowait()
                flow.ends = []

    def _mirror_events(self, flow: _MirrorFlow) -> None:
        """What the splitter cut from a flow's new bytes, to the mirroring connections."""
        while True:
            event = flow.splitter.next_event()
            if isinstance(event, RequestStarted):
                if flow.fresh:  # the connections opened with the flow carry this request
                    flow.fresh = False
                    flow.ends += self._open_mirror(flow, event.head, filtered_only=True)
                else:
                    for end in flow.ends:  # (an Upgrade's tunnel ended by a new request)
                        end.send_eof_nowait()
                    flow.ends = self._open_mirror(flow, event.head)
                self._mirror_send(flow, event.raw)
            elif isinstance(event, RequestBody):
                self._mirror_send(flow, event.raw)
            elif isinstance(event, RequestEnded):
                self._mirror_send(flow, event.raw)
                if event.head.upgrade:
                    # The pod's app's answer is not ours to see: follow the upgrade (the rest
                    # of the flow goes to this request's connections, as a tunnel).
                    flow.splitter.switched(True)
                    continue
                for end in flow.ends:
                    end.send_eof_nowait()
                flow.ends = []
            elif isinstance(event, Passthrough):
                if flow.fresh:
                    flow.fresh = False
                elif not flow.ends and not flow.passthrough:
                    flow.ends = self._open_mirror(flow, None)
                flow.passthrough = True
                self._mirror_send(flow, event.raw)
            else:  # NEED_DATA, CLOSED
                return

    def _open_mirror(
        self, flow: _MirrorFlow, head: RequestHead | None, *, filtered_only: bool = False
    ) -> list[PipeEnd]:
        """New connections for a request (`head`) or a byte stream (None) of `flow`: to the
        channels whose filter matches the request (a byte stream: those without a filter)."""
        src, sport, dst, dport = flow.key
        ends: list[PipeEnd] = []
        for channel, flt in flow.channels:
            if flt is None and filtered_only:
                continue
            if flt is not None and (head is None or not flt.matches(head)):
                continue
            ours, theirs = pipe_pair(MIRROR_BUFFER, ("mirror", "channel"))
            ours.discard_peer_writes()
            try:
                conn_id = channel.start_incoming(
                    port=dport,
                    remote_address=src,
                    remote_port=sport,
                    local_address=dst,
                    local_port=dport,
                    mode="mirror",
                    stream=theirs,
                )
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                continue
            fail = getattr(channel, "fail_incoming", None)
            if fail is not None:
                ours.on_abort = functools.partial(fail, conn_id)
            ends.append(ours)
        return ends

    def _mirror_send(self, flow: _MirrorFlow, data: bytes) -> None:
        if not data:
            return
        for end in list(flow.ends):
            try:
                fits = end.send_nowait(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                flow.ends.remove(end)
                continue
            if not fits:
                self.stats["mirror_overflows"] += 1
                log.warning(
                    "a mirroring channel fell behind on port %d: connection dropped", flow.key[3]
                )
                # ENOBUFS reaches the daemon (ConnClose), which tells the session.
                end.abort(errno.ENOBUFS)
                flow.ends.remove(end)

    async def send_stats(self) -> None:
        """TrafficStats to every mirroring channel whose counters changed. `drops` are the
        kernel's drops of the whole sniffer socket (it cannot tell them apart by port)."""
        sniffer = self._sniffer
        if sniffer is None:
            return
        totals = await anyio.to_thread.run_sync(sniffer.statistics)
        for port, chans in list(self.mirrors.items()):
            figures = (sniffer.per_port.get(port, 0), totals["drops"])
            for channel in list(chans):
                if self._sent_stats.get((channel, port)) == figures:
                    continue
                self._sent_stats[(channel, port)] = figures
                with contextlib.suppress(Exception):
                    await channel.send(
                        m.TrafficStats(port=port, packets=figures[0], drops=figures[1])
                    )

    def statistics(self) -> dict[str, Any] | None:
        """The sniffer's counters, or None when nothing is mirrored."""
        if self._sniffer is None:
            return None
        return {
            "packets": self._sniffer.packets,
            "kernel_drops": self._sniffer.drops,
            "flows": self._sniffer.reassembler.flows,
        }
