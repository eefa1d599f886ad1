"""One channel (one layer process) on a daemon connection: its requests, handles, connections.

Owns: answering every request of the agent protocol for one channel (files, env, DNS,
hostname, outgoing connections; Subscribe/Unsubscribe go to the incoming code), the channel's
handle table and relays, and freeing all of them when the channel closes. Every request runs
as its own task in the channel's task group, so a slow request never holds up another, and a
failure is an `ErrorReply` with an errno for that request only. Blocking work (file I/O) runs
in worker threads; anything that needs the target's network namespace runs on `ctx.netns`.

Incoming-traffic hook (I3): `start_incoming(...)` hands an accepted (or reassembled) stream to
this channel as an agent-side connection (odd conn ids) relayed like an outgoing one.
Does not own: framing and the daemon connection (`_session.py`).
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_module
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread

from mirrord.agent._context import AgentContext
from mirrord.agent._dns import GaiError
from mirrord.agent._env import filter_env, read_environ
from mirrord.agent._files import DirHandle, FileHandle, HandleTable, fstatfs, stat_list
from mirrord.agent._outgoing import open_outgoing
from mirrord.agent._relay import Relay
from mirrord.protocol import Message
from mirrord.protocol import messages as m

if TYPE_CHECKING:
    from mirrord.agent._session import DaemonSession

__all__ = ["Channel", "IncomingHandler"]

log = logging.getLogger("mirrord.agent")


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
    ) -> list[str]: ...

    async def unsubscribe(self, channel: Channel, port: int) -> None: ...

    async def channel_closed(self, channel: Channel) -> None: ...


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
    log.error("request %d failed in the agent: %r", request_id, exc, exc_info=exc)
    return m.ErrorReply(
        request_id=request_id, errno=errno.EIO, message=f"agent error: {exc!r} (a bug: report it)"
    )


class Channel:
    """A channel of one daemon connection. `number` 0 is the control channel, which serves
    the same requests (e.g. the daemon's env lookup before any layer process exists)."""

    def __init__(
        self,
        session: DaemonSession,
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
        self.relays: dict[int, Relay] = {}
        self._next_incoming = 1
        self._tg: anyio.abc.TaskGroup | None = None
        self._scope = anyio.CancelScope()
        self.closed = False
        self._handlers: dict[type[Message], Callable[[Any], Awaitable[Message | None]]] = {
            m.FileOpen: self._file_open,
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

    # -- Link (for relays) --------------------------------------------------------------------

    async def send(self, msg: Message) -> None:
        await self.session.send(msg, self.number)

    def send_window(self, conn_id: int) -> int:
        return self.session.conn.send_window(self.number, conn_id)

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
            for relay in list(self.relays.values()):
                relay.abort()
            self.handles.close_all()
            incoming = self.session.server.incoming
            if incoming is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    try:
                        await incoming.channel_closed(self)
                    except Exception as exc:
                        log.error("incoming cleanup of channel %d failed: %r", self.number, exc)

    def close(self) -> None:
        """Free everything the channel holds (its tasks are cancelled; no messages are sent)."""
        self.closed = True
        for relay in list(self.relays.values()):
            relay.abort()
        self._scope.cancel()

    # -- dispatch (called by the session's reader) ---------------------------------------------

    async def dispatch(self, msg: Message) -> None:
        if isinstance(msg, m.Data):
            relay = self.relays.get(msg.conn_id)
            if relay is not None:
                relay.on_data(msg.data)
        elif isinstance(msg, m.Credit):
            relay = self.relays.get(msg.conn_id)
            if relay is not None:
                relay.on_credit()
        elif isinstance(msg, m.Shutdown):
            relay = self.relays.get(msg.conn_id)
            if relay is not None:
                relay.on_shutdown()
        elif isinstance(msg, m.ConnClose):
            relay = self.relays.pop(msg.conn_id, None)
            if relay is not None:
                relay.on_close()
        elif isinstance(msg, m.Request):
            handler = self._handlers.get(type(msg))
            if handler is None:
                await self.send(
                    m.ErrorReply(
                        request_id=msg.request_id,
                        errno=errno.ENOSYS,
                        message=f"the agent does not serve {type(msg).__name__}",
                    )
                )
                return
            if self._tg is None or self.closed:
                await self.send(
                    m.ErrorReply(
                        request_id=msg.request_id, errno=errno.EBADF, message="channel closed"
                    )
                )
                return
            await self.session.request_slots.acquire()
            self._tg.start_soon(self._serve, handler, msg)
        # Replies and anything else the daemon should not send us are ignored.

    async def _serve(self, handler: Callable[[Any], Awaitable[Message | None]], req: Any) -> None:
        try:
            try:
                reply = await handler(req)
            except Exception as exc:
                reply = _errno_reply(req.request_id, exc)
            if log.isEnabledFor(logging.DEBUG):
                # Message names and errnos only: paths are fine, env values never reach here.
                log.debug(
                    "channel %d: %s %d -> %s%s",
                    self.number,
                    type(req).__name__,
                    req.request_id,
                    type(reply).__name__ if reply is not None else "Connected",
                    f" errno={reply.errno}" if isinstance(reply, m.ErrorReply) else "",
                )
            if reply is not None:
                await self.send(reply)
        finally:
            self.session.request_slots.release()

    # -- files ---------------------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args)

    async def _with_handle(
        self,
        number: int,
        fn: Callable[[FileHandle], Any],
        kind: type[FileHandle] | None = FileHandle,
    ) -> Any:
        handle = self.handles.acquire(number, kind)
        try:
            return await anyio.to_thread.run_sync(fn, handle)
        finally:
            self.handles.release(handle)

    async def _file_open(self, req: m.FileOpen) -> Message:
        fd = await self._in_thread(self.ctx.root.open, req.path, req.flags, req.mode)
        if self.closed:
            os.close(fd)
            raise OSError(errno.EBADF, "channel closed")
        return m.FileOpened(request_id=req.request_id, handle=self.handles.add(FileHandle(fd=fd)))

    async def _file_read(self, req: m.FileRead) -> Message:
        def read(h: FileHandle) -> bytes:
            if req.offset is None:
                return os.read(h.fd, req.size)
            return os.pread(h.fd, req.size, req.offset)

        return m.FileData(request_id=req.request_id, data=await self._with_handle(req.handle, read))

    async def _file_write(self, req: m.FileWrite) -> Message:
        def write(h: FileHandle) -> int:
            if req.offset is None:
                return os.write(h.fd, req.data)
            return os.pwrite(h.fd, req.data, req.offset)

        count = await self._with_handle(req.handle, write)
        return m.FileWritten(request_id=req.request_id, count=count)

    async def _file_seek(self, req: m.FileSeek) -> Message:
        pos = await self._with_handle(req.handle, lambda h: os.lseek(h.fd, req.offset, req.whence))
        return m.FilePosition(request_id=req.request_id, position=pos)

    async def _file_close(self, req: m.FileClose) -> Message:
        self.handles.close(req.handle, None)
        return m.Ok(request_id=req.request_id)

    async def _file_stat(self, req: m.FileStat) -> Message:
        if req.handle is not None:
            st = await self._with_handle(req.handle, lambda h: stat_list(os.fstat(h.fd)), None)
        else:
            assert req.path is not None
            st = await self._in_thread(self.ctx.root.stat, req.path, req.follow)
        return m.StatReply(request_id=req.request_id, stat=st)

    async def _statfs(self, req: m.StatFs) -> Message:
        if req.handle is not None:
            st = await self._with_handle(req.handle, lambda h: fstatfs(h.fd), None)
        else:
            assert req.path is not None
            st = await self._in_thread(self.ctx.root.statfs, req.path)
        return m.StatFsReply(request_id=req.request_id, statfs=st)

    async def _access(self, req: m.FileAccess) -> Message:
        await self._in_thread(self.ctx.root.access, req.path, req.mode)
        return m.Ok(request_id=req.request_id)

    async def _readlink(self, req: m.ReadLink) -> Message:
        target = await self._in_thread(self.ctx.root.readlink, req.path)
        return m.ReadLinkReply(request_id=req.request_id, target=target)

    async def _dir_open(self, req: m.DirOpen) -> Message:
        if req.path is not None:
            fd = await self._in_thread(self.ctx.root.opendir_fd, req.path)
        else:
            # fdopendir: the directory stream takes over the open file handle, as in libc.
            assert req.handle is not None
            mode = await self._with_handle(req.handle, lambda h: os.fstat(h.fd).st_mode)
            if not stat_module.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, "not a directory")
            fd = self.handles.take(req.handle).fd
        if self.closed:
            os.close(fd)
            raise OSError(errno.EBADF, "channel closed")
        return m.DirOpened(request_id=req.request_id, handle=self.handles.add(DirHandle(fd=fd)))

    async def _dir_read(self, req: m.DirRead) -> Message:
        root = self.ctx.root

        def read(h: FileHandle) -> list[tuple[bytes, int, int]]:
            assert isinstance(h, DirHandle)
            return h.read_batch(root, req.max_entries)

        entries = await self._with_handle(req.handle, read, DirHandle)
        return m.DirEntries(request_id=req.request_id, entries=entries)

    async def _dir_close(self, req: m.DirClose) -> Message:
        self.handles.close(req.handle, DirHandle)
        return m.Ok(request_id=req.request_id)

    async def _mkdir(self, req: m.Mkdir) -> Message:
        await self._in_thread(self.ctx.root.mkdir, req.path, req.mode)
        return m.Ok(request_id=req.request_id)

    async def _rmdir(self, req: m.Rmdir) -> Message:
        await self._in_thread(self.ctx.root.rmdir, req.path)
        return m.Ok(request_id=req.request_id)

    async def _unlink(self, req: m.Unlink) -> Message:
        await self._in_thread(self.ctx.root.unlink, req.path)
        return m.Ok(request_id=req.request_id)

    async def _rename(self, req: m.Rename) -> Message:
        await self._in_thread(self.ctx.root.rename, req.old, req.new)
        return m.Ok(request_id=req.request_id)

    async def _ftruncate(self, req: m.Ftruncate) -> Message:
        await self._with_handle(req.handle, lambda h: os.ftruncate(h.fd, req.length))
        return m.Ok(request_id=req.request_id)

    async def _fchmod(self, req: m.Fchmod) -> Message:
        await self._with_handle(req.handle, lambda h: os.fchmod(h.fd, req.mode), None)
        return m.Ok(request_id=req.request_id)

    async def _fsync(self, req: m.Fsync) -> Message:
        await self._with_handle(req.handle, lambda h: os.fsync(h.fd), None)
        return m.Ok(request_id=req.request_id)

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
        stream, local_address, local_port = await open_outgoing(
            self.ctx.netns, req.protocol, req.address, req.port, timeout=self.ctx.connect_timeout
        )
        if self.closed or self._tg is None:
            await stream.aclose()
            raise OSError(errno.EBADF, "channel closed")
        relay = Relay(
            self, req.conn_id, stream, description=f"{req.protocol} to {req.address}:{req.port}"
        )
        self.relays[req.conn_id] = relay
        # Connected goes out before the relay can send Data for this connection.
        await self.send(
            m.Connected(
                request_id=req.request_id,
                conn_id=req.conn_id,
                local_address=local_address,
                local_port=local_port,
            )
        )
        self._tg.start_soon(self._run_relay, relay)
        return None  # Connected is sent above

    async def _run_relay(self, relay: Relay) -> None:
        try:
            await relay.run()
        finally:
            if self.relays.get(relay.conn_id) is relay:
                del self.relays[relay.conn_id]

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
    ) -> int:
        """Relay `stream` to the daemon as a new incoming connection of this channel (I3).

        Non-blocking: allocates an odd conn id, and in the channel's task group sends
        `IncomingConnection` then relays under the credit window. Returns the conn id.
        Raises `anyio.ClosedResourceError` (leaving `stream` to the caller) when the channel
        is closed."""
        if self.closed or self._tg is None:
            raise anyio.ClosedResourceError
        conn_id = self._next_incoming
        self._next_incoming += 2
        relay = Relay(
            self, conn_id, stream, description=f"{mode} {remote_address}:{remote_port}->:{port}"
        )
        self.relays[conn_id] = relay
        announce = m.IncomingConnection(
            conn_id=conn_id,
            port=port,
            remote_address=remote_address,
            remote_port=remote_port,
            local_address=local_address,
            local_port=local_port,
            mode=mode,
        )
        self._tg.start_soon(self._run_incoming, relay, announce)
        return conn_id

    async def _run_incoming(self, relay: Relay, announce: m.IncomingConnection) -> None:
        await self.send(announce)
        await self._run_relay(relay)

    # -- incoming subscriptions ----------------------------------------------------------------

    async def _subscribe(self, req: m.Subscribe) -> Message:
        incoming = self.session.server.incoming
        if incoming is None:
            raise OSError(errno.ENOTSUP, "this agent does not serve incoming traffic yet")
        warnings = await incoming.subscribe(
            self,
            req.port,
            req.mode,
            req.http_filter,
            on_concurrent_steal=req.on_concurrent_steal,
        )
        return m.Subscribed(request_id=req.request_id, port=req.port, warnings=list(warnings))

    async def _unsubscribe(self, req: m.Unsubscribe) -> Message:
        incoming = self.session.server.incoming
        if incoming is None:
            raise OSError(errno.ENOTSUP, "this agent does not serve incoming traffic yet")
        await incoming.unsubscribe(self, req.port)
        return m.Ok(request_id=req.request_id)
