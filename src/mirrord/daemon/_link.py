"""One agent stream: the handshake, channels, request ids and the relays on it.

Owns: the `AgentConnection` of one agent stream; allocation of channel ids, daemon request ids
and even connection ids; mapping replies back to whoever asked; each channel's table of
relays (`RelayTable` of the shared engine, docs/relay.md) and routing connection messages to
them; incoming connections / channel closes to the channel's owner; marking everything
failed (and aborting every relay) when the stream breaks. Does not own: sessions or layer connections (they
are channel owners), starting agents (backends), or when to stop the agent (the pool).

Everything the reader does is synchronous and non-blocking: frames to the agent are queued on
a `FrameWriter`, and work that waits (connecting a relay) runs as a task in the link's task
group, so the agent stream is always read.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import anyio
import anyio.abc

from mirrord._frames import FrameReader, FrameWriter, Passable, PassedFd
from mirrord._relay import CONN_MESSAGES, FlowRelay, RelayTable
from mirrord._splice import (
    SPLICE_MAX,
    PipeFill,
    PipePart,
    PipePool,
    release_parts,
    splice_supported,
)
from mirrord._version import __version__
from mirrord.backend import AgentHandle
from mirrord.daemon._exceptions import AgentStartError, ChannelLost
from mirrord.daemon._relay import Counters
from mirrord.protocol import (
    CLOSED,
    CONTROL_CHANNEL,
    LAYER_REGISTRY,
    NEED_DATA,
    AgentConnection,
    AgentRole,
    Flow,
    LayerConnection,
    LocalProtocolError,
    Message,
    Received,
    RemoteProtocolError,
    State,
    Undecoded,
    UnknownMessage,
    read_head,
)
from mirrord.protocol import messages as m

__all__ = [
    "FORWARDED_REPLIES",
    "FORWARDED_REQUESTS",
    "AgentLink",
    "ChannelOwner",
    "ReplyTo",
    "describe_error",
]

log = logging.getLogger("mirrord.daemon.link")

HANDSHAKE_TIMEOUT = 15.0
_READ_SIZE = 256 * 1024
# The most one Data carries from a user app's socket: one read per message (as the agent's).
RELAY_CHUNK = 256 * 1024
# Relays stop reading their sockets while more than this is queued for the agent (a stalled
# agent stream), until it is half written.
_HIGH_WATER = 4 * 1024 * 1024

LostCallback = Callable[[str], None]

# What the daemon forwards between a layer and its agent channel without decoding: the shared
# requests (files, env, DNS: kinds 1-99, the same message in both protocols) and their replies.
FORWARDED_REQUESTS = [
    cls for cls in LAYER_REGISTRY.kinds() if cls.KIND < 100 and issubclass(cls, m.Request)
]
FORWARDED_REPLIES = [
    cls for cls in LAYER_REGISTRY.kinds() if cls.KIND < 100 and issubclass(cls, m.Reply)
]


class _StreamClosed(Exception):
    """The agent closed its stream (after its Fatal, or at the end): stop reading it."""


class ReplyTo(Protocol):
    """Whoever gets the reply of a forwarded request (a layer connection)."""

    def reply(self, reply: Message, request_id: int, *, passing: tuple[Passable, ...] = ()) -> None:
        """`reply` (decoded) as the answer to the layer's `request_id`; `passing`: the fd a
        local target's agent handed over with it (`FileHanded`)."""
        ...

    def forward_reply(
        self,
        frame: Undecoded,
        request_id: int,
        *,
        passing: tuple[Passable, ...] = (),
        tail: list[PipePart] | None = None,
    ) -> None:
        """The agent's reply `frame`, undecoded, as the answer to the layer's `request_id`;
        `passing` as for `reply`; `tail`: the frame's last bytes, in pipes (owned by the
        callee from here on: written or released)."""
        ...

    @property
    def can_splice(self) -> bool:
        """Whether a forwarded reply may come with a `tail` (a plain unix socket)."""
        ...


