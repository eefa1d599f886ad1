"""The frame stream layer shared by the daemon (asyncio) and the agent (trio), over anyio.

Owns: reading a byte stream for a protocol reader (`FrameReader`) and writing frames to it
in order from any number of producers that never wait (`FrameWriter`: one writer task,
several queued frames per write, sockets passed with a frame over a unix socket). Does not
own what the bytes mean (`mirrord.protocol` decodes them: `AgentConnection`,
`LayerConnection`, `FrameDecoder`) nor what a connection does with them (`Flow`).

Both classes take a shortcut on a plain socket (a unix socket under either backend, a TCP
socket under trio; not asyncio's transport-backed TCP streams, whose transports buffer): they
call `recv`/`send` on it directly and wait with `anyio.wait_readable`/`wait_writable`, which
saves a task switch and a pass of the event loop per remote call (docs/performance.md).

A reader is used one of two ways: a protocol loop awaits `receive()` (the agent's, under
trio), or `run(on_data)` hands every read to a synchronous callback. Under asyncio, on a
plain socket, `run` reads from the event loop's reader callback: the socket is registered
with the selector once for the stream's life, and a read costs no task wake-up, no future and
no selector change (anyio's `wait_readable` registers and unregisters the socket around every
wait, and the awaiting task then needs a pass of the loop of its own). Elsewhere `run` is the
awaiting loop, so its users are written once for both.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, overload

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute

from mirrord._splice import PipePart, release_parts, splice_supported

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "BATCH_LIMIT",
    "SEND_BUFFER",
    "Frame",
    "FrameReader",
    "FrameWriter",
    "Passable",
    "PassedFd",
    "SpliceIn",
    "plain_socket",
]

# One write of the writer task: several queued frames joined, up to this much, so a burst of
# small frames costs one system call and one wake-up of the peer; a stalled peer is noticed
# per batch, not per everything queued.
BATCH_LIMIT = 1024 * 1024
# A socket's send buffer bounds what one write moves: the default ~200 KiB splits every 1 MiB
# file chunk into five or more writes, each a wake-up of both sides (best effort: the kernel
# caps it at net.core.wmem_max).
SEND_BUFFER = 4 * 1024 * 1024

# At most this many fds arrive with one read (the peer passes one per frame, and a read
# ends at the bytes that came with fds): more are closed at once.
MAX_FDS_PER_READ = 16


class Passable(Protocol):
    """What may be passed with a frame: a socket, or any open fd (`PassedFd`)."""

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class PassedFd:
    """An fd of any kind (a regular file, a socket) owned by whoever holds this: `close()`
    closes it once; `detach()` gives it up."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __repr__(self) -> str:
        return f"<PassedFd {self._fd}>"

    def __del__(self) -> None:
        self.close()

    def fileno(self) -> int:
        return self._fd

    def detach(self) -> int:
        fd, self._fd = self._fd, -1
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


# A frame as one buffer, or as a list of parts written with one scatter write (a large body
# is never joined to its head: `mirrord.protocol.frame_parts_with_head`); a part may be bytes
# waiting in a pipe (`PipePart`, plain sockets only: spliced into the socket).
Frame = bytes | memoryview | Sequence[bytes | memoryview | PipePart]
_Part = bytes | memoryview | PipePart
_Queued = tuple[_Part, tuple[Passable, ...]]  # a memoryview: not copied
# sendmsg takes at most IOV_MAX (1024) buffers: a batch of parts stays well below
_MAX_PARTS = 256
_LARGE_PART = 64 * 1024
_STREAM_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def plain_socket(
    stream: anyio.abc.AnyByteReceiveStream | anyio.abc.AnyByteSendStream,
) -> socket.socket | None:
    """The stream's socket if it is a plain stream socket we may `recv`/`send` on directly."""
    try:
        raw = stream.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return None
    # asyncio's transport streams hand out a TransportSocket, not a socket.socket: skipped
    if isinstance(raw, socket.socket) and raw.type == socket.SOCK_STREAM:
        return raw
    return None


class SpliceIn(Protocol):
    """The rest of a large frame taken from the socket into a pipe (`FrameReader.run`'s
    `splice`)."""

    def receive_from(self, fd: int) -> int:
        """Move what the socket `fd` has now (non-blocking); the bytes moved, 0 at the end of
        the stream; `BlockingIOError` when it has none."""
        ...


