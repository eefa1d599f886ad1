"""The relay shell shared by the daemon (asyncio) and the agent (trio): a `Flow` driven over
one byte stream, with anyio.

Owns: the two tasks of one relayed connection — reading the socket under the send window
(`Flow.read_size`) and writing the peer's data to it (`Flow.take_write`) — the direct write
of a peer's `Data` into an idle plain socket (no task switch for a small exchange), the drain
deadline after the peer's clean close, and closing the socket (with a reset when the flow
ended with an error). Does not own: the decisions (the `Flow` makes every one), creating the
socket, the channel's table of connections, or the stream to the peer (`RelayLink`).

Byte streams (TCP, unix) and connected UDP sockets (one `Data` per datagram, sent once the
window holds all of it). `RelayTable` is one channel's relays by connection id and the peer's
messages to them (the agent's channels and the daemon's per-channel tables are this one
class); `RawSocketStream` is a socket stream read only when asked (a relay reads its socket
only under credit).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Protocol, cast

import anyio
import anyio.abc
import anyio.lowlevel

from mirrord._frames import FrameReader, _running_asyncio_loop, plain_socket
from mirrord.protocol import WRITE_EOF, Flow, FlowState, Message, RemoteProtocolError
from mirrord.protocol.messages import ConnClose, Credit, Data, Shutdown

__all__ = [
    "CLOSE_DRAIN_TIMEOUT",
    "CONN_MESSAGES",
    "FlowRelay",
    "RawSocketStream",
    "RelayLink",
    "RelayTable",
]

log = logging.getLogger("mirrord.relay")

# After the peer's ConnClose(0): how long the Data queued before it may take to reach a
# socket whose reader is slow (or never reads), before the socket is closed regardless.
CLOSE_DRAIN_TIMEOUT = 60.0
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
_DATAGRAM_MAX = 65507  # the largest UDP payload over IPv4
# The peer's messages for one relayed connection.
CONN_MESSAGES = (Data, Credit, Shutdown, ConnClose)
RelayStream = anyio.abc.ByteStream | anyio.abc.ConnectedUDPSocket


class RelayLink(Protocol):
    """The stream to the peer as one relay sees it (bound to its channel).

    Every message a relay sends goes through `send_nowait`, in the order the flow decided
    them: a `Shutdown` or `Data` must never be overtaken by the `ConnClose` behind it, and a
    decided message must never be lost to a cancelled wait. Back-pressure is a separate wait
    (`wait_ready`) before the next read."""

    def send_nowait(self, msg: Message) -> None:
        """Queue `msg` for the peer, in order, without waiting."""

    async def wait_ready(self) -> None:
        """Until the stream to the peer is not too far behind (back-pressure on reading)."""

    def ready(self) -> bool:
        """Whether the stream to the peer is not too far behind (`wait_ready` would not
        wait)."""


class QueueingStream(Protocol):
    """An in-memory stream (the agent's pipes to its incoming code) that takes bytes
    without waiting, or says it is full: the peer's Data goes into it as it arrives."""

    def send_nowait(self, item: bytes) -> bool:
        """Queue `item`; False (nothing queued) when the reader is too far behind."""

    def read_directly(self, reader: Callable[[bytes], bool] | None) -> None:
        """While set, what is written while nothing is unread goes to `reader` at once
        (False from it: queued as usual); a relay reading the stream sets its `_pushed`."""


def _errno_of(exc: BaseException) -> int:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return cause.errno
        cause = cause.__cause__ or cause.__context__
    return errno_mod.ECONNRESET


def _arm_reset(stream: anyio.abc.ByteStream | anyio.abc.ConnectedUDPSocket) -> None:
    """Make the stream's close send a TCP RST (SO_LINGER 0): its peer sees ECONNRESET."""
    try:
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return  # not a socket (a pipe, a filter): its close is all there is
    with contextlib.suppress(OSError):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


class FlowRelay:
    """Connection `flow.conn_id` over `stream`: `run()` is its task; `receive`, `fail` and
    `abort` are called synchronously by the owner (the reader of the peer's stream).

    `stream` may come later (`attach`, before `run`): a relay registered before its socket
    is connected queues the peer's early `Data` in its flow instead of losing it."""

    def __init__(
        self,
        flow: Flow,
        link: RelayLink,
        stream: RelayStream | None = None,
        *,
        description: str = "",
        drain_timeout: float = CLOSE_DRAIN_TIMEOUT,
    ) -> None:
        self.flow = flow
        self.link = link
        self.stream: RelayStream | None = None
        self.description = description
        self._drain_timeout = drain_timeout
        self._raw: socket.socket | None = None
        # how the peer's Data goes out at once where no socket write can wait: a datagram
        # into a UDP socket, bytes into an in-memory stream (see `_put_directly`)
        self._put: Callable[[bytes], bool] | None = None
        if stream is not None:
            self.attach(stream)
        # Each task waits on its own event, set only when the flow moved its way: a relayed
        # round trip wakes none of them (the reads, the direct write and the Credit need none).
        self._wake_reader: anyio.Event | None = None  # socket -> peer, waiting for Credit
        self._wake_writer: anyio.Event | None = None  # peer -> socket, waiting for Data
        self._wake_end: anyio.Event | None = None  # run(), waiting for the end or the drain
        self._drain_seen = False
        self._reading = anyio.CancelScope()  # socket -> peer; cancelled when reading stops
        self._reader: FrameReader | None = None  # reading in the loop's callbacks (asyncio)
        self._reader_paused = False
        self._direct: FrameReader | None = None  # reading a plain socket by awaiting (trio)
        self.finished = anyio.Event()
        self.reads = 0  # reads of the socket that gave bytes (or a datagram)

    def __repr__(self) -> str:
        return f"<FlowRelay {self.description} {self.flow!r}>"

    def attach(self, stream: RelayStream) -> None:
        """The relay's socket, once connected (before `run`)."""
        if self.flow.datagram != isinstance(stream, anyio.abc.ConnectedUDPSocket):
            raise ValueError("a datagram flow goes with a connected UDP socket, and only it")
        self.stream = stream
        if isinstance(stream, anyio.abc.ConnectedUDPSocket):
            self._raw = None
            fd = stream.extra(anyio.abc.SocketAttribute.raw_socket).fileno()
            self._put = _datagram_sender(fd)
        else:
            self._raw = plain_socket(stream)
            send_nowait = getattr(stream, "send_nowait", None)
            if self._raw is None and callable(send_nowait):
                self._put = cast(QueueingStream, stream).send_nowait

    # -- from the peer's stream (sync: never waits) --------------------------------------

    def receive(self, msg: Message) -> None:
        """One of the peer's messages for this connection. Raises `RemoteProtocolError` when
        the peer broke the flow's rules (the flow is then in ERROR and the relay ends with a
        reset); the owner decides what that costs the peer's stream."""
        idle = self.flow.write_idle
        try:
            self._send_all(self.flow.receive(msg))
            if idle and isinstance(msg, Data):
                if self._raw is not None:
                    self._write_directly(self._raw)
                elif self._put is not None:
                    self._put_directly(self._put)
        finally:
            self._moved()

    def fail(self, errno: int) -> None:
        """Give the connection up: the peer is told `ConnClose(errno)`, the socket reset."""
        self._send_all(self.flow.fail(errno))
        self._moved()

    def socket_closed(self) -> None:
        """The user app closed its end of a datagram relay (there is no EOF on UDP): the
        association ends, the peer is told `ConnClose(0)`."""
        self._send_all(self.flow.socket_eof())
        self._moved()

    def abort(self) -> int:
        """End now without telling the peer (its stream or channel is gone); the errno the
        socket's side should learn (see `Flow.abort`)."""
        result = self.flow.abort()
        self._moved()
        return result

    # -- the task ------------------------------------------------------------------------

    async def run(self) -> None:
        """Relay until the flow is finished; the socket is closed when this returns."""
        if self.stream is None:
            raise RuntimeError(f"{self!r}: run() before attach()")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._socket_to_peer)
                tg.start_soon(self._peer_to_socket)
                await self._wait_finished()
                tg.cancel_scope.cancel()
        finally:
            if not self.flow.finished:
                self.flow.abort()  # cancelled by the owner: its channel is going away
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                if self.flow.reset_socket:
                    _arm_reset(self.stream)
                with contextlib.suppress(Exception):
                    await self.stream.aclose()
            self.finished.set()

    async def _wait_finished(self) -> None:
        deadline: float | None = None
        while not self.flow.finished:
            if deadline is None and self.flow.state is FlowState.DRAINING:
                self._drain_seen = True
                deadline = anyio.current_time() + self._drain_timeout
            self._wake_end = event = anyio.Event()
            if deadline is None:
                await event.wait()
                continue
            with anyio.move_on_after(deadline - anyio.current_time()):
                await event.wait()
            if anyio.current_time() >= deadline and not self.flow.finished:
                log.debug("%r: the drain ran out of time", self)
                self.flow.abort()

    async def _socket_to_peer(self) -> None:
        with self._reading:
            if self._raw is not None and _running_asyncio_loop() is not None:
                await self._read_in_callbacks(self._raw)
                return
            if self._raw is not None:  # recv directly; a checkpoint only when always ready
                assert isinstance(self.stream, anyio.abc.ByteStream)
                self._direct = FrameReader(self.stream, self.flow.max_chunk)
            read_directly = getattr(self.stream, "read_directly", None)
            if read_directly is not None:  # an in-memory pipe: its writer hands bytes over
                read_directly(self._pushed)
            try:
                await self._read_loop(
                    getattr(self.stream, "unreceive", None) if read_directly else None
                )
            finally:
                if read_directly is not None:
                    read_directly(None)

    async def _read_loop(self, unreceive: Callable[[bytes], None] | None) -> None:
        """`unreceive`: an in-memory pipe's, whose writer may have handed bytes over directly
        (`_pushed`) while this read waited: what the window no longer holds goes back."""
        while self.flow.reading:
            size = self.flow.read_size()
            if size == 0:
                await self._wait_reader()  # for Credit
                continue
            try:
                data = await self._receive(size)
            except anyio.EndOfStream:
                out = self.flow.socket_eof()
            except _GONE as exc:
                out = self.flow.socket_error(_errno_of(exc))
            else:
                if unreceive is not None and len(data) > (room := self.flow.read_size()):
                    unreceive(data[room:])
                    data = data[:room]
                    if not data:
                        continue
                self.reads += 1
                out = self.flow.socket_data(data)
            self._send_all(out)
            self._moved()
            await self.link.wait_ready()

    async def _read_in_callbacks(self, raw: socket.socket) -> None:
        """Read the socket from the event loop's reader callback (`FrameReader.run`): a read
        costs no task wake-up; the reader pauses while the window is spent. Back-pressure is
        the window alone here (the peer's stream holds at most a window per connection)."""
        del raw  # the reader finds it (a plain socket, as `_raw`)
        assert isinstance(self.stream, anyio.abc.ByteStream)
        self._reader = reader = FrameReader(self.stream, self.flow.max_chunk)
        if self.flow.read_size() == 0:
            self._reader_paused = True
            reader.pause_reading()
        try:
            await reader.run(self._socket_read, self.flow.read_size)
        except _GONE as exc:
            out = self.flow.socket_error(_errno_of(exc))
        else:
            out = self.flow.socket_eof()
        finally:
            self._reader = None
        self._send_all(out)
        self._moved()

    def _pushed(self, data: bytes) -> bool:
        """Bytes the stream's writer hands over while none are unread (an in-memory pipe:
        `QueueingStream.read_directly`), sent as a read of them would be, in the writer's
        call. False (the pipe keeps them for the task) when the window does not hold them or
        the peer's stream is behind."""
        if len(data) > self.flow.read_size() or not self.link.ready():
            return False
        self.reads += 1
        self._send_all(self.flow.socket_data(data))
        self._moved()
        return True

    def _socket_read(self, data: bytes) -> None:
        """One read of the socket (in the loop's reader callback)."""
        self.reads += 1
        self._send_all(self.flow.socket_data(data))
        self._moved()

    async def _wait_reader(self) -> None:
        self._wake_reader = event = anyio.Event()
        await event.wait()

    async def _receive(self, size: int) -> bytes:
        stream = self.stream
        assert stream is not None  # run() checked
        if self._direct is not None:
            return await self._direct.receive(size)
        if not isinstance(stream, anyio.abc.ConnectedUDPSocket):
            return await stream.receive(size)
        datagram = await stream.receive()
        while not self.flow.can_send(len(datagram)):  # a datagram is never split
            await self._wait_reader()
        return datagram

    async def _send(self, item: bytes | memoryview) -> None:
        stream = self.stream
        assert stream is not None  # run() checked
        if isinstance(stream, anyio.abc.ConnectedUDPSocket):
            with contextlib.suppress(OSError):  # lost, as on any network (ECONNREFUSED, ...)
                await stream.send(bytes(item[:_DATAGRAM_MAX]))
            return
        raw = self._raw
        if raw is None:
            await stream.send(bytes(item))  # bytes already (a memoryview is a direct write's)
            return
        view = memoryview(item)  # straight into the plain socket, as the direct write does
        while view:
            try:
                view = view[raw.send(view) :]
            except BlockingIOError:
                await anyio.wait_writable(raw)
            except OSError as exc:
                raise anyio.BrokenResourceError from exc

    async def _peer_to_socket(self) -> None:
        while not self.flow.finished:
            item = self.flow.take_write()
            if item is None:
                self._wake_writer = event = anyio.Event()
                await event.wait()
                continue
            if item is WRITE_EOF:
                assert isinstance(self.stream, anyio.abc.ByteStream)  # no EOF on datagrams
                with contextlib.suppress(*_GONE):
                    await self.stream.send_eof()
                out = self.flow.wrote_eof()
            else:
                assert isinstance(item, bytes | memoryview)
                try:
                    await self._send(item)
                except _GONE as exc:
                    self.flow.wrote(0)
                    out = self._unread_before_reset()
                    out += self.flow.socket_error(_errno_of(exc))
                else:
                    out = self.flow.wrote(len(item))
            self._send_all(out)
            self._moved()

    # -- helpers -------------------------------------------------------------------------

    def _unread_before_reset(self) -> list[Message]:
        """A write failed (the socket's peer reset it: a user app that answered and closed
        with our next bytes unread): what the peer sent before, still in the socket's receive
        queue, goes on first, as TCP lets a reader read what arrived before a reset (a
        mirrored request's answer read back, a stolen request's answer). Non-blocking, at most
        the send window and 64 reads."""
        raw = self._raw
        out: list[Message] = []
        if raw is None:
            return out
        for _ in range(64):
            size = self.flow.read_size() if self.flow.reading else 0
            if size == 0:
                break
            try:
                data = raw.recv(size, socket.MSG_DONTWAIT)
            except OSError:  # nothing more (EAGAIN), or the reset itself
                break
            if not data:
                break
            self.reads += 1
            out += self.flow.socket_data(data)
        return out

    def _write_directly(self, raw: socket.socket) -> None:
        """The peer's Data into an idle socket at once (non-blocking); the writing task
        takes what the socket did not."""
        item = self.flow.take_write()
        if item is None:
            return  # empty Data, or the flow ended
        assert isinstance(item, bytes)  # the queue was empty before this Data
        try:
            sent = raw.send(item)
        except OSError:
            sent = 0  # full (EAGAIN) or failing: the writing task writes it or meets the error
        # what the socket did not take is written next, as a view (no copy of it)
        rest = memoryview(item)[sent:] if sent < len(item) else b""
        self._send_all(self.flow.wrote(sent, rest))

    def _put_directly(self, put: Callable[[bytes], bool]) -> None:
        """The peer's Data handed on at once with `put` (False: no room now, the writing task
        takes it): a `ConnClose`, a reset or the channel's end read right after it (one batch of
        a busy peer) must not drop it from the flow's queue before the writing task ran."""
        item = self.flow.take_write()
        if item is None:
            return
        assert isinstance(item, bytes)  # the queue was empty before this Data
        try:
            taken = put(item)
        except _GONE:
            taken = False  # the writing task meets the error
        self._send_all(self.flow.wrote(len(item)) if taken else self.flow.wrote(0, item))

    def _send_all(self, msgs: Iterable[Message]) -> None:
        for msg in msgs:
            self.link.send_nowait(msg)

    def _moved(self) -> None:
        """The flow moved: wake (only) the tasks it moved for."""
        flow = self.flow
        reading = flow.reading
        if not reading:
            self._reading.cancel()
        if self._reader is not None:
            can_read = flow.read_size() > 0  # 0 when no longer reading
            if can_read == self._reader_paused:
                self._reader_paused = not can_read
                if can_read:
                    self._reader.resume_reading()
                else:
                    self._reader.pause_reading()
        event = self._wake_reader
        if event is not None and (not reading or flow.read_size() > 0):
            self._wake_reader = None
            event.set()
        finished = flow.finished
        event = self._wake_writer
        if event is not None and (finished or not flow.write_idle):
            self._wake_writer = None
            event.set()
        event = self._wake_end
        if event is not None and (
            finished or (not self._drain_seen and flow.state is FlowState.DRAINING)
        ):
            self._wake_end = None
            event.set()


