"""One channel (one layer process) on a daemon connection: its requests, handles, connections.

Owns: answering every request of the agent protocol for one channel (files, env, DNS,
hostname, outgoing connections; Subscribe/Unsubscribe go to the incoming code), the channel's
handle table and relays, and freeing all of them when the channel closes. No request holds up
another, and a failure is an `ErrorReply` with an errno for that request only. File requests
(blocking I/O) are planned on the event loop (handle lookups), run in the agent's worker
threads (`_workers.py`) and answered from the completion callback on the event loop, with no
task per request (small operations on regular local files run inline: `_files_inline.py`); the other requests (env, DNS, connect, subscriptions) run as a task each
in the channel's task group. Anything that needs the target's network namespace runs on
`ctx.netns`.

Incoming-traffic hook (docs/incoming.md): `start_incoming(...)` hands an accepted (or reassembled) stream to
this channel as an agent-side connection (odd conn ids) relayed like an outgoing one.
Connections (outgoing and incoming, TCP and UDP) are relayed by the engine shared with the
daemon (docs/relay.md); the channel is their `RelayLink`, `_channel_relays.py` their table.
Does not own: framing and the daemon connection (`_session.py`), the relays
(`_channel_relays.py`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat as stat_module
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import anyio
import anyio.abc
import anyio.to_thread

from mirrord._frames import Passable, PassedFd
from mirrord._splice import SPLICE_MAX, PipePart, PipePool
from mirrord.agent._channel_relays import CONN_MESSAGES, ChannelRelays
from mirrord.agent._context import AgentContext
from mirrord.agent._dns import GaiError
from mirrord.agent._env import filter_env, read_environ
from mirrord.agent._files import (
    DirHandle,
    FileHandle,
    HandleTable,
    fstatfs,
    read_into_pipe,
    stat_list,
    utimens_at,
)
from mirrord.agent._files_inline import (
    INLINE_READ_MAX,
    NOT_INLINE,
    Inline,
    fetch_file,
    fetch_inline,
    inline_fd,
    open_inline,
    splice_cached,
    takes_piped_writes,
    write_at,
    write_from_pipes,
    write_inline,
)
from mirrord.agent._outgoing import open_outgoing, open_unix_stream
from mirrord.protocol import Message
from mirrord.protocol import messages as m

if TYPE_CHECKING:
    from mirrord.agent._workers import BlockingWorkers

__all__ = ["Channel", "IncomingHandler", "PipedWrite"]

log = logging.getLogger("mirrord.agent")

# A file request, planned on the event loop: the blocking call for a worker thread, what makes
# the reply from its result (on the event loop), and the handle the call uses (released first).
# No blocking call (None): the reply is made at once.
# (the call, what makes its reply of the result, the handle it holds): the reply is a message,
# a reply with an fd handed over (`_Handed`) or a `FileData` whose bytes are in a pipe
# (`_Spliced`)
_Plan: TypeAlias = tuple[
    Callable[[], Any] | None,
    Callable[[Any], "Message | _Handed | _Spliced"],
    "FileHandle | None",
]


class _Handed:
    """A reply that takes an opened fd along (hand-over: `FileHanded`, `Connected(handed)`)."""

    __slots__ = ("msg", "passing")

    def __init__(self, msg: Message, passing: Passable) -> None:
        self.msg = msg
        self.passing = passing


class _Spliced:
    """A `FileData` whose bytes wait in a pipe (`read_into_pipe`), then `rest` (what the pipe
    had no room for), written to the daemon by the session's writer with `splice`."""

    __slots__ = ("part", "request_id", "rest")

    def __init__(self, request_id: int, read: tuple[PipePart, bytes]) -> None:
        self.request_id = request_id
        self.part, self.rest = read


class PipedWrite:
    """A large `FileWrite` whose data came from the daemon's socket into pipes
    (`DaemonSession`): `head`, the bytes that came with the frame's head, then the parts'.
    The channel releases the parts when it answers it, whatever the answer."""

    __slots__ = ("handle", "head", "offset", "parts", "request_id")

    def __init__(
        self, request_id: int, handle: int, head: bytes, parts: list[PipePart], offset: int | None
    ) -> None:
        self.request_id = request_id
        self.handle = handle
        self.head = head
        self.parts = parts
        self.offset = offset

    def __repr__(self) -> str:
        size = len(self.head) + sum(part.size for part in self.parts)
        return f"<PipedWrite {self.request_id} handle={self.handle} {size} bytes>"

    def release(self) -> None:
        parts, self.parts = self.parts, []
        for part in parts:
            part.release()


