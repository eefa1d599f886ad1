"""Sessions and the layer processes in them.

Owns: the session table's entries (one per `mirrord run` / IDE launch: target, config, its
agent link, its layer processes), registering layer connections into a session (one agent
channel per layer process, shared by that process's threads; a forked child's channel names
its parent's), outgoing
connects (a private relay pair whose layer end is passed over the layer connection), listens (subscriptions) and incoming connections to the
user app's bound port, peer lookups. Does not own the agent stream (`AgentLink`), the control
API (`_control`) or the layer connections themselves (`_layer_client`).

The daemon does not trust the layer's input: a malformed frame closes that one layer
connection; a request for a port or process that is not its own gets an errno.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import functools
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from mirrord._frames import PassedFd
from mirrord._relay import FlowRelay
from mirrord.daemon._control import (
    AgentLostEvent,
    ClosedEvent,
    ControlEvent,
    ProcessEvent,
    WarningEvent,
)
from mirrord.daemon._env import filter_for_port, on_concurrent_steal, steal_for_port
from mirrord.daemon._exceptions import ChannelLost
from mirrord.daemon._link import AgentLink
from mirrord.daemon._relay import STREAM_CLOSE_MAX, UDP_CLOSE_MAX, Counters
from mirrord.daemon._relaying import relay_sockets, serve_datagrams, serve_incoming, serve_stream
from mirrord.protocol import Message
from mirrord.protocol import messages as m

if TYPE_CHECKING:
    from mirrord.config import MirrordConfig
    from mirrord.daemon._layer_client import LayerClient

__all__ = ["LayerProcess", "Session", "lost_reply", "new_session_id"]

log = logging.getLogger("mirrord.daemon.session")

DROP_WARNING_INTERVAL = 10.0  # seconds between two kernel-drop warnings of one port

FORK_GRACE = 1.0  # seconds a process's channel outlives its last connection, for late children
REQUEST_TIMEOUT = 30.0

Notify = Callable[[ControlEvent], None]


def new_session_id() -> str:
    return secrets.token_hex(8)


class Session:
    """One `mirrord run` (or IDE launch): a target, its config, its agent link, its processes."""

    def __init__(
        self,
        *,
        session_id: str | None = None,
        target: str,
        config: MirrordConfig,
        link: AgentLink,
        client_pid: int = 0,
        label: str = "",
        incoming_mode: str = "mirror",
        http_filter: dict[str, Any] | None = None,
    ) -> None:
        self.id = session_id or new_session_id()
        self.target = target
        self.config = config
        self.link = link
        self.client_pid = client_pid
        self.label = label
        self.incoming_mode = incoming_mode
        self.http_filter = http_filter
        # Subscribe.tls of its filtered steals (the PEM text of tls_steal's files), or None
        self.incoming_tls: dict[str, Any] | None = None
        self.created = time.time()
        self.state = "open"  # open -> agent_lost | closed
        self.reason = ""
        self.processes: dict[int, LayerProcess] = {}
        self.ever_registered = False
        self.counters = Counters()
        self.peers: dict[int, tuple[str, int]] = {}  # daemon-side source port -> real peer
        self.incoming_relays: dict[int, FlowRelay] = {}  # daemon-side source port -> relay
        self.warnings: list[str] = []
        self.kernel_drops: dict[int, int] = {}  # mirrored port -> the sniffer's kernel drops
        self._drop_warned: dict[int, float] = {}
        self.env: dict[str, str] = {}  # for the user command (secrets: never logged)
        self._listeners: list[Notify] = []
        self._changed = anyio.Event()
        # set once the agent ended a removed process's steal subscriptions (see remove_process)
        self._releasing: list[anyio.Event] = []
        link.on_lost(self._agent_lost)

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.target} {self.state} processes={len(self.processes)}>"

    def subscribe_events(self, notify: Notify) -> None:
        self._listeners.append(notify)

    def _notify(self, event: ControlEvent) -> None:
        for notify in list(self._listeners):
            notify(event)
        self._changed.set()
        self._changed = anyio.Event()

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self._notify(WarningEvent(session=self.id, message=text))

    def on_traffic_stats(self, port: int, drops: int) -> None:
        """The agent's sniffer counters for a port this session mirrors: a warning when the
        kernel dropped packets (mirrored connections then miss data), at most one per port
        every DROP_WARNING_INTERVAL seconds."""
        previous = self.kernel_drops.get(port, 0)
        self.kernel_drops[port] = drops
        if drops <= previous:
            return
        now = time.monotonic()
        if now - self._drop_warned.get(port, -DROP_WARNING_INTERVAL) < DROP_WARNING_INTERVAL:
            return
        self._drop_warned[port] = now
        self.warn(
            f"port {port}: the agent's sniffer lost {drops} packet(s) in the kernel so far; "
            "mirrored connections may miss data (the target's traffic is not affected)"
        )

    def _agent_lost(self, reason: str) -> None:
        if self.state == "open":
            self.state = "agent_lost"
            self.reason = reason
            log.warning("session %s: agent lost: %s", self.id, reason)
            self._notify(AgentLostEvent(session=self.id, message=f"the agent was lost: {reason}"))

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def statistics(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "target": self.target,
            "label": self.label,
            "client_pid": self.client_pid,
            "state": self.state,
            "reason": self.reason,
            "agent": self.link.handle.key,
            "created": self.created,
            "processes": sorted(self.processes),
            "channels": sum(1 for p in self.processes.values() if p.channel in self.link.channels),
            "layer_connections": sum(len(p.clients) for p in self.processes.values()),
            "ever_registered": self.ever_registered,
            "bytes_to_agent": self.counters.to_agent,
            "bytes_to_user": self.counters.to_user,
            "relayed_connections": self.counters.connections,
            "warnings": list(self.warnings),
            "kernel_drops": {str(p): d for p, d in sorted(self.kernel_drops.items())},
            "subscriptions": [
                dict(sub)
                for process in self.processes.values()
                for _, sub in sorted(process.subscriptions.items())
            ],
        }

    # -- processes

    def attach(self, client: LayerClient, hello: m.LayerHello) -> LayerProcess:
        process = self.processes.get(hello.pid)
        if process is None:
            parent = self.processes.get(hello.parent_pid) if hello.parent_pid else None
            process = LayerProcess(self, hello.pid, parent_pid=hello.parent_pid, exe=hello.exe)
            label = hello.exe.decode(errors="replace")[-100:]
            process.channel = self.link.open_channel(
                process,
                pid=hello.pid,
                parent=parent.channel if parent is not None else None,
                label=label,
                counters=(self.counters,),
            )
            self.processes[hello.pid] = process
            self.ever_registered = True
            log.info(
                "session %s: process %d registered (channel %d, parent %s)",
                self.id,
                hello.pid,
                process.channel,
                hello.parent_pid,
            )
            self._notify(ProcessEvent(session=self.id, pid=hello.pid, registered=True))
        process.cancel_expiry()
        process.clients.add(client)
        return process

    def detach(self, client: LayerClient) -> None:
        process = client.process
        if process is None:
            return
        process.clients.discard(client)
        if process.clients or self.processes.get(process.pid) is not process:
            return
        if self.state != "open" or not self.link.start_task(process.expire_after, FORK_GRACE):
            self.remove_process(process)

    def remove_process(self, process: LayerProcess) -> None:
        if self.processes.get(process.pid) is not process:
            return
        del self.processes[process.pid]
        process.cancel_expiry()  # its fork-grace task would hold it (and us) until it ends
        datagrams = []
        for closing, relay in process.udp_closing.values():
            closing.set()  # as the kernel closes an exiting process's sockets
            datagrams.append(relay)
        process.udp_closing.clear()
        # its outgoing and stolen connections pass on what the app wrote before it exited
        # (its ports are unsubscribed first: nothing more is stolen for it); mirrored ones go
        # with the channel at once (the app's answers to them go nowhere)
        table = self.link.relays.get(process.channel)
        streams = [
            r
            for r in (table.running() if table else [])
            if not r.flow.mirror and r not in datagrams
        ]
        ports = list(process.subscriptions)
        # A stolen port is unsubscribed before the channel closes, with the agent's answer
        # awaited: once that came, a new connection to the port goes to the target's app,
        # not to a process that is gone (and `subscriptions_ended` can wait for it).
        released = (
            anyio.Event()
            if any(sub["mode"] != "mirror" for sub in process.subscriptions.values())
            else None
        )
        if (datagrams or streams or released) and self.link.start_task(
            functools.partial(_close_after_relays, released=released),
            self.link,
            process.channel,
            datagrams,
            streams,
            ports,
        ):
            if released is not None:
                self._releasing = [e for e in self._releasing if not e.is_set()]
                self._releasing.append(released)
        else:
            self.link.close_channel(process.channel, "process exited")
        for port, sub in process.subscriptions.items():
            if sub["mode"] == "mirror":
                self.link.forget_traffic(port)
        process.subscriptions.clear()
        for client in list(process.clients):
            client.close("session_closed", "the process was removed from its session")
        log.info("session %s: process %d gone", self.id, process.pid)
        self._notify(ProcessEvent(session=self.id, pid=process.pid, registered=False))

    async def subscriptions_ended(self, timeout: float) -> None:
        """Until the agent ended the steal subscriptions of the processes removed so far (or
        `timeout` seconds): `CloseSession` answers after it, so that once `mirrord run`
        exited a new connection to a stolen port reaches the target's app, not a reset."""
        with anyio.move_on_after(timeout):
            for released in self._releasing:
                await released.wait()

    def close(self, reason: str = "session closed") -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self.reason = reason
        for process in list(self.processes.values()):
            for client in list(process.clients):
                client.close("session_closed", f"the mirrord session ended ({reason})")
            self.remove_process(process)
        self.link.forget_lost(self._agent_lost)  # the link outlives us: it must not hold us
        self._notify(ClosedEvent(session=self.id, message=reason))
        self._listeners.clear()