class RelayTable:
    """The relays of one channel by connection id, and the peer's messages to them.

    A relay stays in the table from `register` until its task ends (`run`, or `forget` by an
    owner that runs it itself), also while it drains after the peer's `ConnClose(0)`; connection ids only
    grow on each side, so none is reused meanwhile."""

    def __init__(self, link: RelayLink, name: str) -> None:
        self.link = link
        self.name = name
        self._relays: dict[int, FlowRelay] = {}

    def __repr__(self) -> str:
        return f"<RelayTable {self.name} conns={len(self._relays)}>"

    def __len__(self) -> int:
        return len(self._relays)

    def __contains__(self, conn_id: int) -> bool:
        return conn_id in self._relays

    def get(self, conn_id: int) -> FlowRelay | None:
        return self._relays.get(conn_id)

    def running(self) -> list[FlowRelay]:
        """The relays whose connection has not ended yet."""
        return [relay for relay in self._relays.values() if not relay.finished.is_set()]

    def register(self, relay: FlowRelay) -> FlowRelay:
        self._relays[relay.flow.conn_id] = relay
        return relay

    def forget(self, relay: FlowRelay) -> None:
        conn_id = relay.flow.conn_id
        if self._relays.get(conn_id) is relay:
            del self._relays[conn_id]

    async def run(self, relay: FlowRelay) -> None:
        """`relay`'s task: relay until the connection ends, then forget it."""
        try:
            await relay.run()
        finally:
            self.forget(relay)

    def receive(self, msg: Data | Credit | Shutdown | ConnClose) -> FlowRelay | None:
        """One of the peer's messages for a connection; the relay it went to, or None when
        the connection is not (or no longer) here."""
        relay = self._relays.get(msg.conn_id)
        if relay is None:
            return None
        before = relay.flow.state
        try:
            relay.receive(msg)
        except RemoteProtocolError as exc:
            # The peer broke this connection's rules (Data after its Shutdown, or beyond the
            # window): the connection is reset on both sides, the channel goes on.
            log.warning("%s: %s: the connection is reset", self.name, exc.message)
            if before is not FlowState.DRAINING:  # the peer's side is still there
                self.link.send_nowait(ConnClose(conn_id=msg.conn_id, errno=errno_mod.EPROTO))
        return relay

    def fail(self, conn_id: int, errno: int) -> None:
        """Give connection `conn_id` up: the peer is told `ConnClose(errno)` at once."""
        relay = self._relays.get(conn_id)
        if relay is not None:
            relay.fail(errno)

    def abort_all(self) -> list[tuple[FlowRelay, int]]:
        """End every relay without telling the peer (the channel or its stream is gone).
        Returns those that were still running, each with the errno its socket's side should
        learn (`Flow.abort`); one that had ended already (e.g. refused) keeps its reason."""
        aborted = []
        for relay in list(self._relays.values()):
            running = not relay.flow.finished
            errno = relay.abort()
            if running:
                aborted.append((relay, errno))
        return aborted