class IncomingHandler(Protocol):
    """The shape of `IncomingService` (src/mirrord/agent/_incoming.py) the channel relies on."""

    async def subscribe(
        self,
        channel: Channel,
        port: int,
        mode: str,
        http_filter: dict[str, Any] | None,
        *,
        on_concurrent_steal: str = "abort",
        tls: dict[str, Any] | None = None,
    ) -> list[str]: ...

    async def unsubscribe(self, channel: Channel, port: int) -> None: ...

    async def channel_closed(self, channel: Channel) -> None: ...


class ChannelOwner(Protocol):
    """What a channel needs of the daemon connection it belongs to (`DaemonSession`, which
    imports this module; the channel never imports it back)."""

    ctx: AgentContext
    request_slots: anyio.Semaphore  # file requests in flight on the whole connection

    @property
    def can_hand_over(self) -> bool:
        """The daemon is on this machine (a unix socket, both ends agreed): fds can go to it."""
        ...

    @property
    def incoming(self) -> IncomingHandler | None:
        """The agent's incoming service, None when it is not running (Subscribe: ENOTSUP)."""
        ...

    async def settled_incoming(self) -> IncomingHandler | None:
        """`incoming` once the service has started or failed to (it loads after the agent's
        ready line)."""
        ...

    @property
    def workers(self) -> BlockingWorkers: ...

    @property
    def initial_window(self) -> int:
        """Each connection's credit window at its start, each way (the connection's)."""
        ...

    async def send(self, msg: Message, channel: int) -> None: ...

    def send_nowait(self, msg: Message, channel: int) -> None: ...

    def send_passing(self, msg: Message, channel: int, passing: Passable) -> None:
        """`send_nowait` with an fd handed to the daemon along with `msg` (owned from here)."""
        ...

    @property
    def pipes(self) -> PipePool | None:
        """Pipes for large reads' replies when the daemon's stream takes spliced bytes (a
        unix socket: `FrameWriter.can_splice`), else None."""
        ...

    def send_spliced(self, request_id: int, channel: int, part: PipePart, rest: bytes) -> None:
        """A `FileData` reply whose bytes are in `part`'s pipe (owned from here on), then
        `rest`."""
        ...

    async def wait_ready(self) -> None:
        """Until the daemon is not too far behind in reading what was sent to it."""
        ...

    def ready(self) -> bool:
        """Whether the daemon is not too far behind (`wait_ready` would not wait)."""
        ...

    def forget_channel(self, channel: Channel) -> None:
        """`channel` ended on its own: the connection no longer routes to it."""
        ...


# Fields of file requests that hold a path (or a symlink's text): a NUL byte in one is EINVAL,
# checked before any call (ctypes would cut the path at the NUL and act on another file).
_PATH_FIELDS = ("path", "old", "new", "target")
_ID_RANGE = range(-1, 2**32)  # uid_t/gid_t, with -1 (also 2**32-1): "leave it as it is"
_C_INT_FIELDS = (
    "flags",
    "mode",
    "whence",
    "handover_flags",
)  # a C int or mode_t in the layer: 32 bits
_C_INT_RANGE = range(-(2**31), 2**32)


def _check_request(req: Any) -> None:
    """Raise `OSError(EINVAL)` for what no call may be made with: the sender's error."""
    for name in _PATH_FIELDS:
        value = getattr(req, name, None)
        if isinstance(value, bytes) and b"\0" in value:
            raise OSError(errno.EINVAL, f"{type(req).__name__}: {name} contains a NUL byte")
    for name in _C_INT_FIELDS:
        value = getattr(req, name, None)
        if isinstance(value, int) and value not in _C_INT_RANGE:
            raise OSError(errno.EINVAL, f"{type(req).__name__}: {name} {value} is out of range")
    if isinstance(req, m.Chown):
        for name, value in (("uid", req.uid), ("gid", req.gid)):
            if value not in _ID_RANGE:
                raise OSError(errno.EINVAL, f"Chown: {name} {value} is not a valid id")


