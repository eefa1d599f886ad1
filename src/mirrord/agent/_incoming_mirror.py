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

A flow to a mirrored port is cut into HTTP/1.x requests (the filter's splitter); each
mirroring channel whose HTTP filter (if any) matches a request gets it on that channel's one
connection for the flow (`_MirrorConn`), in order, as the client sent them. The user app's
answers come back (`IncomingConnection.replies`) and are parsed only to know which requests it
answered: when it ends the connection (`Connection: close`, an HTTP/1.0 server, a plain
close), the requests sent on it that it did not answer are sent again on a new connection, so
every request of a kept-alive connection reaches the user app, even one that closes after each
answer. (One connection per request, as this was for a while, cost the user app an accept, a
thread and the daemon a connect per request: the mirror kept up with a tenth of the pod's rate.)
A flow that is not HTTP stays one byte stream (to the channels without a filter); after an
`Upgrade` request the rest of the flow follows that request's connection. A consumer that falls
more than `MIRROR_BUFFER` behind loses that connection (closed with ENOBUFS) rather than
stalling the sniffer for everyone.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from mirrord.agent._exceptions import SubscribeError
from mirrord.agent._http2_detect import could_be_h2_preface
from mirrord.agent._http_filter import (
    NEED_DATA,
    FilterError,
    HttpFilter,
    Passthrough,
    RequestBody,
    RequestEnded,
    RequestHead,
    RequestSplitter,
    RequestStarted,
    ResponseEnded,
    ResponseError,
    ResponseSplitter,
    ResponseStarted,
)
from mirrord.agent._incoming_netns import SyncRunner
from mirrord.agent._incoming_pipe import PipeEnd, pipe_pair
from mirrord.agent._mirror import EXPIRE_EVERY, FlowClosed, FlowData, FlowOpened, PacketSniffer
from mirrord.agent._mirror_h2 import MirrorH2Flow
from mirrord.agent._steal import AGENT_MARK_SNIFFED
from mirrord.protocol import messages as m

__all__ = ["MIRROR_BUFFER", "IncomingMirror"]

log = logging.getLogger("mirrord.agent.incoming")

# Bytes a mirroring channel may lag behind, per flow. A burst on a fast link (a 10 MB upload
# arrives in ~20 ms over a veth) outruns the relay to the user app for a while: at 8 MiB one
# upload in three was dropped although the app read as fast as it could.
MIRROR_BUFFER = 32 * 1024 * 1024
# A request is kept for sending again (its connection ended before the user app answered it)
# while it is at most this big, as a filtered steal keeps a request it could not deliver.
REPLAY_LIMIT = 1024 * 1024
# Unanswered requests one mirrored connection keeps; past it the oldest is forgotten (a daemon
# that does not relay the answers back would otherwise make the list grow for ever).
MAX_UNANSWERED = 64
# Times one request is sent again before it is given up (a user app that closes every
# connection without answering would otherwise get it for ever).
MAX_REPLAYS = 3
# After the client's side of a flow ended, how long the user app may take to answer what it
# was sent before its connection is closed (the agent stops reading it).
ANSWER_WAIT = 60.0


class _Sent:
    """A request sent on a mirrored connection and not answered yet: its head (to parse the
    answer) and its bytes (None once past REPLAY_LIMIT), to send it again."""

    __slots__ = ("chunks", "head", "replays", "size")

    def __init__(self, head: RequestHead) -> None:
        self.head = head
        self.chunks: list[bytes] | None = []
        self.size = 0
        self.replays = 0

    def keep(self, data: bytes) -> None:
        if self.chunks is not None:
            self.size += len(data)
            if self.size > REPLAY_LIMIT:
                self.chunks = None
            else:
                self.chunks.append(data)


class _MirrorConn:
    """One mirroring channel's connection to its user app for one flow: the requests of the
    flow that the channel gets go on it one after another; the user app's answers are read
    back (`_read_answers`) only to know which requests it answered."""

    __slots__ = ("end", "ended", "flow", "index", "tunnel", "unanswered", "usable")

    def __init__(self, flow: _MirrorFlow, index: int, end: PipeEnd) -> None:
        self.flow = flow
        self.index = index  # the channel's place in `flow.channels`
        self.end = end
        self.unanswered: collections.deque[_Sent] = collections.deque()
        self.usable = True  # False once the user app ends it: no new request goes on it
        self.tunnel = False  # a byte stream (not HTTP, or after an Upgrade): answers not parsed
        self.ended = False  # the flow ended: EOF sent

    def __repr__(self) -> str:
        return (
            f"<_MirrorConn {self.end.name} unanswered={len(self.unanswered)} "
            f"usable={self.usable} tunnel={self.tunnel} ended={self.ended}>"
        )


@dataclass
class _MirrorFlow:
    """One sniffed flow of a mirrored port: its requests (cut by the splitter), each
    channel's connection, and the connections of the request (or byte stream) in progress."""

    key: tuple[str, int, str, int]  # (client, client port, pod address, port)
    channels: list[tuple[Any, HttpFilter | None]]  # the port's mirrors when the flow opened
    splitter: RequestSplitter = field(default_factory=RequestSplitter)
    conns: list[_MirrorConn | None] = field(default_factory=list)  # per channel
    current: list[_MirrorConn] = field(default_factory=list)  # what the next bytes go on
    fresh: bool = False  # the connections opened with the flow carry nothing yet
    passthrough: bool = False  # not HTTP: one byte stream
    h2: MirrorH2Flow | None = None  # HTTP/2: its streams, for the channels with a filter


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
                self._end_flow(flow, reset=True, stop=True)
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
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._expire_idle, sniffer, flows)
                    while True:
                        # Read on the loop, no thread hop: a drain never blocks, and stops
                        # at MAX_BATCH frames to let the other tasks run before the next.
                        if sniffer.full:
                            await anyio.lowlevel.checkpoint()
                        else:
                            await anyio.wait_readable(sniffer.fileno())
                        events = sniffer.drain()
                        if events and self._sniffer is sniffer:
                            # (a replaced sniffer's last batch is dropped: its successor
                            # sees the same packets and delivers them)
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
                    self._end_flow(flow, reset=False)
                flows.clear()
                self._flow_tables.remove(flows)

    async def _expire_idle(self, sniffer: PacketSniffer, flows: dict[int, _MirrorFlow]) -> None:
        """End the flows that saw no packet for FLOW_IDLE_TIMEOUT, also while none arrive,
        unless the target still has their connection."""
        while True:
            await anyio.sleep(EXPIRE_EVERY)
            if not sniffer.expiry_due():
                continue
            try:
                live = await anyio.to_thread.run_sync(sniffer.live_connections)
            except OSError as exc:  # the namespace's thread is gone: the target with it
                log.debug("the target's connections could not be read: %r", exc)
                live = set()
            events = sniffer.expire_idle(live=live)
            if events and self._sniffer is sniffer:
                self._deliver(events, flows)

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
                flow = _MirrorFlow(key=ev.key, channels=chans, conns=[None] * len(chans))
                # Unfiltered channels get their connection at once, as the pod's app does
                # (a client may wait for the server to speak first); it carries the flow's
                # requests, or the whole flow if it is not HTTP.
                for index, (_, flt) in enumerate(chans):
                    if flt is None:
                        conn = self._open_conn(flow, index)
                        if conn is not None:
                            flow.current.append(conn)
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
                self._end_flow(flow, reset=ev.reset)

    def _end_flow(self, flow: _MirrorFlow, *, reset: bool, stop: bool = False) -> None:
        """The client's side of `flow` ended (or, `stop`, the mirror stops: every connection
        closes at once): EOF (or a reset) to every connection; a connection still waiting for
        answers is closed by its reader."""
        if flow.h2 is not None:
            flow.h2.close(reset=reset)
        flow.current = []
        for conn in flow.conns:
            if conn is None or conn.ended:
                continue
            conn.ended = True
            # EOF, after a reset too (the user app sees the same either way): the answers it
            # gives to what it has still count (its reader waits `ANSWER_WAIT` for them), so a
            # request it answered is not sent again, whether its answer or the client's reset
            # came first (closing at once dropped an answer not read yet)
            conn.end.send_eof_nowait()
            if stop or not conn.unanswered:
                # nothing to wait for: the user app's answers are of no more use
                conn.end.close_nowait()

    def _mirror_events(self, flow: _MirrorFlow) -> None:
        """What the splitter cut from a flow's new bytes, to the mirroring connections."""
        while True:
            event = flow.splitter.next_event()
            if isinstance(event, RequestStarted):
                flow.fresh = False
                flow.current = self._conns_for(flow, event.head)
                for conn in flow.current:
                    conn.unanswered.append(_Sent(event.head))
                    if len(conn.unanswered) > MAX_UNANSWERED:
                        conn.unanswered.popleft()
                self._mirror_send(flow, event.raw)
            elif isinstance(event, RequestBody):
                self._mirror_send(flow, event.raw)
            elif isinstance(event, RequestEnded):
                self._mirror_send(flow, event.raw)
                if event.head.upgrade:
                    # The pod's app's answer is not ours to see: follow the upgrade (the rest
                    # of the flow goes to this request's connections, as a tunnel).
                    flow.splitter.switched(True)
                    for conn in flow.current:
                        conn.tunnel = True
                        conn.usable = False
                    continue
                flow.current = []
            elif isinstance(event, Passthrough):
                if flow.fresh:
                    flow.fresh = False
                    flow.h2 = self._h2_flow(flow, event.raw)
                elif not flow.current and not flow.passthrough:
                    flow.current = self._conns_for(flow, None)
                for conn in flow.current:
                    conn.tunnel = True
                    conn.usable = False
                flow.passthrough = True
                self._mirror_send(flow, event.raw)
                if flow.h2 is not None:
                    flow.h2.receive(event.raw)
            else:  # NEED_DATA, CLOSED
                return

    def _conns_for(self, flow: _MirrorFlow, head: RequestHead | None) -> list[_MirrorConn]:
        """The connections a request (`head`) or a byte stream (None) of `flow` goes on: of
        the channels whose filter matches the request (a byte stream: those without a
        filter), each channel's connection for the flow, a new one if the user app ended the
        last."""
        conns: list[_MirrorConn] = []
        for index, (_, flt) in enumerate(flow.channels):
            if flt is not None and (head is None or not flt.matches(head)):
                continue
            conn = flow.conns[index]
            if conn is None or not conn.usable:
                conn = self._open_conn(flow, index)
                if conn is None:
                    continue
            conns.append(conn)
        return conns

    def _open_conn(self, flow: _MirrorFlow, index: int) -> _MirrorConn | None:
        """A new connection of `flow` to channel `index`, whose answers a task reads."""
        ends = self._open_mirror(flow, [flow.channels[index][0]], replies=True)
        if not ends:
            return None
        conn = _MirrorConn(flow, index, ends[0])
        try:
            self._require_tg().start_soon(self._read_answers, conn)
        except SubscribeError:  # the service is stopping
            conn.end.close_nowait()
            return None
        flow.conns[index] = conn
        return conn

    async def _read_answers(self, conn: _MirrorConn) -> None:
        """Reads the user app's answers on `conn` until it ends the connection, counting the
        requests answered; then sends the unanswered ones again on a new connection."""
        splitter: ResponseSplitter | None = None
        answering = False  # the app started answering `conn.unanswered[0]`
        try:
            while True:
                try:
                    if conn.ended:
                        with anyio.fail_after(ANSWER_WAIT):
                            data = await conn.end.receive()
                    else:  # (no cancel scope per answer while the flow goes on)
                        data = await conn.end.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                except TimeoutError:
                    conn.unanswered.clear()  # a user app that answers nothing: not sent again
                    return
                while data and conn.unanswered and not conn.tunnel:
                    if splitter is None:
                        splitter = ResponseSplitter(conn.unanswered[0].head)
                        answering = False
                    splitter.receive_data(data)
                    data = b""
                    try:
                        event = splitter.next_event()
                        while event is not NEED_DATA:
                            if isinstance(event, ResponseStarted) and not event.informational:
                                answering = True
                            elif isinstance(event, ResponseEnded):
                                conn.unanswered.popleft()
                                data = splitter.trailing
                                splitter = None
                                if event.switched:
                                    conn.tunnel = True
                                    conn.usable = False
                                elif not event.keep_alive:
                                    conn.usable = False
                                    self._replay(conn, skip_first=False)
                                    return
                                break
                            event = splitter.next_event()
                    except ResponseError:
                        # not an HTTP answer: nothing more can be counted on this connection
                        conn.tunnel = True
                        conn.usable = False
                        conn.unanswered.clear()
                if conn.ended and not conn.unanswered:
                    return
        finally:
            conn.usable = False
            if conn.unanswered:
                self._replay(conn, skip_first=answering)
            conn.end.close_nowait()

    def _replay(self, conn: _MirrorConn, *, skip_first: bool) -> None:
        """The user app ended `conn`: its unanswered requests (but one it started answering)
        go again, in order, on a new connection of the same flow and channel (and the request
        in progress, if it was one of them, goes on there)."""
        flow = conn.flow
        todo = list(conn.unanswered)
        conn.unanswered.clear()
        if skip_first and todo:
            todo.pop(0)
        in_progress: _Sent | None = None  # the request whose bytes are still coming
        if conn in flow.current:
            flow.current.remove(conn)
            in_progress = todo[-1] if todo else None
        if flow.conns[conn.index] is conn:
            flow.conns[conn.index] = None
        # (one past REPLAY_LIMIT or MAX_REPLAYS is given up: the rest of it goes nowhere)
        todo = [s for s in todo if s.chunks is not None and s.replays < MAX_REPLAYS]
        if conn.tunnel or not todo:
            return
        new = self._open_conn(flow, conn.index)
        if new is None:
            return
        self.stats["mirror_replays"] += len(todo)
        for sent in todo:
            sent.replays += 1
            new.unanswered.append(sent)
            for chunk in sent.chunks or ():
                if not new.end.send_nowait(chunk):
                    new.unanswered.clear()
                    new.usable = False
                    new.end.abort(errno.ENOBUFS)
                    return
        if in_progress is not None and in_progress in todo:
            flow.current.append(new)
        if conn.ended:
            new.ended = True
            new.end.send_eof_nowait()

    def _h2_flow(self, flow: _MirrorFlow, first: bytes) -> MirrorH2Flow | None:
        """A flow whose first bytes (not HTTP/1) may be the HTTP/2 preface: its streams are
        copied to the channels with a filter, each matching stream on a connection of its own
        (`_mirror_h2.py`). Channels without a filter keep the whole byte stream."""
        if not could_be_h2_preface(first) or all(f is None for _, f in flow.channels):
            return None

        def spawn(run: Any) -> None:
            try:
                self._require_tg().start_soon(run)
            except SubscribeError:  # the service is stopping: nothing to copy to
                pass

        def open_copies(head: RequestHead) -> list[PipeEnd]:
            chans = [c for c, f in flow.channels if f is not None and f.matches(head)]
            return self._open_mirror(flow, chans, replies=True)

        return MirrorH2Flow(open_copies, spawn, MIRROR_BUFFER)

    def _open_mirror(
        self, flow: _MirrorFlow, channels: list[Any], *, replies: bool
    ) -> list[PipeEnd]:
        """New connections of `flow` to `channels`. `replies`: the caller reads what the
        user app writes, else it is discarded."""
        src, sport, dst, dport = flow.key
        ends: list[PipeEnd] = []
        for channel in channels:
            ours, theirs = pipe_pair(MIRROR_BUFFER, ("mirror", "channel"))
            if not replies:
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
                    replies=replies,
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
        for conn in list(flow.current):
            end = conn.end
            try:
                fits = end.send_nowait(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                conn.usable = False
                if conn.unanswered and not conn.tunnel:
                    # the user app ended it: this request (so far) goes on a new connection
                    conn.unanswered[-1].keep(data)
                    self._replay(conn, skip_first=False)
                elif conn in flow.current:
                    flow.current.remove(conn)
                continue
            if not fits:
                self.stats["mirror_overflows"] += 1
                log.warning(
                    "a mirroring channel fell behind on port %d: connection dropped", flow.key[3]
                )
                # ENOBUFS reaches the daemon (ConnClose), which tells the session.
                conn.unanswered.clear()
                conn.usable = False
                end.abort(errno.ENOBUFS)
                flow.current.remove(conn)
                if flow.conns[conn.index] is conn:
                    flow.conns[conn.index] = None
            elif conn.unanswered and not conn.tunnel:
                conn.unanswered[-1].keep(data)

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