class LayerProcess:
    """One user-app process of a session: one agent channel, any number of layer connections."""

    def __init__(self, session: Session, pid: int, *, parent_pid: int | None, exe: bytes) -> None:
        self.session = session
        self.pid = pid
        self.parent_pid = parent_pid
        self.exe = exe
        self.channel = 0
        self.clients: set[LayerClient] = set()
        self.listeners: dict[int, tuple[str, int]] = {}  # port -> where the app really listens
        # port -> what the agent confirmed (Subscribed): shown by `mirrord daemon status`
        self.subscriptions: dict[int, dict[str, Any]] = {}
        # daemon-side UDP relay port -> (set when the app closed its socket (LayerDisconnect),
        # the relay)
        self.udp_closing: dict[int, tuple[anyio.Event, FlowRelay]] = {}
        # conn id -> (port, client) of a mirrored connection (to say which one was dropped)
        self.mirrored: dict[int, tuple[int, str]] = {}
        self.channel_lost = ""
        self._expiry: anyio.CancelScope | None = None
        self.uid = _uid_of(pid)  # whose listeners get this process's incoming connections

    def __repr__(self) -> str:
        return f"<LayerProcess pid={self.pid} channel={self.channel} clients={len(self.clients)}>"

    @property
    def link(self) -> AgentLink:
        return self.session.link

    def cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    async def expire_after(self, delay: float) -> None:
        with anyio.CancelScope() as scope:
            self._expiry = scope
            await anyio.sleep(delay)
            if not self.clients:
                self.session.remove_process(self)
        if self._expiry is scope:
            self._expiry = None

    # -- ChannelOwner

    def on_channel_closed(self, reason: str) -> None:
        self.channel_lost = reason

    def on_traffic_stats(self, msg: m.TrafficStats) -> None:
        self.session.on_traffic_stats(msg.port, msg.drops)

    def on_conn_reset(self, conn_id: int, errno: int) -> None:
        mirrored = self.mirrored.get(conn_id)
        if mirrored is not None and errno == errno_mod.ENOBUFS:  # see agent/_incoming.py
            port, client = mirrored
            self.session.warn(
                f"port {port}: a mirrored connection from {client} was dropped: it fell more "
                "than the agent's buffer behind the target's traffic (the user app or the link "
                "to the agent is slower); the target is not affected"
            )

    def on_incoming(self, msg: m.IncomingConnection) -> None:
        target = self.listeners.get(msg.port)
        if target is None:
            self.link.send(
                m.ConnClose(conn_id=msg.conn_id, errno=errno_mod.ECONNREFUSED), self.channel
            )
            return
        address, port = target
        client = f"{msg.remote_address}:{msg.remote_port}"
        # (a mirrored connection whose answer the agent reads is relayed both ways)
        mirror = msg.mode == "mirror" and not msg.replies
        relay = self.link.new_relay(
            self.channel,
            msg.conn_id,
            f"incoming {client} -> :{msg.port}",
            mirror=mirror,
            incoming=True,
        )
        if msg.mode == "mirror":  # (replies relayed back or not)
            self.mirrored[msg.conn_id] = (msg.port, client)
        peer = (msg.remote_address, msg.remote_port)
        if not self.link.start_task(self._serve_incoming, relay, address, port, peer):
            self.mirrored.pop(msg.conn_id, None)
            self.link.relay_done(self.channel, relay)

    async def _serve_incoming(
        self, relay: FlowRelay, address: str, port: int, peer: tuple[str, int]
    ) -> None:
        ports: list[int] = []

        def connected(local_port: int) -> None:
            ports.append(local_port)
            self.session.peers[local_port] = peer
            self.session.incoming_relays[local_port] = relay

        try:
            await serve_incoming(relay, address, port, connected, owner=self.uid)
        finally:
            for local_port in ports:
                if self.session.peers.get(local_port) == peer:
                    del self.session.peers[local_port]
                if self.session.incoming_relays.get(local_port) is relay:
                    del self.session.incoming_relays[local_port]
            self.mirrored.pop(relay.flow.conn_id, None)
            self.link.relay_done(self.channel, relay)

    # -- requests from the layer

    async def _call(self, request: m.Request, timeout: float | None = None) -> Message:
        """The agent's reply to `request` on this process's channel; a lost channel or agent
        is an EIO reply, a timeout an ETIMEDOUT one."""
        try:
            return await self.link.call(self.channel, request, timeout=timeout)
        except ChannelLost as exc:
            return _error(errno_mod.EIO, str(exc))
        except TimeoutError:
            return _error(errno_mod.ETIMEDOUT, "agent timeout")

    async def _call_passing(
        self, request: m.Request, timeout: float | None = None
    ) -> tuple[Message, PassedFd | None]:
        """`_call`, and the fd a local target's agent handed over with the reply, if any
        (`FileHanded`, `Connected(handed)`)."""
        try:
            return await self.link.call_passing(self.channel, request, timeout=timeout)
        except ChannelLost as exc:
            return _error(errno_mod.EIO, str(exc)), None
        except TimeoutError:
            return _error(errno_mod.ETIMEDOUT, "agent timeout"), None

    async def outgoing(self, client: LayerClient, msg: m.LayerConnect) -> None:
        """Connect in the target, then relay through a socket only this session holds: the
        layer's end of a private pair, passed with the reply (or, for `sendto()`, a UDP
        endpoint connected to the app's own socket)."""
        if await self._outgoing_handed(client, msg):
            return
        if msg.protocol == "unix" and m.FEATURE_UNIX_STREAMS not in self.link.conn.peer_features:
            message = "this agent cannot connect unix sockets in the target"
            client.reply(_error(errno_mod.ENOTSUP, message), msg.request_id)
            return
        try:
            daemon_end, layer_end, app = await relay_sockets(msg)
        except OSError as exc:
            client.reply(_error(exc.errno or errno_mod.EIO, f"relay: {exc}"), msg.request_id)
            return
        try:
            relay_host, relay_port = (
                ("", 0) if msg.protocol == "unix" else daemon_end.getsockname()[:2]
            )
            relay, reply = await self._connect_in_target(msg)
        except BaseException:
            daemon_end.close()
            if layer_end is not None:
                layer_end.close()
            raise
        if not isinstance(reply, m.Connected):
            relay.abort()
            self.link.relay_done(self.channel, relay)
            daemon_end.close()
            if layer_end is not None:
                layer_end.close()
            if not isinstance(reply, m.ErrorReply):
                reply = _error(errno_mod.EIO, "bad reply")
            client.reply(reply, msg.request_id)
            return
        client.reply(
            m.LayerConnected(
                request_id=0,
                relay_address=relay_host,
                relay_port=relay_port,
                local_address=reply.local_address,
                local_port=reply.local_port,
            ),
            msg.request_id,
            passing=() if layer_end is None else (layer_end,),
        )
        try:
            if msg.protocol in ("tcp", "unix"):
                await serve_stream(relay, daemon_end, app if msg.source_port else None)
                return
            closing = anyio.Event()
            entry = self.udp_closing[relay_port] = (closing, relay)
            try:
                await serve_datagrams(relay, daemon_end, closing)
            finally:
                if self.udp_closing.get(relay_port) is entry:
                    del self.udp_closing[relay_port]
        finally:
            self.link.relay_done(self.channel, relay)

    async def _outgoing_handed(self, client: LayerClient, msg: m.LayerConnect) -> bool:
        """Hand-over (a local target's agent, `feature.network.outgoing.handover` on, a TCP
        or UDP `connect()`): the agent connects in the target and passes its socket, which
        goes on to the layer as it is; nothing is relayed. False when it does not apply (the
        relayed path then serves `msg`); True once `msg` is answered."""
        if (
            msg.source_port
            or msg.protocol not in ("tcp", "udp")
            or not self.session.config.feature.network.outgoing.handover
            or not self.link.can_hand_over
        ):
            return False
        conn_id = self.link.new_conn_id()
        request = m.Connect(
            request_id=0,
            conn_id=conn_id,
            protocol=msg.protocol,
            address=msg.address,
            port=msg.port,
            handover=True,
        )
        reply, passed = await self._call_passing(request, REQUEST_TIMEOUT)
        if isinstance(reply, m.Connected) and reply.handed and passed is not None:
            client.reply(
                m.LayerConnected(
                    request_id=0,
                    relay_address="",
                    relay_port=0,
                    local_address=reply.local_address,
                    local_port=reply.local_port,
                    handed=True,
                ),
                msg.request_id,
                passing=(passed,),
            )
            return True
        if passed is not None:
            passed.close()
        if isinstance(reply, m.Connected):  # relayed after all: nobody here relays it
            self.link.send(m.ConnClose(conn_id=conn_id, errno=errno_mod.ECONNRESET), self.channel)
            reply = _error(errno_mod.EIO, "the agent did not hand the connection over")
        elif not isinstance(reply, m.ErrorReply):
            reply = _error(errno_mod.EIO, "bad reply")
        client.reply(reply, msg.request_id)
        return True

    async def _connect_in_target(self, msg: m.LayerConnect) -> tuple[FlowRelay, Message]:
        """`Connect` to the agent for `msg`, with its relay registered first (early `Data` is
        queued in its flow, not dropped); the agent's reply, or ETIMEDOUT after
        `REQUEST_TIMEOUT`."""
        conn_id = self.link.new_conn_id()
        relay = self.link.new_relay(
            self.channel,
            conn_id,
            f"outgoing {msg.protocol} {msg.address}:{msg.port}",
            datagram=msg.protocol == "udp",
        )
        request = m.Connect(
            request_id=0, conn_id=conn_id, protocol=msg.protocol, address=msg.address, port=msg.port
        )
        try:
            return relay, await self._call(request, REQUEST_TIMEOUT)
        except BaseException:
            relay.abort()
            self.link.relay_done(self.channel, relay)
            raise

    def listen(self, client: LayerClient, msg: m.LayerListen) -> None:
        address = msg.bound_address
        if address in ("0.0.0.0", ""):
            address = "127.0.0.1"
        elif address == "::":
            address = "::1"
        if self.session.incoming_mode == "off":
            client.reply(m.Ok(request_id=0), msg.request_id)  # incoming off: stays local
            return
        http_filter = None
        if self.session.incoming_mode == "mirror":
            # only the requests the filter matches are copied, on the filter's ports
            http_filter = filter_for_port(self.session.http_filter, msg.port)
        if self.session.incoming_mode == "steal":
            subscribe, http_filter, warning = steal_for_port(
                self.session.config, self.session.http_filter, msg.port
            )
            if not subscribe:
                self.session.warn(f"port {msg.port}: {warning}")
                client.reply(m.Ok(request_id=0), msg.request_id)  # stays with the user app
                return
        # recorded before Subscribe so an IncomingConnection right after Subscribed finds it
        self.listeners[msg.port] = (address, msg.bound_port)

        mode = self.session.incoming_mode
        request = m.Subscribe(
            request_id=0,
            port=msg.port,
            mode=mode,
            http_filter=http_filter,
            on_concurrent_steal=on_concurrent_steal(self.session.config),
            tls=self.session.incoming_tls if mode == "steal" and http_filter else None,
        )
        app = f"{address}:{msg.bound_port}"
        if not self.link.start_task(self._subscribe, client, msg, request, app):
            self.listeners.pop(msg.port, None)
            client.reply(lost_reply(self), msg.request_id)

    async def _subscribe(
        self, client: LayerClient, msg: m.LayerListen, subscribe: m.Subscribe, app: str
    ) -> None:
        """Subscribe in the agent, then tell the layer (and, on refusal, the user: the layer
        leaves the app listening locally either way, so no traffic would come unexplained)."""
        reply = await self._call(subscribe)
        if isinstance(reply, m.Subscribed):
            for warning in reply.warnings:
                self.session.warn(f"port {msg.port}: {warning}")
            self.subscriptions[msg.port] = {
                "port": msg.port,
                "mode": subscribe.mode,
                "http_filter": subscribe.http_filter,
                "pid": self.pid,
                "app": app,
            }
            client.reply(m.Ok(request_id=0), msg.request_id)
            return
        self.listeners.pop(msg.port, None)
        client.reply(reply, msg.request_id)
        if self.session.state != "open" or self.session.processes.get(self.pid) is not self:
            return  # the process or the session is gone: nobody to tell
        why = getattr(reply, "message", "") or type(reply).__name__
        self.session.warn(
            f"port {msg.port}: not {'stolen' if subscribe.mode == 'steal' else 'mirrored'}: "
            f"{why}; the app gets no traffic from the target on it"
        )

    def disconnect(self, client: LayerClient, msg: m.LayerDisconnect) -> None:
        """The app closed a relayed UDP socket: end its relay (ConnClose to the agent) once
        the datagrams it sent before closing went on."""
        entry = self.udp_closing.pop(msg.relay_port, None)
        if entry is not None:
            entry[0].set()
        client.reply(m.Ok(request_id=0), msg.request_id)

    def unlisten(self, client: LayerClient, msg: m.LayerUnlisten) -> None:
        self.listeners.pop(msg.port, None)
        if self.subscriptions.pop(msg.port, {}).get("mode") == "mirror":
            self.link.forget_traffic(msg.port)
        unsubscribe = m.Unsubscribe(request_id=0, port=msg.port)
        if not self.link.start_task(self._unsubscribe, client, msg.request_id, unsubscribe):
            client.reply(lost_reply(self), msg.request_id)

    async def _unsubscribe(
        self, client: LayerClient, request_id: int, unsubscribe: m.Unsubscribe
    ) -> None:
        client.reply(await self._call(unsubscribe), request_id)

    def peer(self, client: LayerClient, msg: m.PeerLookup) -> None:
        peer = self.session.peers.get(msg.local_port)
        relay = self.session.incoming_relays.get(msg.local_port)
        if relay is not None:
            relay.flow.accepted()  # the app accept()ed it: it may have seen its bytes
        if peer is None:
            reply: Message = m.ErrorReply(
                request_id=0, errno=errno_mod.ENOENT, message="not an incoming connection"
            )
        else:
            reply = m.PeerReply(request_id=0, address=peer[0], port=peer[1])
        client.reply(reply, msg.request_id)