def _errno_reply(request_id: int, exc: BaseException) -> m.ErrorReply:
    if isinstance(exc, GaiError):
        return m.ErrorReply(request_id=request_id, errno=exc.code, message=exc.message)
    if isinstance(exc, OSError) and exc.errno:
        return m.ErrorReply(
            request_id=request_id, errno=exc.errno, message=exc.strerror or str(exc)
        )
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code:
        return m.ErrorReply(request_id=request_id, errno=code, message=str(exc))
    # The sender's values that a call cannot take: errors of the request, not of the agent.
    if isinstance(exc, OverflowError):
        return m.ErrorReply(
            request_id=request_id, errno=errno.EOVERFLOW, message=f"value out of range: {exc}"
        )
    if isinstance(exc, ValueError) and "null" in str(exc):
        return m.ErrorReply(request_id=request_id, errno=errno.EINVAL, message=str(exc))
    log.error("request %d failed in the agent: %r", request_id, exc, exc_info=exc)
    return m.ErrorReply(
        request_id=request_id, errno=errno.EIO, message=f"agent error: {exc!r} (a bug: report it)"
    )


class Channel:
    """A channel of one daemon connection. `number` 0 is the control channel, which serves
    the same requests (e.g. the daemon's env lookup before any layer process exists)."""

    def __init__(
        self,
        session: ChannelOwner,
        number: int,
        *,
        pid: int = 0,
        label: str = "",
        handles: HandleTable | None = None,
    ) -> None:
        self.session = session
        self.ctx: AgentContext = session.ctx
        self.number = number
        self.pid = pid
        self.label = label
        self.handles = handles if handles is not None else HandleTable()
        self.relays = ChannelRelays(self, number, session.initial_window)
        self._next_incoming = 1
        self._tg: anyio.abc.TaskGroup | None = None
        self._scope = anyio.CancelScope()
        self.closed = False
        self._blocking: dict[type[Message], Callable[[Any], _Plan]] = {
            m.FileOpen: self._file_open,
            m.FileFetch: self._file_fetch,
            m.FileRead: self._file_read,
            m.FileWrite: self._file_write,
            m.FileSeek: self._file_seek,
            m.FileClose: self._file_close,
            m.FileStat: self._file_stat,
            m.StatFs: self._statfs,
            m.FileAccess: self._access,
            m.ReadLink: self._readlink,
            m.DirOpen: self._dir_open,
            m.DirRead: self._dir_read,
            m.DirClose: self._dir_close,
            m.Mkdir: self._mkdir,
            m.Rmdir: self._rmdir,
            m.Unlink: self._unlink,
            m.Rename: self._rename,
            m.Ftruncate: self._ftruncate,
            m.Fchmod: self._fchmod,
            m.Fsync: self._fsync,
            m.Utimens: self._utimens,
            m.Chown: self._chown,
            m.Symlink: self._symlink,
            m.Link: self._link,
        }
        self._handlers: dict[type[Message], Callable[[Any], Awaitable[Message | None]]] = {
            m.EnvRequest: self._env,
            m.DnsLookup: self._dns,
            m.HostnameRequest: self._hostname,
            m.Connect: self._connect,
            m.Subscribe: self._subscribe,
            m.Unsubscribe: self._unsubscribe,
        }

    def __repr__(self) -> str:
        return (
            f"<Channel {self.number} pid={self.pid} label={self.label!r} handles={len(self.handles)}"
            f" conns={len(self.relays)}{' closed' if self.closed else ''}>"
        )

    # -- RelayLink (for its relays) -----------------------------------------------------------

    async def send(self, msg: Message) -> None:
        await self.session.send(msg, self.number)

    def send_nowait(self, msg: Message) -> None:
        self.session.send_nowait(msg, self.number)

    async def wait_ready(self) -> None:
        await self.session.wait_ready()

    def ready(self) -> bool:
        return self.session.ready()

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The channel's task: its requests and relays run in its task group until `close()`."""
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    task_status.started()
                    await anyio.sleep_forever()
        finally:
            self.closed = True
            self.relays.abort_all()
            self.handles.close_all()
            incoming = self.session.incoming
            if incoming is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    try:
                        await incoming.channel_closed(self)
                    except Exception as exc:
                        log.error("incoming cleanup of channel %d failed: %r", self.number, exc)

    async def fail(self, code: str, message: str) -> None:
        """End this channel from the agent's side (e.g. its steal was lost): the daemon gets
        `Fatal(code, message)` on it, which its session reports, and everything the channel
        holds is freed."""
        await self.send(m.Fatal(code=code, message=message))
        self.session.forget_channel(self)
        self.close()

    def close(self) -> None:
        """Free everything the channel holds (its tasks are cancelled; no messages are sent)."""
        self.closed = True
        self.relays.abort_all()
        self._scope.cancel()

    # -- dispatch (called by the session's reader) ---------------------------------------------

    async def dispatch(self, msg: Message) -> None:
        if isinstance(msg, CONN_MESSAGES):
            self.relays.receive(msg)
        elif isinstance(msg, m.Request):
            plan = self._blocking.get(type(msg))
            handler = self._handlers.get(type(msg))
            if plan is None and handler is None:
                await self.send(
                    m.ErrorReply(
                        request_id=msg.request_id,
                        errno=errno.ENOSYS,
                        message=f"the agent does not serve {type(msg).__name__}",
                    )
                )
                return
            await self._start(msg, plan, handler)
        # Replies and anything else the daemon should not send us are ignored.

    def takes_piped_write(self, number: int) -> bool:
        """Whether a large `FileWrite` on handle `number` may come as a `PipedWrite`: the
        channel serves requests and the handle is an inline one (a regular file of a local
        file system) that `takes_piped_writes`."""
        if self._tg is None or self.closed:
            return False
        try:
            handle = self.handles.acquire(number)
        except OSError:
            return False
        try:
            return handle.inline and takes_piped_writes(handle.fd)
        finally:
            self.handles.release(handle)

    async def dispatch_piped(self, req: PipedWrite) -> None:
        await self._start(req, self._file_write_piped, None)

    async def _start(
        self,
        req: Any,
        plan: Callable[[Any], _Plan] | None,
        handler: Callable[[Any], Awaitable[Message | None]] | None,
    ) -> None:
        if self._tg is None or self.closed:
            if isinstance(req, PipedWrite):
                req.release()
            await self.send(
                m.ErrorReply(request_id=req.request_id, errno=errno.EBADF, message="channel closed")
            )
            return
        slots = self.session.request_slots
        try:
            slots.acquire_nowait()  # no scheduling point while slots are free
        except anyio.WouldBlock:
            await slots.acquire()  # 256 in flight: the daemon connection waits
        if plan is not None:
            self._start_blocking(plan, req)
        else:
            assert handler is not None
            self._tg.start_soon(self._serve, handler, req)

    async def _serve(self, handler: Callable[[Any], Awaitable[Message | None]], req: Any) -> None:
        try:
            try:
                reply = await handler(req)
            except Exception as exc:
                reply = _errno_reply(req.request_id, exc)
            self._log_reply(req, reply)
            if reply is not None:
                await self.send(reply)
        finally:
            self.session.request_slots.release()

    def _log_reply(self, req: Any, reply: Message | _Spliced | None) -> None:
        if log.isEnabledFor(logging.DEBUG):
            # Message names and errnos only: paths are fine, env values never reach here.
            log.debug(
                "channel %d: %s %d -> %s%s",
                self.number,
                type(req).__name__,
                req.request_id,
                (
                    "FileData (through a pipe)"
                    if isinstance(reply, _Spliced)
                    else type(reply).__name__
                    if reply is not None
                    else "Connected"
                ),
                f" errno={reply.errno}" if isinstance(reply, m.ErrorReply) else "",
            )

    def _start_blocking(self, plan: Callable[[Any], _Plan], req: Any) -> None:
        """Plan `req` now, run its blocking call in a worker thread, reply when it is done."""
        try:
            _check_request(req)
            call, finish, handle = plan(req)
        except Exception as exc:
            self._answer(req, _errno_reply(req.request_id, exc))
            return

        def done(ok: bool, value: Any) -> None:
            # On the event loop thread, outside any task: must not raise.
            try:
                if handle is not None:
                    self.handles.release(handle)
                reply = finish(value) if ok else _errno_reply(req.request_id, value)
            except Exception as exc:
                reply = _errno_reply(req.request_id, exc)
            self._answer(req, reply)

        if call is None:
            done(True, None)
            return
        if isinstance(call, Inline):
            try:
                value = call.fast()
            except Exception as exc:
                done(False, exc)
                return
            if value is not NOT_INLINE:
                done(True, value)
                return
            call = call.slow
        try:
            self.session.workers.submit(call, done)
        except RuntimeError as exc:  # the agent is shutting down
            if handle is not None:
                self.handles.release(handle)
            self._answer(req, _errno_reply(req.request_id, OSError(errno.EIO, str(exc))))

    def _answer(self, req: Any, reply: Message | _Handed | _Spliced) -> None:
        self.session.request_slots.release()
        if isinstance(req, PipedWrite):
            req.release()  # written, or not: its pipes go back either way
        if isinstance(reply, _Spliced):
            self._log_reply(req, reply)
            if self.closed:
                reply.part.release()
            else:
                self.session.send_spliced(reply.request_id, self.number, reply.part, reply.rest)
            return
        if isinstance(reply, _Handed):
            self._log_reply(req, reply.msg)
            if self.closed:
                reply.passing.close()
            else:
                self.session.send_passing(reply.msg, self.number, reply.passing)
            return
        self._log_reply(req, reply)
        if self.closed:
            return  # a closed channel's requests are answered by nobody
        self.session.send_nowait(reply, self.number)

    # -- files (each returns a plan: see _Plan) -------------------------------------------------

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args)

    def _root_call(
        self, fn: Callable[..., Any], *args: Any, inline: bool = False
    ) -> Callable[[], Any]:
        call = lambda: fn(*args)  # noqa: E731
        return Inline(call, call) if inline and self.ctx.root.paths_inline else call

    def _on_handle(
        self,
        number: int,
        fn: Callable[[FileHandle], Any],
        finish: Callable[[Any], Message | _Spliced],
        kind: type[FileHandle] | None = FileHandle,
        *,
        inline: bool = False,
        fast: Callable[[FileHandle], Any] | None = None,
    ) -> _Plan:
        """`inline`: the call may run on the event loop if the handle's file allows it;
        `fast`: so may this one (it may answer NOT_INLINE, and then `fn` runs in a worker)."""
        # acquired until the call is done: a close meanwhile waits for it
        handle = self.handles.acquire(number, kind)
        call = lambda: fn(handle)  # noqa: E731
        if handle.inline and fast is not None:
            return Inline(lambda: fast(handle), call), finish, handle
        return (Inline(call, call) if inline and handle.inline else call), finish, handle

    def _ok(self, req: Any) -> Callable[[Any], Message]:
        return lambda _: m.Ok(request_id=req.request_id)

    def _file_open(self, req: m.FileOpen) -> _Plan:
        root = self.ctx.root

        def fast() -> tuple[int, bool] | Any:
            fd = open_inline(root, req.path, req.flags)
            return fd if fd is NOT_INLINE else (fd, True)

        def slow() -> tuple[int, bool]:
            fd = root.open(req.path, req.flags, req.mode)
            try:
                return fd, inline_fd(fd)
            except BaseException:
                os.close(fd)
                raise

        def finish(opened: tuple[int, bool]) -> Message:
            fd, inline = opened
            if self.closed:
                os.close(fd)
                raise OSError(errno.EBADF, "channel closed")
            handle = self.handles.add(FileHandle(fd=fd, inline=inline))
            return m.FileOpened(request_id=req.request_id, handle=handle)

        return Inline(fast, slow), finish, None

    def _file_fetch(self, req: m.FileFetch) -> _Plan:
        if (
            req.handover_flags is not None
            and self.session.can_hand_over
            and not req.handover_flags & os.O_PATH
        ):
            return self._file_hand_over(req, req.handover_flags)
        root = self.ctx.root

        def fast() -> tuple[int, list[int], bytes | None, bool] | Any:
            fetched = fetch_inline(root, req.path, req.flags, req.max_size)
            return fetched if fetched is NOT_INLINE else (*fetched, True)

        def slow() -> tuple[int, list[int], bytes | None, bool]:
            fd = root.open(req.path, req.flags, req.mode)
            return (*fetch_file(fd, req.flags, req.max_size), False)

        def finish(result: tuple[int, list[int], bytes | None, bool]) -> Message:
            return self._fetched(req, result)

        return Inline(fast, slow), finish, None

    def _file_hand_over(self, req: m.FileFetch, flags: int) -> _Plan:
        """FileFetch with hand-over: the file opened under the target's root with the user
        app's own flags; a regular file goes to the layer itself (`FileHanded`), anything
        else (a directory, a FIFO, a device) is served through a handle as without
        hand-over. Regular files only: a directory fd would let `openat(fd, "..")` walk out
        of the target's root; an fd of a device or FIFO reaches past what the agent's
        requests allow."""
        root = self.ctx.root

        def hand(fd: int) -> tuple[int, list[int], bytes | None, bool] | int:
            st = os.fstat(fd)
            if stat_module.S_ISREG(st.st_mode):
                return fd
            return (*fetch_file(fd, req.flags, req.max_size), False)

        def fast() -> int | Any:
            return open_inline(root, req.path, flags)  # a regular file, or NOT_INLINE

        def slow() -> tuple[int, list[int], bytes | None, bool] | int:
            fd = root.open(req.path, flags, req.mode)
            try:
                return hand(fd)
            except BaseException:
                os.close(fd)
                raise

        def finish(result: tuple[int, list[int], bytes | None, bool] | int) -> Message | _Handed:
            if isinstance(result, int):
                return _Handed(m.FileHanded(request_id=req.request_id), PassedFd(result))
            return self._fetched(req, result)

        return Inline(fast, slow), finish, None

    def _fetched(
        self, req: m.FileFetch, result: tuple[int, list[int], bytes | None, bool]
    ) -> m.FileFetched:
        """FileFetched for a file opened by `req`: (its fd or -1, its stat, its content or None,
        whether the agent opened it inline); the fd kept as a handle of this channel."""
        fd, st, data, inline = result
        handle = None
        if fd >= 0:
            if self.closed:
                os.close(fd)
                raise OSError(errno.EBADF, "channel closed")
            handle = self.handles.add(FileHandle(fd=fd, inline=inline))
        return m.FileFetched(request_id=req.request_id, stat=st, handle=handle, data=data)

    def _file_read(self, req: m.FileRead) -> _Plan:
        pipes = self.session.pipes
        if pipes is not None and INLINE_READ_MAX < req.size <= SPLICE_MAX:
            # a large read of a regular file: its pages go to the daemon through a pipe,
            # copied by nobody (`mirrord._splice`)
            return self._on_handle(
                req.handle,
                lambda h: read_into_pipe(h.fd, req.size, req.offset, pipes),
                lambda got: (
                    _Spliced(req.request_id, got)
                    if isinstance(got, tuple)
                    else m.FileData(request_id=req.request_id, data=got)
                ),
                fast=lambda h: splice_cached(h.fd, req.size, req.offset, pipes),
            )

        def read(h: FileHandle) -> bytes:
            if req.offset is None:
                return os.read(h.fd, req.size)
            return os.pread(h.fd, req.size, req.offset)

        # a large read (a worker's) is sent as os.pread returned it: its bytes are a part of
        # their own in the reply's frame (`send_parts`), copied by nobody but the kernel
        return self._on_handle(
            req.handle,
            read,
            lambda data: m.FileData(request_id=req.request_id, data=data),
            inline=0 <= req.size <= INLINE_READ_MAX,
        )

    def _file_write(self, req: m.FileWrite) -> _Plan:
        return self._on_handle(
            req.handle,
            lambda h: write_at(h.fd, req.data, req.offset),
            lambda n: m.FileWritten(request_id=req.request_id, count=n),
            fast=lambda h: write_inline(h.fd, req.data, req.offset),
        )

    def _file_write_piped(self, req: PipedWrite) -> _Plan:
        return self._on_handle(
            req.handle,
            lambda h: write_from_pipes(h.fd, req.head, req.parts, req.offset),
            lambda n: m.FileWritten(request_id=req.request_id, count=n),
            inline=True,
        )

    def _file_seek(self, req: m.FileSeek) -> _Plan:
        return self._on_handle(
            req.handle,
            lambda h: os.lseek(h.fd, req.offset, req.whence),
            lambda pos: m.FilePosition(request_id=req.request_id, position=pos),
            inline=True,
        )

    def _file_close(self, req: m.FileClose) -> _Plan:
        # Nothing blocks: the fd is closed by the last user of the handle (os.close of a
        # regular file does not wait), so the reply needs no worker thread.
        self.handles.close(req.handle, None)
        return None, self._ok(req), None

    def _file_stat(self, req: m.FileStat) -> _Plan:
        def reply(st: list[int]) -> Message:
            return m.StatReply(request_id=req.request_id, stat=st)

        if req.handle is not None:
            fstat = lambda h: stat_list(os.fstat(h.fd))  # noqa: E731
            return self._on_handle(req.handle, fstat, reply, None, inline=True)
        assert req.path is not None
        return self._root_call(self.ctx.root.stat, req.path, req.follow, inline=True), reply, None

    def _statfs(self, req: m.StatFs) -> _Plan:
        def reply(st: list[int]) -> Message:
            return m.StatFsReply(request_id=req.request_id, statfs=st)

        if req.handle is not None:
            return self._on_handle(req.handle, lambda h: fstatfs(h.fd), reply, None)
        assert req.path is not None
        return self._root_call(self.ctx.root.statfs, req.path), reply, None

    def _access(self, req: m.FileAccess) -> _Plan:
        return self._root_call(self.ctx.root.access, req.path, req.mode), self._ok(req), None

    def _readlink(self, req: m.ReadLink) -> _Plan:
        return (
            self._root_call(self.ctx.root.readlink, req.path),
            lambda target: m.ReadLinkReply(request_id=req.request_id, target=target),
            None,
        )

    def _dir_opened(self, req: m.DirOpen, fd: int) -> Message:
        if self.closed:
            os.close(fd)
            raise OSError(errno.EBADF, "channel closed")
        return m.DirOpened(request_id=req.request_id, handle=self.handles.add(DirHandle(fd=fd)))

    def _dir_open(self, req: m.DirOpen) -> _Plan:
        if req.path is not None:
            return (
                self._root_call(self.ctx.root.opendir_fd, req.path),
                lambda fd: self._dir_opened(req, fd),
                None,
            )
        # fdopendir: the directory stream gets its own duplicate of the open file. The file
        # handle stays open: after fdopendir(fd) programs still fstat(fd) (tar checks that a
        # directory did not change while it read it); the layer closes it at closedir.
        assert req.handle is not None

        def dup_dir(h: FileHandle) -> int:
            if not stat_module.S_ISDIR(os.fstat(h.fd).st_mode):
                raise OSError(errno.ENOTDIR, "not a directory")
            return os.dup(h.fd)

        return self._on_handle(req.handle, dup_dir, lambda fd: self._dir_opened(req, fd))

    def _dir_read(self, req: m.DirRead) -> _Plan:
        root = self.ctx.root

        def read(h: FileHandle) -> list[tuple[bytes, int, int]]:
            assert isinstance(h, DirHandle)
            return h.read_batch(root, req.max_entries)

        return self._on_handle(
            req.handle,
            read,
            lambda entries: m.DirEntries(request_id=req.request_id, entries=entries),
            DirHandle,
        )

    def _dir_close(self, req: m.DirClose) -> _Plan:
        self.handles.close(req.handle, DirHandle)
        return None, self._ok(req), None

    def _mkdir(self, req: m.Mkdir) -> _Plan:
        return self._root_call(self.ctx.root.mkdir, req.path, req.mode), self._ok(req), None

    def _rmdir(self, req: m.Rmdir) -> _Plan:
        return self._root_call(self.ctx.root.rmdir, req.path), self._ok(req), None

    def _unlink(self, req: m.Unlink) -> _Plan:
        return self._root_call(self.ctx.root.unlink, req.path), self._ok(req), None

    def _rename(self, req: m.Rename) -> _Plan:
        return self._root_call(self.ctx.root.rename, req.old, req.new), self._ok(req), None

    def _ftruncate(self, req: m.Ftruncate) -> _Plan:
        return self._on_handle(req.handle, lambda h: os.ftruncate(h.fd, req.length), self._ok(req))

    def _fchmod(self, req: m.Fchmod) -> _Plan:
        return self._on_handle(req.handle, lambda h: os.fchmod(h.fd, req.mode), self._ok(req), None)

    def _fsync(self, req: m.Fsync) -> _Plan:
        return self._on_handle(req.handle, lambda h: os.fsync(h.fd), self._ok(req), None)

    def _utimens(self, req: m.Utimens) -> _Plan:
        times = (req.atime_ns, req.mtime_ns)
        if req.handle is not None:
            return self._on_handle(
                req.handle, lambda h: utimens_at(h.fd, None, times, 0), self._ok(req), None
            )
        assert req.path is not None
        return (
            self._root_call(self.ctx.root.utimens, req.path, times, req.follow),
            self._ok(req),
            None,
        )

    def _chown(self, req: m.Chown) -> _Plan:
        if req.handle is not None:
            return self._on_handle(
                req.handle, lambda h: os.fchown(h.fd, req.uid, req.gid), self._ok(req), None
            )
        assert req.path is not None
        return (
            self._root_call(self.ctx.root.chown, req.path, req.uid, req.gid, req.follow),
            self._ok(req),
            None,
        )

    def _symlink(self, req: m.Symlink) -> _Plan:
        return self._root_call(self.ctx.root.symlink, req.target, req.path), self._ok(req), None

    def _link(self, req: m.Link) -> _Plan:
        call = self._root_call(self.ctx.root.link, req.old, req.new, req.follow)
        return call, self._ok(req), None

    # -- env, DNS, hostname --------------------------------------------------------------------

    async def _env(self, req: m.EnvRequest) -> Message:
        env = await self._in_thread(read_environ, self.ctx.pid)
        return m.EnvReply(request_id=req.request_id, env=filter_env(env, req.include, req.exclude))

    async def _dns(self, req: m.DnsLookup) -> Message:
        addresses, canon = await self.ctx.netns.run(
            self.ctx.resolver.getaddrinfo,
            req.host,
            req.port,
            req.family,
            req.socktype,
            req.protocol,
            req.flags,
        )
        return m.DnsReply(request_id=req.request_id, addresses=addresses, canonname=canon)

    async def _hostname(self, req: m.HostnameRequest) -> Message:
        name = await self.ctx.netns.run(self.ctx.resolver.hostname)
        return m.HostnameReply(request_id=req.request_id, hostname=name)

    # -- connections ---------------------------------------------------------------------------

    async def _connect(self, req: m.Connect) -> Message | None:
        if req.conn_id % 2 or req.conn_id in self.relays:
            raise OSError(errno.EINVAL, f"conn_id {req.conn_id} is odd or already in use")
        if req.protocol == "unix":
            stream: Any = await open_unix_stream(
                self.ctx.root, req.address.encode(), timeout=self.ctx.connect_timeout
            )
            local_address, local_port = "", 0
        else:
            stream, local_address, local_port = await open_outgoing(
                self.ctx.netns,
                req.protocol,
                req.address,
                req.port,
                timeout=self.ctx.connect_timeout,
            )
        if self.closed or self._tg is None:
            await stream.aclose()
            raise OSError(errno.EBADF, "channel closed")
        if req.handover and req.protocol != "unix" and self.session.can_hand_over:
            # the socket itself to the daemon (and on to the layer): nothing relayed here
            sock = _take_socket(stream)
            self.session.send_passing(
                m.Connected(
                    request_id=req.request_id,
                    conn_id=req.conn_id,
                    local_address=local_address,
                    local_port=local_port,
                    handed=True,
                ),
                self.number,
                sock,
            )
            return None
        relay = self.relays.add(
            req.conn_id,
            stream,
            f"channel {self.number} conn {req.conn_id} {req.protocol} to {req.address}:{req.port}",
        )
        # Connected goes out before the relay can send Data for this connection.
        await self.send(
            m.Connected(
                request_id=req.request_id,
                conn_id=req.conn_id,
                local_address=local_address,
                local_port=local_port,
            )
        )
        self._tg.start_soon(self.relays.run, relay)
        return None  # Connected is sent above

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
        replies: bool = False,
    ) -> int:
        """Relay `stream` to the daemon as a new incoming connection of this channel;
        `replies`: a mirrored connection whose user app's answer the caller reads.

        Non-blocking: allocates an odd conn id, sends `IncomingConnection` (before anything
        else of the connection: `fail_incoming` may follow at once) and relays under the
        credit window in the channel's task group. Returns the conn id.
        Raises `anyio.ClosedResourceError` (leaving `stream` to the caller) when the channel
        is closed."""
        if self.closed or self._tg is None:
            raise anyio.ClosedResourceError
        conn_id = self._next_incoming
        self._next_incoming += 2
        relay = self.relays.add(
            conn_id,
            stream,
            f"channel {self.number} conn {conn_id} {mode} {remote_address}:{remote_port}->:{port}",
        )
        announce = m.IncomingConnection(
            conn_id=conn_id,
            port=port,
            remote_address=remote_address,
            remote_port=remote_port,
            local_address=local_address,
            local_port=local_port,
            mode=mode,
            replies=replies,
        )
        self.send_nowait(announce)
        self._tg.start_soon(self.relays.run, relay)
        return conn_id

    def fail_incoming(self, conn_id: int, errno_: int) -> None:
        """The incoming code gives connection `conn_id` up: the daemon gets
        `ConnClose(errno_)` (after its IncomingConnection) at once, without waiting for the
        relay's window, and the relay ends."""
        self.relays.fail(conn_id, errno_)

    # -- incoming subscriptions ----------------------------------------------------------------

    async def _subscribe(self, req: m.Subscribe) -> Message:
        incoming = await self.session.settled_incoming()
        if incoming is None:
            raise OSError(errno.ENOTSUP, "this agent does not serve incoming traffic yet")
        warnings = await incoming.subscribe(
            self,
            req.port,
            req.mode,
            req.http_filter,
            on_concurrent_steal=req.on_concurrent_steal,
            tls=req.tls,
        )
        return m.Subscribed(request_id=req.request_id, port=req.port, warnings=list(warnings))

    async def _unsubscribe(self, req: m.Unsubscribe) -> Message:
        incoming = await self.session.settled_incoming()
        if incoming is None:
            raise OSError(errno.ENOTSUP, "this agent does not serve incoming traffic yet")
        await incoming.unsubscribe(self, req.port)
        return m.Ok(request_id=req.request_id)


def _take_socket(stream: Any) -> socket.socket:
    """The connected socket of an outgoing stream, detached from it (the stream object is
    dropped without closing it): a new socket object owns the fd."""
    raw: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    return socket.socket(raw.family, raw.type, raw.proto, raw.detach())
