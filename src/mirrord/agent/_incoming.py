"""Incoming traffic of the target, glued to the agent's channels: mirror, steal, filter.

Owns: `IncomingService`, which the agent core constructs with its `AgentContext` and runs as
a task. It keeps the subscriptions (port -> the stealing channel or the filtered channels;
the mirror's are kept by its `IncomingMirror`, `_incoming_mirror.py`), the steal listener and
the rules (`_steal.py`, applied by the guard process), and one task per stolen connection.
Does not own: the relay of a connection to the daemon (`Channel.start_incoming`, agent core),
HTTP parsing (`_http_filter.py`), rule syntax (`_steal.py`), sniffing and mirroring
(`_incoming_mirror.py`), or routing a filtered connection (`_incoming_filtered.py`).

Routing
-------
- Mirror: sniffed flows cut into requests, copied to the mirroring channels
  (`_incoming_mirror.py`).
- Unfiltered steal: the accepted socket itself goes to the stealing channel.
- Filtered steal: the connection is parsed request by request; matched requests go to their
  session, the rest to the pod's app (`_incoming_filtered.py`; HTTP/2 stream by stream,
  `_incoming_h2.py`). With a session's certificate, a client speaking TLS has it terminated
  first (`_incoming_tls.py`) and is filtered the same way over the decrypted stream.
- A connection made straight to the agent's listener (not redirected: its original
  destination is the listener itself) is reset at once, never relayed: relaying it to its
  original destination would connect to the listener again, in a loop. The steal rules
  refuse such connections in the kernel already (`_steal.py`); this check is the agent's own.
- A connection that arrives for a port nobody steals any more (the rule was just removed) is
  relayed to the pod's app, so ending a steal resets nothing.

Options (environment of the agent process; the agent's command line stays fixed):
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
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from mirrord._tls import TlsMaterialError
from mirrord.agent._context import AgentContext
from mirrord.agent._exceptions import SubscribeError
from mirrord.agent._http_filter import FilterError, HttpFilter, RequestHead, kube_probe_recipe
from mirrord.agent._incoming_filtered import FilteredConnection
from mirrord.agent._incoming_mirror import IncomingMirror
from mirrord.agent._incoming_netns import (
    SyncRunner,
    family_of,
    is_loopback,
    make_listeners,
    make_marked_socket,
    original_dst,
)
from mirrord.agent._incoming_tls import StealTls, terminate
from mirrord.agent._steal import AGENT_MARK, AGENT_MARK_SNIFFED, StealRules, StealRulesError
from mirrord.agent._steal_guard import remove_all

__all__ = ["IncomingService", "SubscribeError"]

log = logging.getLogger("mirrord.agent.incoming")

STATS_INTERVAL = 2.0  # seconds between TrafficStats
UPSTREAM_CONNECT_TIMEOUT = 5.0
_REFUSED_LOG_EVERY = 1000  # connections made straight to the listener: log one in this many


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


def _steal_filter(http_filter: dict[str, Any] | None, port: int) -> HttpFilter | None:
    """The compiled filter of a steal of `port`; None: the steal is unfiltered."""
    if http_filter is None:
        return None
    try:
        flt = HttpFilter.from_config(http_filter)
    except FilterError as exc:
        raise SubscribeError(errno.EINVAL, f"bad http_filter: {exc}") from None
    return flt if flt.applies_to(port) else None  # `ports` leaves it to an unfiltered steal


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


class IncomingService:
    """Mirror and steal for one agent. See the module docstring for the routing rules."""

    def __init__(
        self,
        ctx: AgentContext,
        *,
        steal_backend: str | None = None,
        clean_iptables_on_start: bool | None = None,
        probe_ports: Callable[[], set[int]] | None = None,
    ) -> None:
        self.ctx = ctx
        self.pid: int = ctx.pid
        self.netns: SyncRunner = ctx.netns
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
        self.steals: dict[int, _PortSteal] = {}
        self.tls = StealTls()  # the certificates of HTTPS filtered steals (_incoming_tls.py)
        self._rules: StealRules | None = None
        self._rules_ports: dict[int, int] = {}
        self._guard_watched = False
        self.max_guard_restarts = _max_guard_restarts()
        self._listeners: list[anyio.abc.SocketListener] = []  # IPv4, and IPv6 at the same port
        self._listener_port = 0
        self._accept_scope: anyio.CancelScope | None = None
        self.stolen_live = 0
        self.stats: dict[str, int] = {
            "stolen": 0,
            "filtered_requests": 0,
            "passed_to_pod": 0,
            "mirrored_flows": 0,
            "mirror_overflows": 0,
            "mirror_replays": 0,
            "replayed_to_pod": 0,
            "refused_direct": 0,
        }
        self.mirror = IncomingMirror(self.netns, self.stats, self._require_tg)
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<IncomingService pid={self.pid} mirror={sorted(self.mirror.mirrors)} "
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
        sniffer = self.mirror.clear_nowait()
        self.steals.clear()
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            with contextlib.suppress(Exception):
                await listener.aclose()
        rules, self._rules = self._rules, None
        if rules is not None:
            await anyio.to_thread.run_sync(rules.close)
        if sniffer is not None:
            sniffer.close()

    def _require_tg(self) -> anyio.abc.TaskGroup:
        if self._tg is None or self._closed:
            raise SubscribeError(errno.ESHUTDOWN, "the agent's incoming service is not running")
        return self._tg

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(
        self,
        channel: Any,
        port: int,
        mode: str,
        http_filter: dict[str, Any] | None,
        *,
        on_concurrent_steal: str = "abort",
        tls: dict[str, Any] | None = None,
    ) -> list[str]:
        """Mirror or steal `port` for `channel`; returns warnings for the session. Raises
        `SubscribeError` (errno EINVAL, EADDRINUSE, EPERM, EIO...) when refused. `tls`: the
        certificate of an HTTPS filtered steal (`_incoming_tls.py`)."""
        self._require_tg()
        if http_filter is not None and all(
            v is None for k, v in http_filter.items() if k != "ports"
        ):
            http_filter = None  # the config's empty filter object: no filter
        async with self._lock:
            if mode == "mirror":
                await self.mirror.subscribe(channel, port, http_filter)
                return []
            if mode == "steal":
                return await self._subscribe_steal(
                    channel, port, http_filter, override=on_concurrent_steal == "override", tls=tls
                )
        raise SubscribeError(errno.EINVAL, f"incoming mode {mode!r} is not mirror or steal")

    async def unsubscribe(self, channel: Any, port: int) -> None:
        async with self._lock:
            await self._drop(channel, port)

    async def channel_closed(self, channel: Any) -> None:
        async with self._lock:
            ports = self.mirror.ports_of(channel)
            ports |= {
                p
                for p, s in self.steals.items()
                if s.unfiltered is channel or channel in s.filtered
            }
            for port in sorted(ports):
                await self._drop(channel, port)

    async def _drop(self, channel: Any, port: int) -> None:
        self.tls.drop(channel, port)
        await self.mirror.drop(channel, port)
        steal = self.steals.get(port)
        if steal is not None:
            if steal.unfiltered is channel:
                steal.unfiltered = None
            steal.filtered.pop(channel, None)
            if steal.empty:
                del self.steals[port]
                await self._update_rules()

    # -- mirror (`_incoming_mirror.py`) and statistics

    async def _stats_loop(self) -> None:
        while True:
            await anyio.sleep(STATS_INTERVAL)
            await self.mirror.send_stats()

    async def send_stats(self) -> None:
        """TrafficStats to every mirroring channel whose counters changed."""
        await self.mirror.send_stats()

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats)
        out["stolen_live"] = self.stolen_live
        sniffer = self.mirror.statistics()
        if sniffer is not None:
            out["sniffer"] = sniffer
        return out

    # -- steal

    async def _subscribe_steal(
        self,
        channel: Any,
        port: int,
        http_filter: dict[str, Any] | None,
        *,
        override: bool = False,
        tls: dict[str, Any] | None = None,
    ) -> list[str]:
        warnings: list[str] = []
        flt = _steal_filter(http_filter, port)
        # TLS for a filtered steal only: an unfiltered one hands the TLS bytes over untouched
        warnings += self._subscribe_tls(channel, port, tls if flt is not None else None)
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
            warnings += self._rules.warnings  # e.g. IPv6 on in the target but not stealable
            self._rules.warnings = []
        if port in self.probe_ports() and (flt is None or flt.matches(_PROBE_HEAD)):
            recipe = kube_probe_recipe()["header_filter"]
            warnings.append(
                "the pod's HTTP probes use this port: stolen probes fail when the user app "
                "does not answer them, and the pod may be restarted. Leave them to the "
                f'pod with "http_filter": {{"header_filter": "{recipe}"}}'
            )
        return warnings

    def _subscribe_tls(self, channel: Any, port: int, tls: dict[str, Any] | None) -> list[str]:
        try:
            return self.tls.subscribe(channel, port, tls)
        except TlsMaterialError as exc:
            raise SubscribeError(errno.EINVAL, f"bad tls: {exc}") from None

    async def _update_rules(self) -> None:
        wanted = sorted(self.steals)
        if wanted:
            if not self._listeners:
                socks = await anyio.to_thread.run_sync(self.netns.run_sync, make_listeners)
                self._listener_port = socks[0].getsockname()[1]
                self._listeners = [await anyio.abc.SocketListener.from_socket(s) for s in socks]
                tg = self._require_tg()
                for listener in self._listeners:
                    await tg.start(self._accept_loop, listener)
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
            # OUTPUT REDIRECT (the pod talking to itself) lands on 127.0.0.1 or ::1,
            # PREROUTING on the incoming interface's address; only the latter was sniffed.
            sniffed = not is_loopback(str(raw.getsockname()[0]))
        except OSError:
            await stream.aclose()
            return
        if dst_port == self._listener_port or (dst_addr, dst_port) == raw.getsockname()[:2]:
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
            await self._serve_filtered(stream, (peer[0], peer[1]), (dst_addr, dst_port), sniffed)
        finally:
            self.stolen_live -= 1
            if not self.stolen_live:
                await self._maybe_clear_rules()

    async def _serve_filtered(
        self,
        stream: anyio.abc.SocketStream,
        remote: tuple[str, int],
        original: tuple[str, int],
        sniffed: bool,
    ) -> None:
        """A stolen connection on a filtered port: its TLS terminated first when the port has
        a session certificate and the client speaks TLS (`_incoming_tls.py`), then filtered."""
        done = await terminate(
            self.tls, original[1], stream, lambda: self.connect_upstream(original, sniffed=sniffed)
        )
        if done is None:
            return  # the client's TLS handshake failed (closed, logged)
        client, pod, tls = done
        conn = FilteredConnection(self, client, remote, original, sniffed=sniffed, tls=tls)
        if pod is not None:
            conn.set_upstream(pod)
        await conn.run()

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

    def session_for(self, port: int, head: RequestHead) -> Any | None:
        """The channel whose filter on `port` matches `head` first (None: the pod's app)."""
        steal = self.steals.get(port)
        return steal.route(head) if steal is not None else None

    async def connect_upstream(
        self, address: tuple[str, int], *, sniffed: bool = False
    ) -> anyio.abc.SocketStream:
        """A connection to the pod's own app at the original destination, from inside the
        pod, marked so that our OUTPUT rule does not send it back to us. `sniffed`: it
        repeats a client the mirror's sniffer saw already (its mark keeps the sniffer off)."""
        mark = AGENT_MARK_SNIFFED if sniffed else AGENT_MARK
        family = family_of(address[0])
        sock = await anyio.to_thread.run_sync(
            self.netns.run_sync, lambda: make_marked_socket(mark, family)
        )

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
