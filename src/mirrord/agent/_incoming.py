"""Incoming traffic of the target, glued to the agent's channels (I3): mirror, steal, filter.

Owns: `IncomingService`, which the agent core constructs with its `AgentContext` and runs as
a task. It keeps the subscriptions (port -> mirroring channels; port -> the stealing channel or
the filtered channels), the sniffer (`_mirror.py`) and its reader, the steal listener and the
rules (`_steal.py`, applied by the guard process), and one task per stolen connection.
Does not own: the relay of a connection to the daemon (`Channel.start_incoming`, agent core),
HTTP parsing (`_http_filter.py`) or rule syntax (`_steal.py`).

Routing
-------
- Mirror: a flow to a mirrored port is cut into HTTP/1.x requests (the filter's splitter):
  each request becomes a connection of its own to every channel mirroring that port whose
  HTTP filter (if any) matches it, carrying exactly the client's bytes of that request, then
  EOF — so every request of a kept-alive connection reaches the user app, even an app that
  answers `Connection: close`. A flow that is not HTTP stays one byte stream (to the channels
  without a filter); after an `Upgrade` request the rest of the flow follows that request's
  connections. Writes (the user app's replies) are discarded. A consumer that falls more than
  `MIRROR_BUFFER` behind loses that connection (closed with ENOBUFS) rather than stalling
  the sniffer for everyone.
- Unfiltered steal: the accepted socket itself goes to the stealing channel.
- Filtered steal: the connection is parsed request by request. A request that a channel's
  filter matches (first subscriber first) becomes an `IncomingConnection` of its own carrying
  exactly the client's bytes; the response is read back and written to the client. Other
  requests go to the pod's app over one connection to the original destination, opened from
  inside the pod with `SO_MARK` so our own OUTPUT rule lets it through. Responses are written
  in request order (pipelining). After a matched `Upgrade` that the app accepts, the rest of
  the connection is relayed whole. HTTP/2 with prior knowledge is routed stream by stream
  (`_incoming_h2.py`). Other bytes that are not HTTP/1.x go to the pod's app untouched.
- A connection made straight to the agent's listener (not redirected: its original
  destination is the listener itself) is reset at once, never relayed: relaying it to its
  original destination would connect to the listener again, in a loop. The steal rules
  refuse such connections in the kernel already (`_steal.py`); this check is the agent's own.
- A connection that arrives for a port nobody steals any more (the rule was just removed) is
  relayed to the pod's app, so ending a steal resets nothing.

Options (environment of the agent process, since the agent's command line is fixed by I2):
`MIRRORD_AGENT_STEAL_BACKEND` (`auto`, `iptables-nft`, `iptables-legacy`, `nft`), else the
config's `MIRRORD_AGENT_NFTABLES` (true: nft, false: iptables-legacy);
`MIRRORD_AGENT_CLEAN_IPTABLES` or `MIRRORD_AGENT_CLEAN_IPTABLES_ON_START` (`1`/`true`: remove
stale rules of dead agents at start; otherwise they are reported as Subscribe warnings);
`MIRRORD_AGENT_PROBE_PORTS` (the target's HTTP probe ports, for the probe warning);
`MIRRORD_AGENT_STEAL_GUARD_RESTARTS` (how often a dead steal guard is replaced, default 3).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread

from mirrord.agent._http2_filter import could_be_h2_preface, h2c_upgrade_from
from mirrord.agent._http_filter import (
    CLOSED,
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
    kube_probe_recipe,
)
from mirrord.agent._incoming_h2 import pod_app_sent_h2_settings, serve_h2, serve_h2c_upgrade
from mirrord.agent._incoming_netns import make_listener, make_marked_socket, original_dst
from mirrord.agent._incoming_pipe import PipeEnd, pipe_pair
from mirrord.agent._mirror import FlowClosed, FlowData, FlowOpened, PacketSniffer
from mirrord.agent._steal import AGENT_MARK, AGENT_MARK_SNIFFED, StealRules, StealRulesError
from mirrord.agent._steal_guard import remove_all
from mirrord.protocol import Message
from mirrord.protocol import messages as m

__all__ = ["IncomingService", "SubscribeError"]

log = logging.getLogger("mirrord.agent.incoming")

# Bytes a mirroring channel may lag behind, per flow. A burst on a fast link (a 10 MB upload
# arrives in ~20 ms over a veth) outruns the relay to the user app for a while: at 8 MiB one
# upload in three was dropped although the app read as fast as it could.
MIRROR_BUFFER = 32 * 1024 * 1024
STATS_INTERVAL = 2.0  # seconds between TrafficStats
MAX_PIPELINE = 32  # requests of one client connection in flight at once
UPSTREAM_CONNECT_TIMEOUT = 5.0
# A matched request is kept (up to this size) until its session connection is accepted, so
# that it can go to the pod's app instead when the user app stopped listening meanwhile.
REPLAY_LIMIT = 1024 * 1024
_READ = 256 * 1024
_REFUSED_LOG_EVERY = 1000  # connections made straight to the listener: log one in this many
_BAD_GATEWAY = (
    b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
    b"connection: close\r\n\r\n%s"
)


class SubscribeError(OSError):
    """A Subscribe the agent refuses; errno and message go to the session as ErrorReply."""


class IncomingChannel(Protocol):
    """What the service needs of a channel (the agent core's `Channel`)."""

    number: int

    def start_incoming(
        self,
        *,
        port: int,
        remote_address: str,
        remote_port: int,
        local_address: str,
        local_port: int,
        mode: str,
        stream: anyio.abc.ByteStream,
    ) -> int: ...

    async def send(self, msg: Message) -> None: ...


class _Runner(Protocol):
    def run_sync(self, fn: Callable[[], Any]) -> Any: ...


@dataclass
class _PortSteal:
    unfiltered: Any | None = None  # the channel that steals every connection
    filtered: dict[Any, HttpFilter] = field(default_factory=dict)  # channel -> filter, in order

    @property
    def empty(self) -> bool:
        return self.unfiltered is None and not self.filtered

    def route(self, head: RequestHead) -> Any | None:
        for channel, flt in self.filtered.items():
            if flt.matches(head):
                return channel
        return None


def _max_guard_restarts() -> int:
    """`MIRRORD_AGENT_STEAL_GUARD_RESTARTS`: how often a dead steal guard is replaced (default
    3; a guard killed again and again, e.g. by the OOM killer, then ends the steals)."""
    value = os.environ.get("MIRRORD_AGENT_STEAL_GUARD_RESTARTS", "").strip()
    return int(value) if value.isdigit() else 3


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def _probe_ports_from_env() -> set[int]:
    """`MIRRORD_AGENT_PROBE_PORTS`: the target's HTTP probe ports, comma separated."""
    ports: set[int] = set()
    for item in os.environ.get("MIRRORD_AGENT_PROBE_PORTS", "").replace(";", ",").split(","):
        if item.strip().isdigit():
            ports.add(int(item))
    return ports


def _backend_from_env() -> str:
    """`MIRRORD_AGENT_STEAL_BACKEND` names a backend; else the config's `agent.nftables`
    (`MIRRORD_AGENT_NFTABLES`): true is nft, false is iptables-legacy; else detect."""
    backend = os.environ.get("MIRRORD_AGENT_STEAL_BACKEND", "").strip()
    if backend:
        return backend
    nft = os.environ.get("MIRRORD_AGENT_NFTABLES", "").strip().lower()
    if nft in ("1", "true", "yes", "on"):
        return "nft"
    if nft in ("0", "false", "no", "off"):
        return "iptables-legacy"
    return "auto"


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


class IncomingService:
    """Mirror and steal for one agent. See the module docstring for the routing rules."""

    def __init__(
        self,
        ctx: Any,
        *,
        steal_backend: str | None = None,
        clean_iptables_on_start: bool | None = None,
        probe_ports: Callable[[], set[int]] | None = None,
    ) -> None:
        self.ctx = ctx
        self.pid: int = ctx.pid
        self.netns: _Runner = ctx.netns
        self.steal_backend = steal_backend or _backend_from_env()
        self.clean_stale = (
            clean_iptables_on_start
            if clean_iptables_on_start is not None
            else _env_flag("MIRRORD_AGENT_CLEAN_IPTABLES")
            or _env_flag("MIRRORD_AGENT_CLEAN_IPTABLES_ON_START")
        )
        # Ports the target's HTTP probes use: local targets have none; the Kubernetes side
        # knows them from the pod spec and passes them (or MIRRORD_AGENT_PROBE_PORTS).
        self.probe_ports: Callable[[], set[int]] = probe_ports or _probe_ports_from_env
        self._tg: anyio.abc.TaskGroup | None = None
        self._lock = anyio.Lock()  # subscribe/unsubscribe change rules one at a time
        self.mirrors: dict[int, list[Any]] = {}
        self.steals: dict[int, _PortSteal] = {}
        self._sniffer: PacketSniffer | None = None
        self._sniffer_scope: anyio.CancelScope | None = None
        # (channel, port) -> its mirror's HTTP filter (None: every request, and non-HTTP too)
        self.mirror_filters: dict[tuple[Any, int], HttpFilter | None] = {}
        self._flow_tables: list[dict[int, _MirrorFlow]] = []  # one per sniffer
        self._rules: StealRules | None = None
        self._rules_ports: dict[int, int] = {}
        self._guard_watched = False
        self.max_guard_restarts = _max_guard_restarts()
        self._listener: anyio.abc.SocketListener | None = None
        self._listener_port = 0
        self._accept_scope: anyio.CancelScope | None = None
        self.stolen_live = 0
        self.stats: dict[str, int] = {
            "stolen": 0,
            "filtered_requests": 0,
            "passed_to_pod": 0,
            "mirrored_flows": 0,
            "mirror_overflows": 0,
            "replayed_to_pod": 0,
            "refused_direct": 0,
        }
        self._sent_stats: dict[tuple[Any, int], tuple[int, int]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<IncomingService pid={self.pid} mirror={sorted(self.mirrors)} "
            f"steal={sorted(self.steals)} live={self.stolen_live} rules={self._rules!r}>"
        )

    # ------------------------------------------------------------------ lifecycle

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._stats_loop)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                await self._teardown()

    async def aclose(self) -> None:
        self._closed = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._teardown()

    async def _teardown(self) -> None:
        self.mirrors.clear()
        self.steals.clear()
        self.mirror_filters.clear()
        for flows in self._flow_tables:
            for flow in flows.values():
                for end in flow.ends:
                    end.close_nowait()
            flows.clear()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.aclose()
            self._listener = None
        rules, self._rules = self._rules, None
        sniffer, self._sniffer = self._sniffer, None
        if rules is not None:
            await anyio.to_thread.run_sync(rules.close)
        if sniffer is not None:
            sniffer.close()

    def _require_tg(self) -> anyio.abc.TaskGroup:
        if self._tg is None or self._closed:
            raise SubscribeError(errno.ESHUTDOWN, "the agent's incoming service is not running")
        return self._tg

    # ------------------------------------------------------------------ subscriptions (I3)

    async def subscribe(
        self,
        channel: Any,
        port: int,
        mode: str,
        http_filter: dict[str, Any] | None,
        *,
        on_concurrent_steal: str = "abort",
    ) -> list[str]:
        """Mirror or steal `port` for `channel`; returns warnings for the session. Raises
        `SubscribeError` (errno EINVAL, EADDRINUSE, EPERM, EIO...) when refused."""
        self._require_tg()
        if http_filter is not None and all(
            v is None for k, v in http_filter.items() if k != "ports"
        ):
            http_filter = None  # the config's empty filter object: no filter
        async with self._lock:
            if mode == "mirror":
                return await self._subscribe_mirror(channel, port, http_filter)
            if mode == "steal":
                return await self._subscribe_steal(
                    channel, port, http_filter, override=on_concurrent_steal == "override"
                )
        raise SubscribeError(errno.EINVAL, f"incoming mode {mode!r} is not mirror or steal")

    async def unsubscribe(self, channel: Any, port: int) -> None:
        async with self._lock:
            await self._drop(channel, port)

    async def channel_closed(self, channel: Any) -> None:
        async with self._lock:
            ports = {p for p, chans in self.mirrors.items() if channel in chans}
            ports |= {
                p
                for p, s in self.steals.items()
                if s.unfiltered is channel or channel in s.filtered
            }
            for port in sorted(ports):
                await self._drop(channel, port)

    async def _drop(self, channel: Any, port: int) -> None:
        chans = self.mirrors.get(port)
        self._sent_stats.pop((channel, port), None)
        self.mirror_filters.pop((channel, port), None)
        if chans is not None and channel in chans:
            chans.remove(channel)
            if not chans:
                del self.mirrors[port]
            await self._update_sniffer()
        steal = self.steals.get(port)
        if steal is not None:
            if steal.unfiltered is channel:
                steal.unfiltered = None
            steal.filtered.pop(channel, None)
            if steal.empty:
                del self.steals[port]
                await self._update_rules()

    # -- mirror

    async def _subscribe_mirror(
        self, channel: Any, port: int, http_filter: dict[str, Any] | None
    ) -> list[str]:
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
        return []

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

    async def _stats_loop(self) -> None:
        while True:
            await anyio.sleep(STATS_INTERVAL)
            await self.send_stats()

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

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats)
        out["stolen_live"] = self.stolen_live
        if self._sniffer is not None:
            out["sniffer"] = {
                "packets": self._sniffer.packets,
                "kernel_drops": self._sniffer.drops,
                "flows": self._sniffer.reassembler.flows,
            }
        return out

    # -- steal

    async def _subscribe_steal(
        self, channel: Any, port: int, http_filter: dict[str, Any] | None, *, override: bool = False
    ) -> list[str]:
        warnings: list[str] = []
        flt: HttpFilter | None = None
        if http_filter is not None:
            try:
                flt = HttpFilter.from_config(http_filter)
            except FilterError as exc:
                raise SubscribeError(errno.EINVAL, f"bad http_filter: {exc}") from None
            if not flt.applies_to(port):
                flt = None  # `ports` leaves this one to an unfiltered steal
        steal = self.steals.get(port)
        if steal is not None:
            others = [
                c for c in [steal.unfiltered, *steal.filtered] if c is not None and c is not channel
            ]
            if flt is None and others and not override:
                raise SubscribeError(
                    errno.EADDRINUSE,
                    f"port {port} is already stolen by another session; an unfiltered steal "
                    "would take its traffic. Use an http_filter, stop the other session, or "
                    'set feature.network.incoming.on_concurrent_steal to "override"',
                )
            if flt is not None and steal.unfiltered is not None and steal.unfiltered is not channel:
                raise SubscribeError(
                    errno.EADDRINUSE,
                    f"port {port} is stolen whole (no filter) by another session; a filtered "
                    "steal cannot share it until that session ends",
                )
        else:
            steal = self.steals[port] = _PortSteal()
        if flt is None:
            if override:
                for other in [steal.unfiltered, *steal.filtered]:
                    if other is not None and other is not channel:
                        warnings.append("took the steal over from another session")
                steal.filtered.clear()
            steal.unfiltered = channel
        else:
            if steal.unfiltered is channel:
                steal.unfiltered = None
            if any(c is not channel and repr(f) == repr(flt) for c, f in steal.filtered.items()):
                # Two developers with the same filter (a copied config): the first gets every
                # matching request, and the second would wonder why it gets none.
                warnings.append(
                    "another session already steals this port with the same HTTP filter: it "
                    "gets every request that matches (the first subscriber wins), this session "
                    "none until it ends. Use a filter of your own (e.g. a header only your "
                    "requests carry)"
                )
            steal.filtered[channel] = flt
        try:
            await self._update_rules()
        except OSError as exc:
            await self._drop(channel, port)
            raise SubscribeError(
                exc.errno or errno.EIO, f"cannot steal port {port}: {exc}"
            ) from None
        if self._rules is not None:
            for name in self._rules.stale:
                warnings.append(
                    f"stale steal rules of a dead agent found in the target ({name}); they may "
                    "redirect traffic to nowhere. Set agent.clean_iptables_on_start to remove "
                    "them at the next start"
                )
            self._rules.stale = []
        if port in self.probe_ports() and (flt is None or flt.matches(_PROBE_HEAD)):
            recipe = kube_probe_recipe()["header_filter"]
            warnings.append(
                "the pod's HTTP probes use this port: stolen probes fail when the user app "
                "does not answer them, and the pod may be restarted. Leave them to the "
                f'pod with "http_filter": {{"header_filter": "{recipe}"}}'
            )
        return warnings

    async def _update_rules(self) -> None:
        wanted = sorted(self.steals)
        if wanted:
            if self._listener is None:
                sock = await anyio.to_thread.run_sync(self.netns.run_sync, make_listener)
                self._listener_port = sock.getsockname()[1]
                self._listener = await anyio.abc.SocketListener.from_socket(sock)
                tg = self._require_tg()
                await tg.start(self._accept_loop, self._listener)
            if self._rules is None:
                self._rules = StealRules(
                    target_pid=self.pid, backend=self.steal_backend, clean_stale=self.clean_stale
                )
        redirects = {p: self._listener_port for p in wanted}
        if self._rules is None or redirects == self._rules_ports:
            return
        rules = self._rules
        if rules.guard_pid is not None and not rules.running:
            await self._guard_died(rules)  # (its watcher is waiting for this lock)
            if self._rules is not rules:
                raise StealRulesError(errno.EIO, "the steal guard died and could not be restarted")
        await anyio.to_thread.run_sync(rules.set_redirects, redirects)
        if not self._guard_watched:
            self._guard_watched = True
            self._require_tg().start_soon(self._watch_guard, rules)
        self._rules_ports = redirects
        if not redirects:
            await self._clear_rules_if_unused()

    async def _watch_guard(self, rules: StealRules) -> None:
        """Notice at once when the guard process dies (killed, OOM): rules with nobody to
        remove them must not outlive the agent. See `_guard_died`."""
        while not rules.closed:
            pid = rules.guard_pid
            if pid is None:
                return
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                fd = -1
            try:
                if fd >= 0:
                    await anyio.wait_readable(fd)
            finally:
                if fd >= 0:
                    os.close(fd)
            async with self._lock:
                if rules is not self._rules or rules.closed:
                    return
                if rules.guard_pid == pid and not rules.running:
                    await self._guard_died(rules)

    async def _guard_died(self, rules: StealRules) -> None:
        """The guard died while the agent lives (called with `_lock` held). Start a new one
        that takes the rules over (up to `max_guard_restarts` times); failing that, remove the
        rules from here and fail every steal subscription loudly: each stealing channel gets
        `Fatal(steal_lost)`, which its session reports."""
        log.error(
            "the steal guard (pid %s) died: %s",
            rules.guard_pid,
            "starting a new one" if rules.restarts < self.max_guard_restarts else "giving up",
        )
        if rules.restarts < self.max_guard_restarts:
            try:
                await anyio.to_thread.run_sync(rules.restart)
                # What is wanted now (a change may have failed with the old guard), replacing
                # whatever the old guard left.
                wanted = {p: self._listener_port for p in self.steals}
                await anyio.to_thread.run_sync(rules.set_redirects, wanted)
                self._rules_ports = wanted
                log.warning("the steal guard was restarted (pid %s)", rules.guard_pid)
                if not wanted:
                    await self._clear_rules_if_unused()
                return
            except OSError as exc:
                log.error("the steal guard could not be restarted: %s", exc)
        tag, backend = rules.tag, rules.backend or "iptables-nft"
        self._rules = None
        self._rules_ports = {}
        self._guard_watched = False
        await anyio.to_thread.run_sync(rules.close)
        await anyio.to_thread.run_sync(self.netns.run_sync, lambda: remove_all(tag, backend))
        reason = (
            "the agent's steal guard died and could not be restarted; its rules were removed "
            "and this channel's steal subscriptions ended (see the agent's log)"
        )
        failed: list[Any] = []
        for port, steal in sorted(self.steals.items()):
            for channel in [steal.unfiltered, *steal.filtered]:
                if channel is not None and channel not in failed:
                    failed.append(channel)
            log.error("steal of port %d ended: the steal guard is gone", port)
        self.steals.clear()
        for channel in failed:
            fail = getattr(channel, "fail", None)
            if fail is not None:
                await fail("steal_lost", reason)

    async def _maybe_clear_rules(self) -> None:
        async with self._lock:
            await self._clear_rules_if_unused()

    async def _clear_rules_if_unused(self) -> None:
        """Remove the pin (and so every chain) once nothing is stolen and no stolen connection
        is left: removing it earlier would reset those connections (see `_steal.py`). Called
        with `_lock` held, so no Subscribe installs rules meanwhile."""
        if self.steals or self.stolen_live or self._rules is None:
            return
        rules = self._rules
        with contextlib.suppress(OSError):
            await anyio.to_thread.run_sync(rules.clear)

    async def _accept_loop(
        self, listener: anyio.abc.SocketListener, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        task_status.started()
        tg = self._require_tg()
        while True:
            try:
                stream = await listener.accept()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            except OSError as exc:
                # Out of descriptors or memory: back off rather than spin or die.
                log.warning("accept failed: %s; retrying", exc)
                await anyio.sleep(0.1)
                continue
            tg.start_soon(self._serve_stolen_safely, stream)

    async def _serve_stolen_safely(self, stream: anyio.abc.SocketStream) -> None:
        # One connection's failure (a bug, a peer breaking HTTP in a way we did not foresee)
        # ends that connection only, never the service or the agent.
        try:
            await self._serve_stolen(stream)
        except Exception as exc:
            log.error("stolen connection failed: %r", exc, exc_info=exc)
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.aclose()

    async def _serve_stolen(self, stream: anyio.abc.SocketStream) -> None:
        raw: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        try:
            dst_addr, dst_port = original_dst(raw)
            peer = raw.getpeername()
            # OUTPUT REDIRECT (the pod talking to itself) lands on 127.0.0.1, PREROUTING on
            # the incoming interface's address; only the latter was seen by the sniffer.
            sniffed = not str(raw.getsockname()[0]).startswith("127.")
        except OSError:
            await stream.aclose()
            return
        if dst_port == self._listener_port or (dst_addr, dst_port) == raw.getsockname():
            # Made straight to our listener, not redirected: relaying it "to the pod's app"
            # at its original destination would connect to ourselves, again and again.
            self._refuse_direct(raw, peer)
            await stream.aclose()
            return
        self.stolen_live += 1
        try:
            steal = self.steals.get(dst_port)
            if steal is not None and steal.unfiltered is not None:
                try:
                    steal.unfiltered.start_incoming(
                        port=dst_port,
                        remote_address=peer[0],
                        remote_port=peer[1],
                        local_address=dst_addr,
                        local_port=dst_port,
                        mode="steal",
                        stream=_Watched(stream, self),
                    )
                    self.stats["stolen"] += 1
                    self.stolen_live += 1  # released by _Watched.aclose
                    return
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    pass  # the channel closed just now: the pod's app answers
            conn = _FilteredConnection(
                self, stream, (peer[0], peer[1]), (dst_addr, dst_port), sniffed=sniffed
            )
            await conn.run()
        finally:
            self.stolen_live -= 1
            if not self.stolen_live:
                await self._maybe_clear_rules()

    def _refuse_direct(self, raw: socket.socket, peer: Any) -> None:
        """Reset a connection made straight to the steal listener (see "listener" in
        `_steal.py`); the first of every `_REFUSED_LOG_EVERY` is logged."""
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.stats["refused_direct"] += 1
        if self.stats["refused_direct"] % _REFUSED_LOG_EVERY == 1:
            log.warning(
                "refused a connection from %s:%s made straight to the steal listener (port %d), "
                "not redirected by the steal rules (%d so far)",
                peer[0],
                peer[1],
                self._listener_port,
                self.stats["refused_direct"],
            )

    def _released(self) -> None:
        self.stolen_live -= 1
        if not self.stolen_live and not self.steals and self._tg is not None:
            self._tg.start_soon(self._maybe_clear_rules)

    async def connect_upstream(
        self, address: tuple[str, int], *, sniffed: bool = False
    ) -> anyio.abc.SocketStream:
        """A connection to the pod's own app at the original destination, from inside the
        pod, marked so that our OUTPUT rule does not send it back to us. `sniffed`: it
        repeats a client the mirror's sniffer saw already (its mark keeps the sniffer off)."""
        mark = AGENT_MARK_SNIFFED if sniffed else AGENT_MARK
        sock = await anyio.to_thread.run_sync(self.netns.run_sync, lambda: make_marked_socket(mark))

        def connect() -> None:
            sock.settimeout(UPSTREAM_CONNECT_TIMEOUT)
            sock.connect(address)
            sock.setblocking(False)

        try:
            await anyio.to_thread.run_sync(connect)
            return await anyio.abc.SocketStream.from_socket(sock)
        except BaseException:
            sock.close()
            raise


_PROBE_HEAD = RequestHead(
    method="GET",
    target="/healthz",
    http_version="1.1",
    headers=(("host", "pod"), ("user-agent", "kube-probe/1.30"), ("accept", "*/*")),
    upgrade=False,
)


class _Watched(anyio.abc.ByteStream):
    """A stolen socket handed to a channel: tells the service when the relay closes it, so the
    conntrack pin is removed only after the last stolen connection."""

    def __init__(self, stream: anyio.abc.SocketStream, service: IncomingService) -> None:
        self._stream = stream
        self._service = service
        self._released = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if not self._released:
                self._released = True
                self._service._released()

    @property
    def extra_attributes(self) -> Any:
        return self._stream.extra_attributes


# ---------------------------------------------------------------- filtered connections


@dataclass
class _Exchange:
    """One request of a filtered connection and where its response comes from."""

    head: RequestHead | None
    dest: Any  # PipeEnd (a session) or the upstream stream; None: no upstream (502)
    session: bool
    upstream: _Upstream | None = None  # when `dest` is the pod's app: its connection
    tunnel: bool = False  # not a request: relay `dest` -> client until EOF
    switched: bool | None = None
    decided: anyio.Event = field(default_factory=anyio.Event)
    # A session's request as sent so far (None: too big to keep, or not all of it is HTTP),
    # and whether the client has sent all of it (`complete` is set either way at the end).
    replay: bytearray | None = field(default_factory=bytearray)
    whole: bool = False
    complete: anyio.Event = field(default_factory=anyio.Event)

    async def send_request(self, raw: bytes) -> None:
        """Bytes of this request to where it goes (kept for a replay while small)."""
        if self.session and self.replay is not None:
            if len(self.replay) + len(raw) > REPLAY_LIMIT:
                self.replay = None
            else:
                self.replay += raw
        await self.dest.send(raw)

    def request_done(self, whole: bool) -> None:
        self.whole = whole
        self.complete.set()


def _closed_by_peer(stream: anyio.abc.ByteStream) -> bool:
    """Has the peer closed this (idle) connection? A peek that does not consume anything."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if raw is None:
        return False
    try:
        return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class _Upstream:
    """The connection to the pod's app shared by a client connection's unmatched requests,
    with the bytes read past the end of the previous response."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.leftover = b""
        self.broken = False


class _FilteredConnection:
    def __init__(
        self,
        service: IncomingService,
        client: anyio.abc.SocketStream,
        remote: tuple[str, int],
        original: tuple[str, int],
        *,
        sniffed: bool = False,
    ) -> None:
        self.service = service
        self.sniffed = sniffed
        self.client = client
        self.remote = remote
        self.original = original
        self.port = original[1]
        self.upstream: _Upstream | None = None
        self._upstream_failed: str | None = None
        self._upstream_lock = anyio.Lock()
        self._old_upstreams: list[_Upstream] = []
        self._client_spoke = False
        self._server_first = False
        self._watch_scope: anyio.CancelScope | None = None
        self._reading: list[_Exchange] = []  # requests whose bytes are still coming in

    async def run(self) -> None:
        send_ex, recv_ex = anyio.create_memory_object_stream[_Exchange](MAX_PIPELINE)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_server_first, send_ex.clone())
                tg.start_soon(self._read_client, send_ex)
                await self._write_client(recv_ex)
                # The responses are done (or the connection must end): stop reading too.
                tg.cancel_scope.cancel()
        except* (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # one side went away: the whole exchange ends, for that client only
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self.client.aclose()
                for up in [*self._old_upstreams, *([self.upstream] if self.upstream else [])]:
                    with contextlib.suppress(Exception):
                        await up.stream.aclose()

    async def _watch_server_first(self, send_ex: anyio.abc.ObjectSendStream[_Exchange]) -> None:
        """Connect to the pod's app at once; if it speaks before the client does (SMTP, MySQL,
        any server-first protocol), the connection is not HTTP: relay it whole, both ways."""
        async with send_ex:
            with anyio.CancelScope() as scope:
                self._watch_scope = scope
                up = await self._get_upstream()
                if up is None or self._client_spoke:
                    return
                raw: socket.socket = up.stream.extra(anyio.abc.SocketAttribute.raw_socket)
                await anyio.wait_readable(raw)
            self._watch_scope = None
            if scope.cancel_called or self._client_spoke or up is None:
                return
            if pod_app_sent_h2_settings(raw):
                return  # an HTTP/2 app greets first: the client's bytes decide
            self._server_first = True
            await send_ex.send(_Exchange(head=None, dest=up, session=False, tunnel=True))

    def _client_speaks(self) -> None:
        # No await between the check in the watcher and this: whoever is first wins.
        self._client_spoke = True
        if self._watch_scope is not None:
            self._watch_scope.cancel()
            self._watch_scope = None

    async def _get_upstream(self) -> _Upstream | None:
        async with self._upstream_lock:
            up = self.upstream
            if up is not None and not up.broken and _closed_by_peer(up.stream):
                up.broken = True  # the app closed its idle keep-alive connection
            if up is not None and not up.broken:
                return up
            if up is not None:
                # Not closed here: a response may still be read from it; closed at the end.
                self._old_upstreams.append(up)
                self.upstream = None
            if self._upstream_failed is not None:
                return None
            try:
                stream = await self.service.connect_upstream(self.original, sniffed=self.sniffed)
            except OSError as exc:
                self._upstream_failed = f"{exc.strerror or exc}"
                return None
            self.upstream = _Upstream(stream)
            return self.upstream

    def _open_session(self, channel: Any) -> PipeEnd | None:
        ours, theirs = pipe_pair(names=("filter", "channel"))
        try:
            channel.start_incoming(
                port=self.port,
                remote_address=self.remote[0],
                remote_port=self.remote[1],
                local_address=self.original[0],
                local_port=self.port,
                mode="steal",
                stream=theirs,
            )
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return None
        return ours

    async def _read_client(self, send_ex: anyio.abc.ObjectSendStream[_Exchange]) -> None:
        splitter = RequestSplitter()
        try:
            await self._read_requests(send_ex, splitter)
        finally:
            # A request cut short (client gone, parse error) is never replayed; and nobody
            # may wait for it forever.
            for ex in self._reading:
                ex.request_done(False)
            self._reading.clear()

    async def _read_requests(
        self, send_ex: anyio.abc.ObjectSendStream[_Exchange], splitter: RequestSplitter
    ) -> None:
        current: _Exchange | None = None
        tunnel_dest: Any = None
        async with send_ex:
            while True:
                try:
                    data = await self.client.receive(_READ)
                except anyio.EndOfStream:
                    data = b""
                if not self._client_spoke:
                    if self._server_first and self.upstream is not None:
                        tunnel_dest = self.upstream.stream
                    self._client_speaks()
                if tunnel_dest is not None:
                    if not data:
                        with contextlib.suppress(Exception):
                            await tunnel_dest.send_eof()
                        return
                    await tunnel_dest.send(data)
                    continue
                splitter.receive_data(data)
                while True:
                    ev = splitter.next_event()
                    if ev is NEED_DATA:
                        break
                    if ev is CLOSED:
                        if current is not None and current.dest is not None:
                            # The client half-closed inside a request (a body cut short): its
                            # server must see that EOF too, or both wait for each other.
                            with contextlib.suppress(Exception):
                                await current.dest.send_eof()
                        return
                    if isinstance(ev, RequestStarted):
                        if current is None and splitter.requests == 1:
                            upgrade = h2c_upgrade_from(ev.head)
                            if upgrade and await serve_h2c_upgrade(self, upgrade, splitter):
                                return  # switched to HTTP/2: routed stream by stream there
                        current = await self._route(ev.head)
                        self._reading.append(current)
                        await send_ex.send(current)
                        if current.dest is not None:
                            await current.send_request(ev.raw)
                    elif isinstance(ev, RequestBody | RequestEnded):
                        if current is not None and current.dest is not None and ev.raw:
                            await current.send_request(ev.raw)
                        if isinstance(ev, RequestEnded) and current is not None:
                            self._reading.remove(current)
                            current.request_done(True)
                        if isinstance(ev, RequestEnded) and ev.head.upgrade:
                            assert current is not None
                            await current.decided.wait()
                            splitter.switched(bool(current.switched))
                            if current.switched:
                                tunnel_dest = current.dest
                        if isinstance(ev, RequestEnded):
                            current = None
                    elif isinstance(ev, Passthrough):
                        if (
                            current is None
                            and not splitter.requests
                            and could_be_h2_preface(ev.raw)
                        ):
                            # HTTP/2 with prior knowledge: routed stream by stream there.
                            rest = await serve_h2(self, ev.raw)
                            if rest is None:
                                return
                            ev = Passthrough(rest)
                        # Not HTTP (or no longer): the rest goes untouched to where the current
                        # request went, else to the pod's app, and its answer comes back whole.
                        if current is not None and current.dest is not None:
                            current.replay = None  # not all HTTP: never replayed
                            tunnel_dest = current.dest
                        else:
                            up = await self._get_upstream()
                            tunnel_dest = up.stream if up is not None else None
                            await send_ex.send(
                                _Exchange(head=None, dest=up, session=False, tunnel=True)
                            )
                        if tunnel_dest is None:
                            return
                        await tunnel_dest.send(ev.raw)
                if tunnel_dest is not None and not data:
                    with contextlib.suppress(Exception):
                        await tunnel_dest.send_eof()
                    return
                if not data:
                    return

    async def _route(self, head: RequestHead) -> _Exchange:
        steal = self.service.steals.get(self.port)
        channel = steal.route(head) if steal is not None else None
        if channel is not None:
            end = self._open_session(channel)
            if end is not None:
                self.service.stats["filtered_requests"] += 1
                return _Exchange(head=head, dest=end, session=True)
        self.service.stats["passed_to_pod"] += 1
        up = await self._get_upstream()
        return _Exchange(
            head=head, dest=up.stream if up is not None else None, session=False, upstream=up
        )

    async def _write_client(self, recv_ex: anyio.abc.ObjectReceiveStream[_Exchange]) -> None:
        async with recv_ex:
            async for ex in recv_ex:
                if ex.tunnel:
                    up = ex.dest
                    if up is None:
                        return
                    if up.leftover:
                        await self.client.send(up.leftover)
                    await self._copy(up.stream)
                    return
                keep = await self._one_response(ex)
                if not keep:
                    return
        with contextlib.suppress(Exception):
            await self.client.send_eof()

    async def _replay_to_pod(
        self, ex: _Exchange, source: anyio.abc.ByteStream
    ) -> anyio.abc.ByteStream | None:
        """The session refused a matched request because the user app stopped listening (it
        exited, the session is ending): the app never saw it, so the pod's app answers it,
        as it will the next requests once the subscription is gone. Returns the stream the
        response comes from, or None (then the client gets 502 as before)."""
        if not isinstance(source, PipeEnd) or source.peer_errno != errno.ECONNREFUSED:
            return None
        await ex.complete.wait()  # the rest of a refused request is read (and dropped) fast
        if ex.replay is None or not ex.whole:
            return None
        try:
            stream = await self.service.connect_upstream(self.original, sniffed=self.sniffed)
        except OSError:
            return None
        self._old_upstreams.append(_Upstream(stream))  # closed with the client connection
        request, ex.replay = bytes(ex.replay), None
        await stream.send(request)
        ex.dest = stream  # an accepted Upgrade is relayed to it
        self.service.stats["replayed_to_pod"] += 1
        log.info(
            "port %d: a matched request went to the pod's app: the user app no longer listens",
            self.port,
        )
        return stream

    async def _copy(self, source: anyio.abc.ByteStream) -> None:
        while True:
            try:
                data = await source.receive(_READ)
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            await self.client.send(data)

    async def _one_response(self, ex: _Exchange) -> bool:
        """Write the response of `ex` to the client; False when the connection must end."""
        assert ex.head is not None
        if ex.dest is None:
            ex.switched = False
            ex.decided.set()
            body = f"mirrord: the pod's app on port {self.port} is unreachable: {self._upstream_failed}\n".encode()
            await self.client.send(_BAD_GATEWAY % (len(body), body))
            return False
        up = ex.upstream
        source: anyio.abc.ByteStream = ex.dest
        splitter = ResponseSplitter(ex.head)
        pending = b""
        if up is not None:
            pending, up.leftover = up.leftover, b""
        wrote = False
        try:
            while True:
                if pending:
                    splitter.receive_data(pending)
                    pending = b""
                ended: ResponseEnded | None = None
                while True:
                    try:
                        ev = splitter.next_event()
                    except ResponseError:
                        # Not a valid response: pass what is left through and relay the rest.
                        rest = splitter.trailing
                        if rest:
                            await self.client.send(rest)
                        ex.switched = False
                        ex.decided.set()
                        await self._copy(source)
                        return False
                    if ev is NEED_DATA:
                        break
                    assert not isinstance(ev, type(NEED_DATA))
                    if ev.raw:  # type: ignore[union-attr]
                        await self.client.send(ev.raw)  # type: ignore[union-attr]
                        wrote = True
                        ex.replay = None  # answered: never replayed, no need to keep it
                    if isinstance(ev, ResponseEnded):
                        ended = ev
                        break
                if ended is not None:
                    break
                try:
                    pending = await source.receive(_READ)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    if not wrote and ex.session:
                        replacement = await self._replay_to_pod(ex, source)
                        if replacement is not None:
                            source = replacement
                            continue
                    splitter.receive_data(b"")
                    pending = b""
                    # A close-delimited response ends here; anything else was cut short.
                    try:
                        ev = splitter.next_event()
                    except ResponseError:
                        ev = NEED_DATA
                    if isinstance(ev, ResponseEnded):
                        if ev.raw:
                            await self.client.send(ev.raw)
                        ended = ev
                        break
                    if not wrote:
                        body = b"mirrord: the app closed the connection without a response\n"
                        await self.client.send(_BAD_GATEWAY % (len(body), body))
                    ex.switched = False
                    ex.decided.set()
                    return False
        except BaseException:
            if up is not None:
                up.broken = True
            ex.switched = False
            ex.decided.set()
            raise
        ex.switched = ended.switched
        ex.decided.set()
        trailing = splitter.trailing
        if ended.switched:
            if trailing:
                await self.client.send(trailing)
            await self._copy(source)
            return False
        if ex.session:
            await source.aclose()  # one request per session connection: the relay ends
        elif up is not None:
            up.leftover = trailing
            if not ended.keep_alive:
                up.broken = True
        return ended.keep_alive