def fill_large_frame(
    conn: AgentConnection | LayerConnection,
    pool: PipePool,
    head: Undecoded,
    done: Callable[[Undecoded, PipeFill], None],
) -> PipeFill | None:
    """The large frame `conn` is receiving, whose head is `head`'s (read from
    `large_prefix`), taken from its decoder into a pipe of `pool`: a `PipeFill` for the rest,
    which calls `done(the frame, with what came of it so far as its payload, the fill)` once
    the rest is in. None when no pipe can be had: the frame is received in place."""
    try:
        pipe = pool.take()
    except OSError as exc:
        log.debug("no pipe for a large frame (%s): received in place", exc)
        return None
    payload, rest = conn.take_large()
    frame = dataclasses.replace(head, payload=payload)
    return PipeFill(pool, pipe, rest, lambda job: done(frame, job))


class _Forward:
    """A layer's request forwarded to the agent: its reply goes back to the layer connection
    under the layer's request id, undecoded, from the reader callback (no task waits)."""

    __slots__ = ("channel", "client", "request_id")

    def __init__(self, channel: int, client: ReplyTo, request_id: int) -> None:
        self.channel = channel
        self.client = client
        self.request_id = request_id

    def answer(self, reply: Message, passed: PassedFd | None = None) -> None:
        if isinstance(reply, m.Reply) and reply.KIND < 100:
            self.client.reply(reply, self.request_id, passing=() if passed is None else (passed,))
        else:  # an agent-protocol reply (kinds 100+) means nothing to the layer
            if passed is not None:
                passed.close()
            self.fail(f"the agent answered with {type(reply).__name__}")

    def fail(self, reason: str) -> None:
        self.client.reply(
            m.ErrorReply(request_id=self.request_id, errno=errno_mod.EIO, message=reason),
            self.request_id,
        )


class _Waiter:
    """One request awaiting its reply: the reply, or why none will come."""

    __slots__ = ("channel", "event", "lost", "passed", "reply")

    def __init__(self, channel: int) -> None:
        self.channel = channel
        self.event = anyio.Event()
        self.reply: Message | None = None
        self.passed: PassedFd | None = None  # the fd that came with the reply (hand-over)
        self.lost = ""

    def answer(self, reply: Message, passed: PassedFd | None = None) -> None:
        self.reply = reply
        self.passed = passed
        self.event.set()

    def fail(self, reason: str) -> None:
        self.lost = reason
        self.event.set()


