"""One daemon connection to the agent: handshake, channels, and the frames on it.

Owns: authenticating the daemon (`AgentConnection` checks the secret and versions; a failed
handshake gets the error frame and is closed), reading frames and routing each to its channel,
opening (and forking) and closing channels, answering Ping and unknown requests, and writing
frames in order (`send`/`send_nowait` onto one `mirrord._frames.FrameWriter`: a frame goes
straight into the socket when nothing is queued before it, else to the queue its writer task
writes; `send` then waits while more than `_HIGH_WATER` bytes are queued, which is the
backpressure relays rely on). A malformed frame closes this connection only (after an error
frame); its channels, handles and sockets are freed with it. Nothing here touches another
daemon connection.
Does not own: what a request does (`_channel.py`).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, NamedTuple, Protocol

import anyio
import anyio.abc

from mirrord import __version__
from mirrord._frames import Frame, FrameReader, FrameWriter, Passable
from mirrord._splice import PipeFill, PipePart, PipePool
from mirrord.agent._channel import Channel, PipedWrite
from mirrord.protocol import (
    CLOSED,
    CONTROL_CHANNEL,
    NEED_DATA,
    AgentConnection,
    AgentRole,
    InvalidRequest,
    LocalProtocolError,
    MalformedFrame,
    Message,
    Received,
    RemoteProtocolError,
    State,
    UnknownMessage,
    read_head,
    read_optional_uint,
    read_uints_then_bytes,
)
from mirrord.protocol import messages as m

if TYPE_CHECKING:
    from mirrord.agent._channel import IncomingHandler
    from mirrord.agent._context import AgentContext
    from mirrord.agent._workers import BlockingWorkers


class SessionOwner(Protocol):
    """What a daemon connection needs of the agent (`AgentServer`, which imports this module;
    the session never imports it back)."""

    ctx: AgentContext
    secret: str
    incoming: IncomingHandler | None
    incoming_settled: anyio.Event  # set once `incoming` started (or failed to)
    workers: BlockingWorkers
    handshaking: int  # connections that have not authenticated yet

    def session_started(self, session: DaemonSession) -> None: ...

    def session_ended(self, session: DaemonSession) -> None: ...


__all__ = ["DaemonSession"]

log = logging.getLogger("mirrord.agent")

HANDSHAKE_TIMEOUT = 10.0
_READ_SIZE = 256 * 1024
_SEND_TIMEOUT_ON_CLOSE = 2.0
# `send` waits while more than this is queued for the daemon (relays then stop reading their
# sockets); `send_nowait` (replies to requests, bounded by request_slots) never waits.
_HIGH_WATER = 1024 * 1024
# Replies a daemon does not read: past this much queued the agent reads no further frames
# from it (so its requests make no more replies), and if it then takes none of them for
# `unread_timeout()` seconds the connection is closed with the reason in the agent's log.
# Before, every unread reply stayed queued (+99 B per FileStat, without bound). At most
# `_PAUSE_READING` + 256 in-flight replies (request_slots) are ever queued.
_PAUSE_READING = 4 * 1024 * 1024
_UNREAD_TIMEOUT = 30.0
UNREAD_TIMEOUT_ENV = "MIRRORD_AGENT_UNREAD_TIMEOUT"
# The most bytes read from a connection before it has authenticated: a Hello is a few hundred
# bytes; before, a peer without the secret could make the agent buffer a whole 2 MiB frame.
HELLO_LIMIT = 64 * 1024


def unread_timeout() -> float:
    """`MIRRORD_AGENT_UNREAD_TIMEOUT` (seconds), else 30."""
    try:
        value = float(os.environ.get(UNREAD_TIMEOUT_ENV, ""))
    except ValueError:
        return _UNREAD_TIMEOUT
    return value if value > 0 else _UNREAD_TIMEOUT


class _PipedStart(NamedTuple):
    """A large `FileWrite` taken from the decoder (`DaemonSession._piped_write`)."""

    channel: int
    request_id: int
    handle: int
    data: bytes  # what came with the frame's head
    fill: PipeFill  # the rest of the data, into pipes
    after: int  # the bytes after the data (the offset)


class DaemonSession:
    """The agent's side of one daemon connection."""

    def __init__(self, server: SessionOwner, stream: anyio.abc.ByteStream, peer: str) -> None:
        self.server = server
        self.ctx = server.ctx
        self.stream = stream
        self.peer = peer
        # frames --> writer.send_nowait (straight into the socket when nothing waits, else
        # queued for the one writer task, `_write_frames`); reader.receive <-- the daemon
        self.writer = FrameWriter(stream, f"daemon {peer}")
        self.reader = FrameReader(stream, _READ_SIZE)
        features = [m.FEATURE_UNIX_STREAMS, m.FEATURE_INCOMING_TLS]
        # a daemon on a unix socket is on this machine: opened files and connected sockets
        # can be handed to it (and on to the layer) instead of relayed (`can_hand_over`)
        if self.writer.can_pass:
            features.append(m.FEATURE_HANDOVER)
        self.conn = AgentConnection(
            AgentRole.AGENT,
            secret=server.secret,
            invalid_requests_as_events=True,
            features=features,
        )
        self.channels: dict[int, Channel] = {}
        # large reads' replies go through pipes into a unix socket (`mirrord._splice`), and
        # large writes' data from it into the file (`_piped_write`)
        self.pipes = PipePool() if self.writer.can_splice else None
        self._sock = (
            None if self.pipes is None else stream.extra(anyio.abc.SocketAttribute.raw_socket)
        )
        self._write_checked = 0  # the last large frame `_piped_write` looked at
        self.request_slots = anyio.Semaphore(self.ctx.max_requests_per_connection)
        self._scope: anyio.CancelScope | None = None  # the whole serving, writer included
        self._tg: anyio.abc.TaskGroup | None = None
        self.authenticated = False

    # -- what its channels need (`ChannelOwner`) -------------------------------------------------

    @property
    def can_hand_over(self) -> bool:
        """fds may go to this daemon: both ends said so (each announces `handover` only when
        its own end of the stream is a unix socket, so a proxy in between, which would drop
        the fds, leaves it off)."""
        return self.writer.can_pass and m.FEATURE_HANDOVER in self.conn.peer_features

    @property
    def incoming(self) -> IncomingHandler | None:
        return self.server.incoming

    async def settled_incoming(self) -> IncomingHandler | None:
        await self.server.incoming_settled.wait()
        return self.server.incoming

    @property
    def workers(self) -> BlockingWorkers:
        return self.server.workers

    @property
    def initial_window(self) -> int:
        return self.conn.initial_window

    def forget_channel(self, channel: Channel) -> None:
        if self.channels.get(channel.number) is channel:
            del self.channels[channel.number]

    def __repr__(self) -> str:
        return f"<DaemonSession peer={self.peer} channels={len(self.channels)} {self.conn!r}>"

    # -- writing -------------------------------------------------------------------------------

    def _frame(self, msg: Message, channel: int) -> Frame | None:
        if self.writer.closed or self.conn.state is not State.OPEN:
            return None
        try:
            return self.conn.send_parts(msg, channel)
        except LocalProtocolError as exc:
            log.error("not sending %s on channel %d: %s", type(msg).__name__, channel, exc)
            return None

    def send_nowait(self, msg: Message, channel: int = CONTROL_CHANNEL) -> None:
        """Send `msg` on `channel` without waiting (replies). Never raises."""
        frame = self._frame(msg, channel)
        if frame is not None:
            self.writer.send_nowait(frame)

    def send_passing(self, msg: Message, channel: int, passing: Passable) -> None:
        """Send `msg` on `channel` with `passing` (an fd, owned by the writer from here on)
        handed to the daemon with it (`can_hand_over` streams only). Never raises."""
        frame = self._frame(msg, channel)
        if frame is None:
            passing.close()
            return
        self.writer.send_nowait(frame, (passing,))

    def send_spliced(self, request_id: int, channel: int, part: PipePart, rest: bytes) -> None:
        """A `FileData` reply whose bytes are in `part`'s pipe (the writer's from here on: it
        splices them into the socket), then `rest`. Never raises."""
        if self.writer.closed or self.conn.state is not State.OPEN:
            part.release()
            return
        try:
            frame = self.conn.file_data_parts(request_id, [part, rest] if rest else [part], channel)
        except LocalProtocolError as exc:
            log.error("not sending FileData on channel %d: %s", channel, exc)
            part.release()
            return
        self.writer.send_nowait(frame)

    async def send(self, msg: Message, channel: int = CONTROL_CHANNEL) -> None:
        """Send `msg` on `channel`; waits while too much is queued for the daemon. Never
        raises: a broken daemon connection ends the session (its tasks are cancelled) and
        later sends are dropped."""
        frame = self._frame(msg, channel)
        if frame is None:
            return
        self.writer.send_nowait(frame)
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Back-pressure (relays wait here before reading their sockets again): once more
        than `_HIGH_WATER` is queued for the daemon, until it took all of it (one wake-up per
        megabyte, not per batch). Never raises; a daemon that takes nothing for
        `unread_timeout()` seconds is disconnected (see `_wait_taken`)."""
        if not self.ready():
            await self._wait_taken(0)

    def ready(self) -> bool:
        """Whether `wait_ready` would return at once."""
        return self.writer.queued_bytes <= _HIGH_WATER

    async def _write_frames(self, scope: anyio.CancelScope) -> None:
        """The writer task; its end (the daemon connection broke, or the writer closed after
        the last frame) ends the session."""
        await self.writer.run()
        scope.cancel()

    def _break(self) -> None:
        self.writer.close()
        if self._scope is not None:
            self._scope.cancel()

    async def send_fatal(self, code: str, message: str) -> None:
        """Tell the daemon why the agent is closing this connection."""
        if self.conn.state is State.OPEN:
            self.writer.send_nowait(self.conn.fatal_frame(code, message))
            with anyio.move_on_after(_SEND_TIMEOUT_ON_CLOSE):
                await self.writer.wait_queued_below(0)

    # -- serving -------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Serve the connection until the daemon leaves or breaks the protocol; then write
        what is queued (at most `_SEND_TIMEOUT_ON_CLOSE` seconds) and close it."""
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                tg.start_soon(self._write_frames, tg.cancel_scope)
                await self._serve()
                self.writer.close()
                with anyio.move_on_after(_SEND_TIMEOUT_ON_CLOSE):
                    await self.writer.wait_flushed()
                tg.cancel_scope.cancel()
        finally:
            if self.pipes is not None:
                self.pipes.close()
            with anyio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _serve(self) -> None:
        self.server.handshaking += 1
        try:
            if not await self._handshake():
                return
        finally:
            self.server.handshaking -= 1
        self.authenticated = True
        log.info("daemon connected from %s (protocol %s)", self.peer, self.conn.negotiated_version)
        self.server.session_started(self)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._open_channel(CONTROL_CHANNEL, m.ChannelOpen(pid=0, label="control"))
                await self._read_loop()
                tg.cancel_scope.cancel()
        finally:
            for channel in list(self.channels.values()):
                channel.close()
            self.channels.clear()
            self.server.session_ended(self)
            log.info("daemon connection from %s closed", self.peer)

    async def _receive(self, max_bytes: int = _READ_SIZE) -> bytes | memoryview:
        """The next bytes from the daemon, b"" at the end or on an error; the rest of a large
        frame is received in place (`receive_buffer`)."""
        try:
            return await self.reader.receive(max_bytes, into=self.conn.receive_buffer())
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return b""

    async def _handshake(self) -> bool:
        received = 0
        with anyio.move_on_after(HANDSHAKE_TIMEOUT):
            while True:
                if received >= HELLO_LIMIT:
                    log.warning(
                        "refused a daemon connection from %s: %d bytes without a valid Hello",
                        self.peer,
                        received,
                    )
                    self.writer.send_nowait(
                        self.conn.fatal_frame(
                            "handshake_too_large",
                            f"no Hello within the first {HELLO_LIMIT} bytes: closing",
                        )
                    )
                    return False
                data = await self._receive(HELLO_LIMIT - received)
                received += len(data)
                self.conn.receive_data(data)
                try:
                    event = self.conn.next_event()
                except RemoteProtocolError as exc:
                    log.warning("refused a daemon connection from %s: %s", self.peer, exc.message)
                    self.writer.send_nowait(self.conn.error_frame(exc))
                    return False
                if event is CLOSED:
                    return False
                if event is NEED_DATA:
                    continue
                # The only event the handshake lets through is a valid Hello.
                self.writer.send_nowait(
                    self.conn.welcome(agent_version=__version__, target=self.ctx.target.spec)
                )
                return True
        log.warning(
            "daemon connection from %s sent no Hello within %.0f s", self.peer, HANDSHAKE_TIMEOUT
        )
        self.writer.send_nowait(
            self.conn.fatal_frame(
                "handshake_timeout", f"no Hello within {HANDSHAKE_TIMEOUT:.0f} s: closing"
            )
        )
        return False

    async def _read_loop(self) -> None:
        while True:
            while True:
                try:
                    event = self.conn.next_event()
                except RemoteProtocolError as exc:
                    log.warning("closing the daemon connection from %s: %s", self.peer, exc.message)
                    self.writer.send_nowait(self.conn.error_frame(exc))
                    return
                if event is NEED_DATA:
                    break
                if event is CLOSED:
                    return
                if isinstance(event, UnknownMessage):
                    if event.request_id is not None:
                        await self.send(
                            m.ErrorReply(
                                request_id=event.request_id,
                                errno=errno.ENOSYS,
                                message=f"message kind {event.kind} is unknown to this agent",
                            ),
                            event.channel,
                        )
                    continue
                if isinstance(event, InvalidRequest):
                    # The sender's error, for that request only (e.g. an offset beyond 64 bits).
                    log.debug("invalid request on channel %d: %s", event.channel, event.reason)
                    await self.send(
                        m.ErrorReply(
                            request_id=event.request_id,
                            errno=event.errno,
                            message=event.reason,
                        ),
                        event.channel,
                    )
                    continue
                assert isinstance(event, Received)
                if not await self._dispatch(event.channel, event.message):
                    return
            if self.writer.queued_bytes > _PAUSE_READING and not await self._wait_taken(
                _PAUSE_READING
            ):
                return
            piped = self._piped_write()
            if piped is not None:
                if not await self._receive_piped(piped):
                    return
                continue
            self.conn.receive_data(await self._receive())

    def _piped_write(self) -> _PipedStart | None:
        """A large `FileWrite` on an inline handle that has begun to come: its data goes from
        the socket into pipes and from them into the file (`mirrord._splice`), copied by the
        kernel once, instead of into memory and from it into the file; the frame is taken
        from the decoder. None for any other frame (decided once per large frame, at its first
        read), which is received in place as before."""
        if self._sock is None or self.conn.large_frames == self._write_checked:
            return None
        self._write_checked = self.conn.large_frames
        large = self.conn.large_prefix()
        head = None if large is None else read_head(large[0], 3)
        if large is None or head is None:
            return None
        (number, kind, rid), items, body = head
        write = read_uints_then_bytes(large[0], body, 1)
        # [channel, kind, request id, handle, data, offset]; larger than one read, so some
        # of the data and all of the offset are still to come
        if kind != m.FileWrite.KIND or items != 6 or write is None or write[1] <= _READ_SIZE:
            return None
        (handle,), size, start = write
        channel = self.channels.get(number)
        if channel is None or size > m.MAX_DATA_CHUNK or not channel.takes_piped_write(handle):
            return None
        assert self.pipes is not None
        try:
            pipe = self.pipes.take()
        except OSError as exc:
            log.debug("no pipe for a large write (%s): received in place", exc)
            return None
        payload, rest = self.conn.take_large()
        data = payload[start:]
        fill = PipeFill(self.pipes, pipe, size - len(data), lambda fill: None)
        return _PipedStart(number, rid, handle, data, fill, rest - fill.size)

    async def _receive_piped(self, start: _PipedStart) -> bool:
        """Take the rest of `_piped_write`'s frame from the socket and start the write; False
        when the stream ended (or broke) before the frame did."""
        number, rid, handle, data, fill, after = start
        sock = self._sock
        assert sock is not None
        tail = bytearray()
        try:
            while fill.left:
                try:
                    if not fill.receive_from(sock.fileno()):
                        return False  # the stream ended inside a frame: the daemon's error
                except BlockingIOError:
                    await anyio.wait_readable(sock)
            while len(tail) < after:
                try:
                    got = sock.recv(after - len(tail))
                except BlockingIOError:
                    await anyio.wait_readable(sock)
                    continue
                if not got:
                    return False
                tail += got
        except OSError as exc:
            log.info("the daemon connection from %s broke: %s", self.peer, exc)
            return False
        finally:
            if fill.left or len(tail) < after:
                fill.close()
        if fill.copy is not None:  # the pipes filled up: copied after all
            data += fill.copy
        parts = fill.take_parts()
        try:
            offset = read_optional_uint(tail)
        except MalformedFrame:
            for part in parts:
                part.release()
            await self.send(
                m.ErrorReply(request_id=rid, errno=errno.EINVAL, message="FileWrite: bad offset"),
                number,
            )
            return True
        req = PipedWrite(rid, handle, data, parts, offset)
        channel = self.channels.get(number)
        if channel is None:
            req.release()
            await self.send(
                m.ErrorReply(request_id=rid, errno=errno.EBADF, message="channel closed"), number
            )
            return True
        await channel.dispatch_piped(req)
        return True

    async def _wait_taken(self, bound: int) -> bool:
        """Wait until at most `bound` bytes are queued for the daemon. False (the connection
        is closed, the reason logged) when the daemon took nothing for `unread_timeout()`
        seconds meanwhile: it does not read what it asked for."""
        timeout = unread_timeout()
        writer = self.writer
        while writer.queued_bytes > bound and not writer.closed:
            taken = writer.written_bytes
            with anyio.move_on_after(timeout):
                await writer.wait_queued_below(bound)
            if writer.written_bytes == taken and writer.queued_bytes > bound and not writer.closed:
                log.warning(
                    "closing the daemon connection from %s: it took none of the %d bytes "
                    "queued for it in %.0f s (it does not read its replies)",
                    self.peer,
                    writer.queued_bytes,
                    timeout,
                )
                self._break()
        return not writer.closed

    async def _dispatch(self, number: int, msg: Message) -> bool:
        """Route one message; False when the connection is over."""
        if isinstance(msg, m.ChannelOpen):
            await self._open_channel(number, msg)
        elif isinstance(msg, m.ChannelClose):
            channel = self.channels.pop(number, None)
            if channel is not None:
                channel.close()
        elif isinstance(msg, m.Fatal):
            if number == CONTROL_CHANNEL:
                log.info(
                    "the daemon at %s closed the connection: %s: %s",
                    self.peer,
                    msg.code,
                    msg.message,
                )
                return False
            channel = self.channels.pop(number, None)
            if channel is not None:
                channel.close()
        elif isinstance(msg, m.Ping):
            await self.send(m.Pong(nonce=msg.nonce), number)
        elif isinstance(msg, m.Pong):
            pass
        else:
            channel = self.channels.get(number)
            if channel is not None:
                await channel.dispatch(msg)
            elif isinstance(msg, m.Request):
                await self.send(
                    m.ErrorReply(
                        request_id=msg.request_id,
                        errno=errno.EBADF,
                        message=f"channel {number} is not open: send ChannelOpen first",
                    ),
                    number,
                )
        return True

    async def _open_channel(self, number: int, msg: m.ChannelOpen) -> None:
        assert self._tg is not None
        old = self.channels.pop(number, None)
        if old is not None:
            log.warning("channel %d opened again: the old one is closed", number)
            old.close()
        handles = None
        if msg.parent is not None:
            parent = self.channels.get(msg.parent)
            if parent is not None:
                handles = parent.handles.copy()
        channel = Channel(self, number, pid=msg.pid, label=msg.label, handles=handles)
        self.channels[number] = channel
        await self._tg.start(channel.run)