class FrameReader:
    """Reads a byte stream for a protocol reader: `receive()` to await the next bytes, or
    `run(on_data)` to have each read handed to a callback (see the module docstring).

    `receive()` is the stream's `receive` minus a scheduling point: anyio's yields to the
    event loop before every read (a whole loop iteration) and registers the socket with the
    selector for every wait. On a plain socket this reads directly and waits with
    `anyio.wait_readable`; it yields only when data was there twice in a row, so a peer that
    never stops sending cannot starve the other tasks.
    """

    def __init__(
        self,
        stream: anyio.abc.ByteReceiveStream,
        max_bytes: int = 256 * 1024,
        *,
        receive_fds: bool = False,
    ) -> None:
        self._stream = stream
        self._max = max_bytes
        self._raw = plain_socket(stream)
        self._ready_before = False
        # receive_fds on a unix socket: fds the peer passed (SCM_RIGHTS), in the order they
        # came; the bytes they came with are no later than the frame they belong to, so the
        # protocol reader pairs them with frames in order (`messages.passes_fd`)
        self.passed: deque[PassedFd] = deque()
        self._receive_fds = (
            receive_fds and self._raw is not None and self._raw.family == socket.AF_UNIX
        )
        self._paused = False
        self._resumed: anyio.Event | None = None  # run()'s awaiting loop waits on it
        self._loop: asyncio.AbstractEventLoop | None = None  # run() on the loop's callback
        self._readable: Callable[[], None] | None = None
        self.reads = 0

    def __repr__(self) -> str:
        mode = "callback" if self._loop is not None else "await"
        return (
            f"<FrameReader max={self._max} direct={self._raw is not None} {mode} "
            f"paused={self._paused} reads={self.reads}>"
        )

    @overload
    async def receive(self, max_bytes: int | None = None, *, into: None = None) -> bytes: ...

    @overload
    async def receive(
        self, max_bytes: int | None = None, *, into: memoryview | None
    ) -> bytes | memoryview: ...

    async def receive(
        self, max_bytes: int | None = None, *, into: memoryview | None = None
    ) -> bytes | memoryview:
        """The next bytes (at most `max_bytes`, default the reader's); raises like
        `ByteReceiveStream.receive`: `EndOfStream` at the end, `BrokenResourceError` when the
        stream failed, `ClosedResourceError` when it was closed under us. `into`: a buffer to
        receive into in place, as much as fits (on a plain socket; the protocol's
        `receive_buffer`): the result is then the filled slice of it."""
        size = self._max if max_bytes is None else max_bytes
        raw = self._raw
        if raw is None:
            received = await self._stream.receive(size)
            self.reads += 1
            return received
        if self._ready_before:
            await anyio.lowlevel.checkpoint()
        waited = False
        while True:
            try:
                if into is not None:
                    data: bytes | memoryview = self._recv_into(raw, into)
                else:
                    data = self._recv_fds(raw, size) if self._receive_fds else raw.recv(size)
            except BlockingIOError:
                waited = True
                await anyio.wait_readable(raw)
                continue
            except OSError as exc:
                if raw.fileno() < 0:
                    raise anyio.ClosedResourceError from None
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            self._ready_before = not waited
            self.reads += 1
            return data

    @property
    def receives_fds(self) -> bool:
        """Whether fds the peer passes arrive (`receive_fds` on a plain unix socket)."""
        return self._receive_fds

    def take_fd(self) -> PassedFd | None:
        """The oldest fd received and not taken yet, or None."""
        return self.passed.popleft() if self.passed else None

    def close_fds(self) -> None:
        while self.passed:
            self.passed.popleft().close()

    def _recv_into(self, raw: socket.socket, view: memoryview) -> memoryview:
        """Receive into `view` in place; the filled slice (empty at the end of the stream)."""
        if self._receive_fds:
            n, ancdata, _flags, _addr = raw.recvmsg_into(
                [view], socket.CMSG_SPACE(MAX_FDS_PER_READ * 4), socket.MSG_CMSG_CLOEXEC
            )
            self._keep_fds(ancdata)
        else:
            n = raw.recv_into(view)
        return view[:n]

    def _recv_fds(self, raw: socket.socket, size: int) -> bytes:
        data, ancdata, _flags, _addr = raw.recvmsg(
            size, socket.CMSG_SPACE(MAX_FDS_PER_READ * 4), socket.MSG_CMSG_CLOEXEC
        )
        self._keep_fds(ancdata)
        return data

    def _keep_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, payload in ancdata:
            if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
                continue
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                self.passed.append(PassedFd(fd))

    @overload
    async def run(
        self, on_data: Callable[[bytes], None], read_size: Callable[[], int] | None = None
    ) -> None: ...

    @overload
    async def run(
        self,
        on_data: Callable[[bytes | memoryview], None],
        read_size: Callable[[], int] | None = None,
        *,
        into: Callable[[], memoryview | None],
        splice: Callable[[], SpliceIn | None] | None = None,
    ) -> None: ...

    async def run(
        self,
        on_data: Callable[[Any], None],
        read_size: Callable[[], int] | None = None,
        *,
        into: Callable[[], memoryview | None] | None = None,
        splice: Callable[[], SpliceIn | None] | None = None,
    ) -> None:
        """Read until the stream ends, calling `on_data(bytes)` with each read, in order.

        Returns at the end of the stream; raises what `on_data` raised (reading stops at
        once), or like `receive()` when the stream fails. `on_data` must not block: under
        asyncio it runs in the event loop's reader callback, outside any task (it may set
        events, start tasks in a task group, queue frames on a `FrameWriter`).
        `pause_reading()`/`resume_reading()` stop and restart the reads (back-pressure).
        `read_size()`: how much the next read may take (a relay's credit window; pause the
        reader while it is 0), else the reader's `max_bytes`. `into()`: a buffer the next read
        may fill in place, as much as fits (the protocol's `receive_buffer`: the rest of a
        large frame), or None; `on_data` then gets the filled slice of it, a memoryview.
        `splice()`: asked before each read in the event loop's callback (asyncio, plain
        socket; never elsewhere), a `SpliceIn` that takes the next bytes from the socket
        instead (into its pipe: the rest of a large frame, see `mirrord._splice`), or None.
        The stream ending while one is unfinished ends `run()` as any end does: the owner
        of the unfinished `SpliceIn` knows a frame was cut short."""
        loop = _running_asyncio_loop()
        if loop is None or self._raw is None:
            await self._run_awaiting(on_data, read_size, into)
            return
        raw = self._raw
        fd = raw.fileno()
        done: asyncio.Future[None] = loop.create_future()
        size = self._max

        def finish(exc: BaseException | None) -> None:
            if self._loop is not None and not self._paused:
                loop.remove_reader(fd)
            self._loop = None
            if not done.done():
                if exc is None:
                    done.set_result(None)
                else:
                    done.set_exception(exc)

        def readable() -> None:
            # One recv per callback: with more buffered, the selector calls again on the next
            # pass of the loop, so other callbacks and tasks run in between.
            job = None if splice is None else splice()
            if job is not None:
                spliced(job)
                return
            try:
                target = None if into is None else into()
                data: bytes | memoryview
                if target is not None:
                    n = len(target) if read_size is None else read_size()
                    data = self._recv_into(raw, target[:n] if n < len(target) else target)
                else:
                    n = size if read_size is None else read_size()
                    data = self._recv_fds(raw, n) if self._receive_fds else raw.recv(n)
            except BlockingIOError:
                return
            except OSError as exc:
                if raw.fileno() < 0:
                    finish(anyio.ClosedResourceError())
                else:
                    broken = anyio.BrokenResourceError()
                    broken.__cause__ = exc
                    finish(broken)
                return
            if not data:
                finish(None)
                return
            self.reads += 1
            try:
                on_data(data)
            except BaseException as exc:  # to run()'s caller, as an awaiting loop would
                finish(exc)

        def spliced(job: SpliceIn) -> None:
            try:
                moved = job.receive_from(fd)
            except BlockingIOError:
                return
            except OSError as exc:
                broken = anyio.BrokenResourceError()
                broken.__cause__ = exc
                finish(anyio.ClosedResourceError() if raw.fileno() < 0 else broken)
                return
            except BaseException as exc:  # the job's completion raised: as on_data's would
                finish(exc)
                return
            if not moved:
                finish(None)
                return
            self.reads += 1

        self._loop = loop
        self._readable = readable
        if not self._paused:
            loop.add_reader(fd, readable)
        try:
            await done
        finally:
            if self._loop is not None and not self._paused:
                loop.remove_reader(fd)
            self._loop = None
            self._readable = None
            if done.done() and not done.cancelled():
                done.exception()  # seen, also when a cancellation overtook it (no log at GC)

    async def _run_awaiting(
        self,
        on_data: Callable[[Any], None],
        read_size: Callable[[], int] | None,
        into: Callable[[], memoryview | None] | None,
    ) -> None:
        while True:
            while self._paused:
                self._resumed = anyio.Event()
                await self._resumed.wait()
            size = None if read_size is None else read_size()
            try:
                data = await self.receive(size, into=None if into is None else into())
            except anyio.EndOfStream:
                return
            on_data(data)

    def pause_reading(self) -> None:
        """No more reads by `run()` until `resume_reading()` (what arrives stays in the socket)."""
        if self._paused:
            return
        self._paused = True
        if self._loop is not None and self._raw is not None:
            self._loop.remove_reader(self._raw.fileno())

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._loop is not None and self._raw is not None and self._readable is not None:
            self._loop.add_reader(self._raw.fileno(), self._readable)
        if self._resumed is not None:
            self._resumed.set()