def _uid_of(pid: int) -> int:
    """The user a layer process runs as (the daemon's own when /proc does not say)."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return os.geteuid()


def _error(errno: int, message: str) -> m.ErrorReply:
    """An `ErrorReply` for the layer (its request id is set when it is sent)."""
    return m.ErrorReply(request_id=0, errno=errno, message=message)


def lost_reply(process: LayerProcess) -> m.ErrorReply:
    """EIO for a request of `process` that cannot reach the agent any more."""
    reason = process.session.reason or process.channel_lost or "agent lost"
    return m.ErrorReply(request_id=0, errno=errno_mod.EIO, message=reason)


async def _close_after_relays(
    link: AgentLink,
    channel: int,
    datagrams: list[FlowRelay],
    streams: list[FlowRelay],
    ports: list[int],
    *,
    released: anyio.Event | None = None,
) -> None:
    """Close an exited process's channel once its relays passed on what the app sent before
    it exited: closing the channel at once would drop what the daemon had not read yet (a busy
    daemon, or a connection whose credit window was spent) and reset the connections. UDP
    relays end after their close grace (`serve_datagrams`); outgoing and stolen stream relays
    read their socket to its end (the kernel closed the app's side) and end when the flow is
    done, or are reset with the channel after `STREAM_CLOSE_MAX`. The process's subscriptions (`ports`)
    are ended first, so nothing is stolen or mirrored for a process that is gone meanwhile;
    `released`, when given, is set once the agent answered those (or could not)."""
    try:
        if streams or released is not None:  # not stolen or mirrored for it while they end
            for port in ports:
                with contextlib.suppress(ChannelLost, TimeoutError):
                    await link.call(channel, m.Unsubscribe(request_id=0, port=port), timeout=2.0)
    finally:
        if released is not None:
            released.set()
    with anyio.move_on_after(UDP_CLOSE_MAX + 1):
        for relay in datagrams:
            await relay.finished.wait()
    with anyio.move_on_after(STREAM_CLOSE_MAX):
        for relay in streams:
            await relay.finished.wait()
    link.close_channel(channel, "process exited")