class RawSocketStream(anyio.abc.SocketStream):
    """A stream over a connected socket that reads only when `receive()` is called.

    anyio's asyncio streams for TCP sockets (`accept()`, `SocketStream.from_socket()`) read
    through an asyncio transport that is only paused after a `receive()` had to wait: a user
    app that uploads faster than the agent's credit window lets the daemon read, kept the
    transport reading into an unbounded queue (a 4 GiB upload grew the daemon to 3.1 GB).
    Here unread bytes stay in the kernel's socket buffer, so TCP's own window stops the app
    while the relay waits for credit."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._closed = False

    def __repr__(self) -> str:
        return f"<RawSocketStream fd={self._sock.fileno()} closed={self._closed}>"

    @property
    def _raw_socket(self) -> socket.socket:
        return self._sock

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()  # a peer that never stops sending starves nobody
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        view = memoryview(item)
        while view:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self._sock)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            view = view[sent:]

    async def send_eof(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise anyio.BrokenResourceError from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)  # wakes a task waiting in wait_readable/writable
            self._sock.close()
        await anyio.lowlevel.checkpoint()


def _datagram_sender(fd: int) -> Callable[[bytes], bool]:
    """`put` for a connected UDP socket's fd: one datagram, as the user app's sendto() sent
    it; False only when the socket is full."""

    def put(item: bytes) -> bool:
        try:
            os.write(fd, item[:_DATAGRAM_MAX])
        except BlockingIOError:
            return False
        except OSError:
            pass  # lost, as on any network (ECONNREFUSED from an earlier one, ...)
        return True

    return put