def _running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio loop this task runs on; None under trio (no asyncio loop in this thread).
    A process that never imported asyncio (the agent: trio) runs none, and is spared its
    import (~13 ms of every agent start)."""
    asyncio = sys.modules.get("asyncio")
    return None if asyncio is None else asyncio._get_running_loop()


class FrameWriter:
    """Frames queued with `send_nowait()` (never waits), written in order by `run()`.

    The queue is unbounded on purpose: what goes through it is bounded elsewhere (connection
    data by the credit window, replies by the requests that caused them); a producer that
    must not outrun the peer waits with `wait_queued_below()`. A frame sent while nothing is
    queued or being written goes straight into a plain socket (non-blocking `send`): a reply
    then costs no task switch; only what the socket does not take at once is queued.

    A broken stream ends `run()` (it returns; `broken` is True) and later frames are dropped:
    the owner learns that the peer is gone from `run()` returning or from its reader.
    """

    def __init__(
        self, stream: anyio.abc.ByteSendStream, name: str, *, batch_limit: int = BATCH_LIMIT
    ) -> None:
        self._stream = stream
        self.name = name
        self._batch_limit = batch_limit
        self._raw = plain_socket(stream)
        if self._raw is not None:
            with contextlib.suppress(OSError):
                self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        # producers --frame (+ sockets to pass)--> _queue --run()--> stream
        self._queue: deque[_Queued] = deque()
        self._writing = False  # run() is in the middle of a batch
        self._wake = anyio.Event()  # set when a frame is queued or the writer closes
        self._took = anyio.Event()  # set after each batch written (and at the end)
        self._done = anyio.Event()
        self.queued_bytes = 0
        self.written_bytes = 0
        self.writes = 0  # system calls / stream sends made, direct ones included
        self.closed = False
        self.broken = False

    def __repr__(self) -> str:
        return (
            f"<FrameWriter {self.name} queued={self.queued_bytes} written={self.written_bytes} "
            f"closed={self.closed} broken={self.broken}>"
        )

    def statistics(self) -> dict[str, int]:
        return {
            "queued_frames": len(self._queue),
            "queued_bytes": self.queued_bytes,
            "written_bytes": self.written_bytes,
            "writes": self.writes,
        }

    def send_nowait(self, frame: Frame, passing: Sequence[Passable] = ()) -> None:
        """Queue `frame` (one buffer, or a list of parts sent as one); dropped once the writer
        is closed or broken (the peer is gone).

        `passing`: sockets handed to the peer with the frame's first byte (SCM_RIGHTS, plain
        unix sockets only); the writer owns them from now on and closes its copies once they
        are sent (or dropped). The writer owns a frame's `PipePart`s too (`can_splice`
        writers only): each is released once written or dropped."""
        if self.closed or (passing and not self.can_pass):
            _close_all(passing)
            release_parts(frame)
            return
        parts: list[_Part] = [frame] if isinstance(frame, bytes | memoryview) else list(frame)
        piped = any(type(part) is PipePart for part in parts)
        if piped and not self.can_splice:
            release_parts(frame)
            raise TypeError("a frame with a PipePart on a writer that cannot splice")
        if self._raw is not None and not piped and not self._queue and not self._writing:
            plain: list[bytes | memoryview] = parts  # type: ignore[assignment]  # not piped
            try:
                sent = _send(self._raw, plain, passing)
            except OSError:
                sent = 0  # full (EAGAIN), or failing: run() meets the error and ends
            if sent:
                self.writes += 1
                self.written_bytes += sent
                _close_all(passing)  # they went with the first byte
                passing = ()
                parts = list(_after(plain, sent))
                if not parts:
                    return
        for part in parts:
            self._queue.append((part, tuple(passing)))
            self.queued_bytes += len(part)
            passing = ()
        self._wake.set()

    def close(self) -> None:
        """No more frames; `run()` returns once what is queued was written."""
        self.closed = True
        self._wake.set()

    async def run(self) -> None:
        """The writer task: write queued frames until `close()`, or until the stream breaks."""
        try:
            while True:
                while not self._queue:
                    if self.closed:
                        return
                    self._wake = anyio.Event()
                    await self._wake.wait()
                await self._write_batch()
        except _STREAM_GONE:
            self.broken = True
        finally:
            self.closed = True
            for part, passing in self._queue:
                _close_all(passing)  # frames never written: their sockets go nowhere
                if type(part) is PipePart:
                    part.release()
            self._queue.clear()
            self.queued_bytes = 0
            self._writing = False
            self._took.set()
            self._done.set()

    async def wait_queued_below(self, limit: int) -> None:
        """Until at most `limit` bytes are queued (or the writer ended). Bound it in time
        (`anyio.move_on_after`) to detect a peer that reads nothing."""
        while self.queued_bytes > limit and not self._done.is_set():
            if self._took.is_set():
                self._took = anyio.Event()  # shared by every waiter until the next batch
            await self._took.wait()

    async def wait_flushed(self) -> None:
        """Until `run()` has returned (after `close()`: everything queued was written)."""
        await self._done.wait()

    async def _write_batch(self) -> None:
        frame, passing = self._queue.popleft()
        parts = [frame]
        size = len(frame)
        while self._queue and not self._queue[0][1] and len(parts) < _MAX_PARTS:
            nxt = self._queue[0][0]
            if size + len(nxt) > self._batch_limit and (
                size >= self._batch_limit or len(nxt) < _LARGE_PART
            ):
                break  # a large part still goes along (it is not copied) if the batch is not full
            self._queue.popleft()
            parts.append(nxt)
            size += len(nxt)
        self.queued_bytes -= size
        self._writing = True
        try:
            if self._raw is not None:
                await self._send_parts(self._raw, parts, passing)
                return
            # no PipePart here: only a plain socket's writer takes them (send_nowait)
            data = parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[arg-type]
            self.writes += 1
            # anyio's socket and TLS streams send any bytes-like object (typed `bytes`)
            await self._stream.send(data)  # type: ignore[arg-type]
            self.written_bytes += len(data)
        finally:
            self._writing = False
            self._took.set()

    async def _send_parts(
        self,
        raw: socket.socket,
        parts: list[_Part],
        passing: tuple[Passable, ...],
    ) -> None:
        """Write `parts` with scatter writes (nothing joined), the sockets with the first byte;
        a `PipePart` is spliced from its pipe into the socket, then released."""
        try:
            while parts:
                first = parts[0]
                try:
                    if type(first) is PipePart:
                        sent = first.splice_into(raw.fileno())
                        if not first.left:
                            first.release()
                            parts = parts[1:]
                    else:
                        cut = next(
                            (i for i, part in enumerate(parts) if type(part) is PipePart),
                            len(parts),
                        )
                        head: list[bytes | memoryview] = parts[:cut]  # type: ignore[assignment]
                        sent = _send(raw, head, passing)
                        parts = [*_after(head, sent), *parts[cut:]]
                except BlockingIOError:
                    await anyio.wait_writable(raw)
                    continue
                except OSError as exc:
                    if raw.fileno() < 0:
                        raise anyio.ClosedResourceError from None
                    raise anyio.BrokenResourceError from exc
                self.writes += 1
                self.written_bytes += sent
                if passing:
                    _close_all(passing)  # they went with the first byte
                    passing = ()
        finally:
            _close_all(passing)
            release_parts(parts)

    @property
    def can_splice(self) -> bool:
        """Whether frames may carry `PipePart`s: the stream is a plain unix socket (into or
        out of a TCP socket the kernel copies anyway)."""
        return self.can_pass and splice_supported()

    @property
    def can_pass(self) -> bool:
        """Whether fds can go with frames: the stream is a plain unix socket (both ends on
        one machine)."""
        return self._raw is not None and self._raw.family == socket.AF_UNIX


def _send(raw: socket.socket, parts: list[bytes | memoryview], passing: Sequence[Passable]) -> int:
    if not passing:
        return raw.send(parts[0]) if len(parts) == 1 else raw.sendmsg(parts)
    fds = array.array("i", [s.fileno() for s in passing])
    return raw.sendmsg(parts, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def _after(parts: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """What of `parts` is left once their first `sent` bytes were written."""
    for i, part in enumerate(parts):
        if sent < len(part):
            rest = parts[i:]
            if sent:
                rest[0] = memoryview(part)[sent:]
            return rest
        sent -= len(part)
    return []


def _close_all(socks: Sequence[Passable]) -> None:
    for s in socks:
        s.close()