def describe_error(exc: BaseException) -> str:
    """What broke, for a message: anyio's Broken/ClosedResourceError carry no text of their
    own (the OS error is their cause), and "the agent was lost: the agent stream broke: " told
    the user nothing."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror} (errno {errno_mod.errorcode.get(seen.errno or 0, seen.errno)})"
        if str(seen):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, anyio.ClosedResourceError):
        return "the daemon closed the stream"
    return f"{type(exc).__name__} (the connection to the agent failed without an error text)"


class ChannelOwner(Protocol):
    """Whoever a channel belongs to (a layer process, or a session's own channel)."""

    def on_incoming(self, msg: m.IncomingConnection) -> None: ...

    def on_conn_reset(self, conn_id: int, errno: int) -> None: ...

    def on_channel_closed(self, reason: str) -> None: ...

    def on_traffic_stats(self, msg: m.TrafficStats) -> None: ...


class _ChannelLink:
    """The agent stream as the relays of one channel see it (their `RelayLink`), counting
    the bytes they relay (`mirrord daemon status`)."""

    __slots__ = ("_channel", "_link", "counters")

    def __init__(self, link: AgentLink, channel: int, counters: tuple[Counters, ...]) -> None:
        self._link = link
        self._channel = channel
        self.counters = counters

    def send_nowait(self, msg: Message) -> None:
        if isinstance(msg, m.Data):
            for c in self.counters:
                c.to_agent += len(msg.data)
        elif isinstance(msg, m.Credit):  # sent for what went into the user app's socket
            for c in self.counters:
                c.to_user += msg.amount
        self._link.send(msg, self._channel)

    async def wait_ready(self) -> None:
        writer = self._link._writer
        if writer is not None and not self.ready():
            await writer.wait_queued_below(_HIGH_WATER // 2)

    def ready(self) -> bool:
        writer = self._link._writer
        return writer is None or writer.queued_bytes <= _HIGH_WATER


class ChannelRelays(RelayTable):
    """The relays of one channel."""

    link: _ChannelLink

    def __init__(self, link: _ChannelLink, channel: int) -> None:
        super().__init__(link, f"channel {channel}")


class AgentLink:
    """The daemon's side of one agent stream (one per agent, shared by all its sessions)."""

    def __init__(self, handle: AgentHandle) -> None:
        self.handle = handle
        # replies to forwarded requests are passed to the layer undecoded
        self.conn = AgentConnection(
            AgentRole.DAEMON, secret=handle.secret, undecoded=FORWARDED_REPLIES
        )
        self.state = "connecting"  # connecting -> open -> lost | closed
        self.reason = ""
        self.welcome: m.Welcome | None = None
        self.opened_at = time.time()
        self.counters = Counters()
        self.traffic: dict[int, dict[str, int]] = {}  # mirrored port -> TrafficStats figures
        self.channels: dict[int, ChannelOwner] = {}
        self.relays: dict[int, ChannelRelays] = {}  # channel -> its relayed connections
        self._pending: dict[int, _Waiter | _Forward] = {}
        self._next_request = 1
        self._next_channel = 1
        self._next_conn = 2  # the daemon picks even connection ids, the agent odd ones
        self._writer: FrameWriter | None = None
        self._reader: FrameReader | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        # whoever is told when the link is lost, until it unregisters (`forget_lost`)
        self._lost_callbacks: dict[LostCallback, None] = {}
        self.frames_in = 0
        self.handed_over = 0  # files and sockets the agent handed over (passed to a layer)
        # large replies spliced through a pipe (`_splice_in`), the one being received
        self.spliced = 0
        self.spliced_writes = 0  # forwarded requests whose last bytes came in pipes
        self._splicing: PipeFill | None = None
        self._splice_checked = 0  # the last large frame looked at (`conn.large_frames`)
        self._pipes = PipePool()
        self.requests = 0

    def __repr__(self) -> str:
        return (
            f"<AgentLink {self.handle.key} {self.state} channels={len(self.channels)} "
            f"relays={len(self.relays)} pending={len(self._pending)}>"
        )

    @property
    def is_open(self) -> bool:
        return self.state == "open"

    def statistics(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "channels": len(self.channels),
            "connections": sum(len(table) for table in self.relays.values()),
            "pending_requests": len(self._pending),
            "requests": self.requests,
            "bytes_to_agent": self.counters.to_agent,
            "bytes_to_user": self.counters.to_user,
            "relayed_connections": self.counters.connections,
            "handed_over": self.handed_over,
            "spliced": self.spliced,
            "spliced_writes": self.spliced_writes,
            "queued_bytes": self._writer.queued_bytes if self._writer else 0,
            "agent_version": self.welcome.agent_version if self.welcome else "",
            "agent_target": self.welcome.target if self.welcome else "",
            # mirrored port -> packets sniffed, kernel drops of the sniffer (TrafficStats)
            "traffic": {str(port): dict(v) for port, v in sorted(self.traffic.items())},
            "kernel_drops": max((v["kernel_drops"] for v in self.traffic.values()), default=0),
        }

    def forget_traffic(self, port: int) -> None:
        """A mirror subscription of `port` ended: drop its sniffer figures unless another
        channel still mirrors it (`daemon status` must not show ports nobody mirrors)."""
        for owner in self.channels.values():
            subs = getattr(owner, "subscriptions", None)
            if isinstance(subs, dict) and subs.get(port, {}).get("mode") == "mirror":
                return
        self.traffic.pop(port, None)

    def on_lost(self, callback: LostCallback) -> None:
        """`callback(reason)` runs once if the link is lost, unless `forget_lost` came first."""
        self._lost_callbacks[callback] = None

    def forget_lost(self, callback: LostCallback) -> None:
        """Undo `on_lost` (its owner closed): the link holds nothing of it any more."""
        self._lost_callbacks.pop(callback, None)

    # -- lifecycle

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, handshake (then `started`), and read until the stream ends."""
        stream = await self.handle.connect()
        reason = "the agent closed the connection"
        try:
            async with stream, anyio.create_task_group() as tg:
                self._tg = tg
                self._writer = FrameWriter(stream, f"agent {self.handle.key}")
                self._reader = FrameReader(stream, _READ_SIZE, receive_fds=True)
                if self._reader.receives_fds:
                    # an agent on this machine may hand files and sockets over (both ends
                    # must say so: `can_hand_over`)
                    self.conn.features.append(m.FEATURE_HANDOVER)
                tg.start_soon(self._writer.run)
                self._writer.send_nowait(self.conn.hello(client=f"mirrordd {__version__}"))
                reader = self._reader  # the stream's one reader
                await self._handshake(reader)
                self.state = "open"
                log.info(
                    "agent link open: %s (agent %s)",
                    self.handle.description,
                    self.welcome.agent_version if self.welcome else "?",
                )
                task_status.started()
                try:
                    reason = await self._read_loop(reader)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    reason = f"the agent stream broke: {describe_error(exc)}"
                except RemoteProtocolError as exc:
                    reason = f"the agent broke the protocol: {exc}"
                    self._writer.send_nowait(self.conn.error_frame(exc))
                else:
                    # A stream another process carries (the Kubernetes helper's port-forward)
                    # ends as a plain EOF here; its carrier says why (the agent pod is gone).
                    end_reason = getattr(self.handle, "end_reason", None)
                    why = await end_reason() if end_reason is not None else None
                    if why:
                        reason = f"the agent stream broke: {why}"
                self._lose(reason)  # before cancelling: relays see they were aborted (reset)
                tg.cancel_scope.cancel()
        finally:
            self._lose(reason)

    async def _handshake(self, reader: FrameReader) -> None:
        try:
            with anyio.fail_after(HANDSHAKE_TIMEOUT):
                while self.welcome is None:
                    data = await reader.receive()
                    self.conn.receive_data(data)
                    while True:
                        event = self.conn.next_event()
                        if event is NEED_DATA:
                            break
                        if event is CLOSED:
                            raise AgentStartError(
                                f"{self.handle.description} closed the connection during the "
                                "handshake"
                            )
                        if isinstance(event, Received) and isinstance(event.message, m.Welcome):
                            self.welcome = event.message
                            break
        except TimeoutError:
            raise AgentStartError(
                f"{self.handle.description} did not answer the handshake within "
                f"{HANDSHAKE_TIMEOUT:g} s"
            ) from None
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            raise AgentStartError(
                f"{self.handle.description} closed the connection during the handshake ({exc!r})"
            ) from None
        except RemoteProtocolError as exc:
            raise AgentStartError(
                f"{self.handle.description} refused the handshake: {exc}"
            ) from None

    @property
    def can_hand_over(self) -> bool:
        """The agent passes opened files and connected sockets on this stream (a local
        target: the agent is on this machine, and both ends said so)."""
        return (
            self.is_open
            and self._reader is not None
            and self._reader.receives_fds
            and m.FEATURE_HANDOVER in self.conn.peer_features
        )

    async def _read_loop(self, reader: FrameReader) -> str:
        """Read the agent's frames until the stream ends; the reason it ended. Each read is
        handled in the event loop's reader callback (`FrameReader.run`): a reply costs no
        task wake-up here."""
        splice = self._splice_in if reader.receives_fds and splice_supported() else None
        try:
            await reader.run(self._on_data, into=self.conn.receive_buffer, splice=splice)
            if self._splicing is not None:
                raise RemoteProtocolError(
                    f"the stream ended {self._splicing.left} bytes before the end of a frame"
                )
            self._on_data(b"")  # the end of the stream (a frame cut short is the agent's error)
        except _StreamClosed:
            pass
        return self.reason or "the agent closed the connection"

    def write_pipes(self) -> PipePool | None:
        """The pipes a forwarded request's last bytes may come in (`forward`'s `tail`), when
        the agent's stream takes them (a plain unix socket), else None."""
        writer = self._writer
        return self._pipes if writer is not None and writer.can_splice else None

    def _splice_in(self) -> PipeFill | None:
        """The reader's `splice` hook: a large `FileData` that a layer connection waits for
        (forwarded undecoded) goes through a pipe, when both streams are unix sockets (the
        agent's: `receives_fds`; the layer's: `can_splice`). Decided once per large frame,
        at its first read; any other frame is received in place as before."""
        job = self._splicing
        if job is not None:
            return job
        if self.conn.large_frames == self._splice_checked:
            return None
        self._splice_checked = self.conn.large_frames
        large = self.conn.large_prefix()
        if large is None or large[1] > SPLICE_MAX:
            return None
        head = read_head(large[0], 3)
        if head is None:
            return None
        (channel, kind, rid), items, body = head
        entry = self._pending.get(rid)
        if (
            kind != m.FileData.KIND
            or type(entry) is not _Forward
            or entry.channel != channel
            or not entry.client.can_splice
        ):
            return None
        start = Undecoded(
            channel=channel,
            kind=kind,
            request_id=rid,
            items=items,
            head_items=3,
            payload=b"",
            body=body,
        )
        self._splicing = fill_large_frame(self.conn, self._pipes, start, self._spliced)
        return self._splicing

    def _spliced(self, frame: Undecoded, job: PipeFill) -> None:
        """All of `frame`'s bytes are in `job`'s pipes: forward the reply (the reader
        callback)."""
        self._splicing = None
        entry = self._pending.get(frame.request_id)
        if type(entry) is not _Forward or entry.channel != frame.channel:
            job.close()  # the request was given up meanwhile: nobody reads this reply
            return
        del self._pending[frame.request_id]
        self.frames_in += 1
        if job.copy is not None:  # copied after all (the pipes were full)
            frame = dataclasses.replace(frame, payload=frame.payload + job.copy)
            entry.client.forward_reply(frame, entry.request_id)
            return
        self.spliced += 1
        entry.client.forward_reply(frame, entry.request_id, tail=job.take_parts())

    def _on_data(self, data: bytes | memoryview) -> None:
        """Feed one read (b"": the end) and handle its frames; raises `_StreamClosed` once the
        agent closed the stream, `RemoteProtocolError` when it broke the protocol."""
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                return
            if event is CLOSED:
                raise _StreamClosed
            if isinstance(event, Undecoded):
                entry = self._pending.get(event.request_id)
                if type(entry) is _Forward and entry.channel == event.channel:
                    del self._pending[event.request_id]
                    self.frames_in += 1
                    # the kind alone says whether an fd came with the frame (hand-over)
                    passed = self._take_fd() if event.kind == m.FileHanded.KIND else None
                    passing = () if passed is None else (passed,)
                    entry.client.forward_reply(event, entry.request_id, passing=passing)
                    continue
                event = self.conn.decode(event)  # a reply someone awaits: as a message
            if isinstance(event, Received):
                self.frames_in += 1
                self._dispatch(event.channel, event.message)
            elif isinstance(event, UnknownMessage) and event.request_id is not None:
                self.send(
                    m.ErrorReply(
                        request_id=event.request_id,
                        errno=errno_mod.ENOSYS,
                        message=f"mirrordd does not know message kind {event.kind}",
                    ),
                    event.channel,
                )

    def _lose(self, reason: str) -> None:
        """The stream is gone: fail every pending request and channel, abort every relay."""
        if self.state in ("lost", "closed"):
            return
        self.state = "closed" if self.state == "closing" else "lost"
        self.reason = reason
        if self.state == "lost":
            log.warning("agent link lost: %s: %s", self.handle.description, reason)
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.fail(f"agent lost: {reason}")
        relays, self.relays = self.relays, {}
        for table in relays.values():
            table.abort_all()
        channels, self.channels = self.channels, {}
        for owner in channels.values():
            owner.on_channel_closed(f"agent lost: {reason}")
        lost_callbacks, self._lost_callbacks = list(self._lost_callbacks), {}
        for lost_callback in lost_callbacks:
            lost_callback(reason)
        if self._writer is not None:
            self._writer.close()
        if self._reader is not None:
            self._reader.close_fds()
        if self._splicing is not None:
            self._splicing.close()
            self._splicing = None
        self._pipes.close()

    def close(self) -> None:
        """Stop using this stream (the pool releases the agent); ends `run()`."""
        if self.state in ("lost", "closed"):
            return
        self.state = "closing"
        if self._writer is not None:
            self._writer.close()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    # -- sending (synchronous: frames are queued)

    def send(self, msg: Message, channel: int) -> None:
        if self.state != "open" or self._writer is None or self.conn.state is not State.OPEN:
            return  # the link is gone: whoever sent this has been (or will be) told
        self._writer.send_nowait(self.conn.send_parts(msg, channel))

    async def call(
        self, channel: int, request: m.Request, *, timeout: float | None = None
    ) -> Message:
        """Send `request` on `channel` under a daemon request id and return the agent's reply
        (an `ErrorReply` is a reply). Raises `ChannelLost` if the channel or the agent is lost
        first, `TimeoutError` when no reply came within `timeout` seconds (None: no limit, for
        requests that may rightly wait, like a read of a FIFO in the target)."""
        reply, passed = await self.call_passing(channel, request, timeout=timeout)
        if passed is not None:
            passed.close()  # nobody asked for one
        return reply

    async def call_passing(
        self, channel: int, request: m.Request, *, timeout: float | None = None
    ) -> tuple[Message, PassedFd | None]:
        """`call`, and the fd the agent handed over with the reply (`messages.passes_fd`;
        the caller owns it), or None."""
        if self.state != "open" or channel not in self.channels:
            raise ChannelLost(f"agent lost: {self.reason or 'channel closed'}")
        rid = self._next_request
        self._next_request += 1
        waiter = _Waiter(channel)
        self._pending[rid] = waiter
        self.requests += 1
        try:
            self.send(dataclasses.replace(request, request_id=rid), channel)  # type: ignore[type-var]
            if timeout is None:
                await waiter.event.wait()  # no cancel scope: ~10 µs per request saved
            else:
                with anyio.fail_after(timeout):
                    await waiter.event.wait()
        finally:
            self._pending.pop(rid, None)  # cancelled or timed out: a late reply is dropped
        if waiter.reply is None:
            raise ChannelLost(waiter.lost)
        return waiter.reply, waiter.passed

    def forward(
        self,
        channel: int,
        request: Undecoded | m.Request,
        client: ReplyTo,
        tail: list[PipePart] | None = None,
    ) -> bool:
        """Send the layer's `request` (a shared kind, 1-99; undecoded: its body goes through as
        bytes) on `channel` under a daemon request id; the agent's reply goes to `client`
        under the layer's request id, undecoded, from the reader callback. No time limit: a
        read of a FIFO in the target may rightly wait for ever (the reply, or the channel's or
        link's end, removes the entry). `tail`: an undecoded request's last bytes, in pipes
        of `write_pipes()` (the callee's from here on: written or released). False if the
        channel or the link is gone (nothing sent: the caller answers)."""
        writer = self._writer
        if self.state != "open" or channel not in self.channels or writer is None:
            release_parts(tail)
            return False
        rid = self._next_request
        try:
            if isinstance(request, Undecoded):
                frame = self.conn.forward(request, rid, channel, tail=tail or ())
            else:
                frame = self.conn.send(dataclasses.replace(request, request_id=rid), channel)  # type: ignore[type-var]
        except LocalProtocolError as exc:  # too big once re-addressed
            release_parts(tail)
            client.reply(
                m.ErrorReply(request_id=0, errno=errno_mod.EMSGSIZE, message=str(exc)),
                request.request_id,
            )
            return True
        self._next_request += 1
        self.spliced_writes += bool(tail)
        self._pending[rid] = _Forward(channel, client, request.request_id)
        self.requests += 1
        writer.send_nowait(frame)
        return True

    def open_channel(
        self,
        owner: ChannelOwner,
        *,
        pid: int,
        parent: int | None = None,
        label: str = "",
        counters: tuple[Counters, ...] = (),
    ) -> int:
        """A new channel for `owner`; its relays count their bytes into `counters` and the
        link's own."""
        channel = self._next_channel
        self._next_channel += 1
        if parent is not None and parent not in self.channels:
            parent = None  # the parent process is gone: the child starts without its handles
        self.channels[channel] = owner
        self.relays[channel] = ChannelRelays(
            _ChannelLink(self, channel, (self.counters, *counters)), channel
        )
        self.send(m.ChannelOpen(pid=pid, parent=parent, label=label), channel)
        return channel

    def close_channel(self, channel: int, reason: str = "") -> None:
        """Close `channel` from our side: the agent frees what it held; our relays reset."""
        if self.channels.pop(channel, None) is None:
            return
        self.send(m.ChannelClose(reason=reason), channel)
        self._channel_gone(channel, reason or "channel closed")

    def _channel_gone(self, channel: int, reason: str) -> None:
        table = self.relays.pop(channel, None)
        if table is not None:
            table.abort_all()
        for rid in [r for r, waiter in self._pending.items() if waiter.channel == channel]:
            self._pending.pop(rid).fail(reason)

    def new_conn_id(self) -> int:
        conn_id = self._next_conn
        self._next_conn += 2
        return conn_id

    def new_relay(
        self,
        channel: int,
        conn_id: int,
        description: str,
        *,
        mirror: bool = False,
        datagram: bool = False,
        incoming: bool = False,
    ) -> FlowRelay:
        """A relay for connection `conn_id` of `channel`, registered at once so that the
        agent's messages for it are routed to its flow before its socket exists (`attach`,
        then `run`, then `relay_done`). On a channel already gone it is born aborted."""
        flow = Flow(
            conn_id,
            window=self.conn.initial_window,
            max_chunk=RELAY_CHUNK,
            mirror=mirror,
            datagram=datagram,
            incoming=incoming,
        )
        table = self.relays.get(channel)
        if table is None:
            relay = FlowRelay(flow, _ChannelLink(self, channel, ()), description=description)
            relay.abort()
            return relay
        for c in table.link.counters:
            c.connections += 1
        return table.register(FlowRelay(flow, table.link, description=description))

    def relay_done(self, channel: int, relay: FlowRelay) -> None:
        """`relay` ended (or never started): the agent's late messages for it are dropped."""
        table = self.relays.get(channel)
        if table is not None:
            table.forget(relay)

    def start_task(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> bool:
        """Run `fn(*args)` in the link's task group (cancelled when the link goes)."""
        if self._tg is None or self.state != "open":
            return False
        self._tg.start_soon(self._guarded, fn, args)
        return True

    async def _guarded(
        self, fn: Callable[..., Coroutine[Any, Any, Any]], args: tuple[Any, ...]
    ) -> None:
        """A failing relay or request task is a bug to log, never the end of the link."""
        try:
            await fn(*args)
        except Exception:
            log.exception("task %s failed on %s", getattr(fn, "__qualname__", fn), self.handle.key)

    # -- receiving

    def _take_fd(self) -> PassedFd | None:
        passed = self._reader.take_fd() if self._reader is not None else None
        if passed is not None:
            self.handed_over += 1
        return passed

    def _dispatch(self, channel: int, msg: Message) -> None:
        if isinstance(msg, m.Reply):
            # an fd handed over with the reply: taken in frame order even if nobody waits
            passed = self._take_fd() if m.passes_fd(msg) else None
            waiter = self._pending.pop(msg.request_id, None)
            if waiter is not None:
                waiter.answer(msg, passed)
            elif passed is not None:
                passed.close()
            return
        if isinstance(msg, CONN_MESSAGES):
            table = self.relays.get(channel)
            relay = None if table is None else table.receive(msg)
            if relay is None:
                if isinstance(msg, m.Data):
                    # a connection we already closed: tell the agent again so it stops
                    self.send(m.ConnClose(conn_id=msg.conn_id, errno=errno_mod.ECONNRESET), channel)
                return
            if isinstance(msg, m.ConnClose) and msg.errno:
                owner = self.channels.get(channel)
                if owner is not None:
                    owner.on_conn_reset(msg.conn_id, msg.errno)
            return
        if isinstance(msg, m.Ping):
            self.send(m.Pong(nonce=msg.nonce), channel)
            return
        if channel == CONTROL_CHANNEL:
            if isinstance(msg, m.Fatal):
                self.reason = f"the agent closed the connection: {msg.code}: {msg.message}"
            return
        owner = self.channels.get(channel)
        if isinstance(msg, m.IncomingConnection):
            if owner is None:
                self.send(m.ConnClose(conn_id=msg.conn_id, errno=errno_mod.ECONNREFUSED), channel)
            else:
                owner.on_incoming(msg)
            return
        if isinstance(msg, m.ChannelClose | m.Fatal):
            reason = msg.reason if isinstance(msg, m.ChannelClose) else f"{msg.code}: {msg.message}"
            if self.channels.pop(channel, None) is not None:
                self._channel_gone(channel, f"the agent closed the channel: {reason}")
                if owner is not None:
                    owner.on_channel_closed(reason)
            return
        if isinstance(msg, m.TrafficStats):
            # `drops` are the agent's sniffer's (the kernel cannot tell ports apart): the
            # same figure comes for every mirrored port, on every mirroring channel.
            previous = self.traffic.get(msg.port, {}).get("kernel_drops", 0)
            self.traffic[msg.port] = {"packets": msg.packets, "kernel_drops": msg.drops}
            if msg.drops > previous:
                log.warning(
                    "agent reports %d kernel drops on mirrored port %d", msg.drops, msg.port
                )
            if owner is not None:
                owner.on_traffic_stats(msg)
            return
        log.debug("ignored %s on channel %d", type(msg).__name__, channel)
