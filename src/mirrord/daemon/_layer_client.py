"""The layer socket's connection handler: one layer connection (a thread of a user-app
process) from its handshake to its end.

Owns: reading the layer's frames (a malformed one closes that connection only), attaching the
connection to its session's process, the requests of the connection (each awaiting the agent
in the connection's task group, cancelled when it closes) and the bound on replies it leaves
unread. Does not own what the requests do (`LayerProcess` in `_session`).
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from mirrord._frames import FrameReader, FrameWriter, Passable
from mirrord.daemon._session import LayerProcess, Session, lost_reply
from mirrord.protocol import (
    CLOSED,
    NEED_DATA,
    LayerConnection,
    LayerRole,
    Message,
    ProtocolError,
    Received,
    State,
    UnknownMessage,
)
from mirrord.protocol import messages as m

__all__ = ["LayerClient", "serve_layer_client"]

log = logging.getLogger("mirrord.daemon.session")

MAX_LAYER_UNREAD = 64 * 1024 * 1024  # replies queued for one layer connection that does not read


class LayerClient:
    """One layer connection (one thread of a user-app process) on the layer socket."""

    def __init__(self, conn: LayerConnection, writer: FrameWriter) -> None:
        self.conn = conn
        self.writer = writer
        self.process: LayerProcess | None = None
        self.closed = False
        self._scope: anyio.CancelScope | None = None
        self._requests: _Runners | None = None  # its requests awaiting the agent

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"<LayerClient pid={pid} state={self.conn.state.value}>"

    def reply(self, reply: Message, request_id: int, *, passing: tuple[Passable, ...] = ()) -> None:
        """Send `reply` as the answer to `request_id`; `passing`: sockets (or, handed over by
        a local target's agent, open files) passed with it (owned by the writer from here
        on). The layer connection's peer was checked to be this user's (SO_PEERCRED) when it
        was accepted: nothing passed here reaches another user's process."""
        if self.closed or self.conn.state is not State.OPEN:
            for sock in passing:
                sock.close()
            return  # the layer connection is gone: nobody waits for this reply
        if getattr(reply, "request_id", None) != request_id:
            reply = dataclasses.replace(reply, request_id=request_id)  # type: ignore[type-var]
        self.send_nowait(reply, passing)

    def send_nowait(self, msg: Message, passing: tuple[Passable, ...] = ()) -> None:
        """Queue `msg`; a layer that leaves more than MAX_LAYER_UNREAD bytes of replies unread
        is closed (a thread of a preloaded process waits for each reply it asked for, so only
        a misbehaving peer gets near it), instead of growing the daemon without bound."""
        if self.closed or self.conn.state is not State.OPEN:
            for sock in passing:
                sock.close()
            return  # closed (by us, past the bound): nobody reads this
        self.writer.send_nowait(self.conn.send(msg), passing)
        if self.writer.queued_bytes > MAX_LAYER_UNREAD and not self.closed:
            reason = (
                f"{self.writer.queued_bytes} bytes of replies unread (the limit is "
                f"{MAX_LAYER_UNREAD}): the layer does not read its connection"
            )
            log.warning("layer connection (pid %s) closed: %s", _pid(self), reason)
            self.close("unread_replies", reason)

    def start_task(self, fn: Callable[..., Awaitable[None]], *args: Any) -> bool:
        """Run `fn(*args)` in this connection's task group (cancelled when it closes)."""
        if self._requests is None or self.closed:
            return False
        self._requests.submit(fn, args)
        return True

    def close(self, code: str, message: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self.conn.state in (State.OPEN, State.HANDSHAKE):
            self.writer.send_nowait(self.conn.fatal_frame(code, message))
        self.writer.close()
        if self._scope is not None:
            self._scope.cancel()


async def serve_layer_client(
    stream: anyio.abc.ByteStream, build_id: str, find_session: Callable[[str], Session | None]
) -> None:
    """Serve one layer connection until it closes (or its session ends)."""
    conn = LayerConnection(LayerRole.DAEMON, build_id=build_id)
    writer = FrameWriter(stream, "layer")
    client = LayerClient(conn, writer)
    try:
        async with stream, anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            async with anyio.create_task_group() as requests:
                client._requests = _Runners(requests)
                with anyio.CancelScope() as client._scope:
                    await _serve(stream, conn, client, find_session)
                requests.cancel_scope.cancel()  # nobody reads the replies of the rest
            writer.close()
            with anyio.move_on_after(2):
                await writer.wait_flushed()  # a final Fatal frame says why we close
            tg.cancel_scope.cancel()
    finally:
        client.closed = True
        if client.process is not None:
            client.process.session.detach(client)


async def _serve(
    stream: anyio.abc.ByteStream,
    conn: LayerConnection,
    client: LayerClient,
    find_session: Callable[[str], Session | None],
) -> Session | None:
    session: Session | None = None
    reader = FrameReader(stream, 256 * 1024)
    while True:
        try:
            data = await reader.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            data = b""
        conn.receive_data(data)
        while True:
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                log.warning("layer connection (pid %s): %s", _pid(client), exc)
                client.writer.send_nowait(conn.error_frame(exc))
                client.closed = True
                return session
            if event is NEED_DATA:
                break
            if event is CLOSED:
                return session
            if isinstance(event, UnknownMessage):
                if event.request_id is not None and conn.state is State.OPEN:
                    client.reply(
                        m.ErrorReply(request_id=0, errno=errno_mod.ENOSYS, message="unknown"),
                        event.request_id,
                    )
                continue
            assert isinstance(event, Received)
            msg = event.message
            if session is None:
                hello = conn.peer_hello
                if hello is None:
                    continue
                found = find_session(hello.session)
                if found is None or found.state == "closed":
                    client.close(
                        "session_not_found",
                        f"mirrord session {hello.session!r} is not open in this daemon",
                    )
                    return None
                session = found
                client.process = session.attach(client, hello)
                client.writer.send_nowait(conn.welcome(process=client.process.channel))
                continue
            _handle(client, msg)
            if client.closed:
                return session  # closed while handling (unread replies past the bound)


class _Runners:
    """The tasks that run a layer connection's requests: an idle one takes the next request; a
    new one starts only while all are busy. A thread of the layer waits for each reply, so one
    runner is the rule, and a request costs no task start (anyio's `start_soon` on asyncio took
    ~65 µs, a quarter of the daemon's CPU time per forwarded file request)."""

    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        self._jobs: deque[tuple[Callable[..., Awaitable[None]], tuple[Any, ...]]] = deque()
        self._idle = 0
        self._wake = anyio.Event()

    def __repr__(self) -> str:
        return f"<_Runners queued={len(self._jobs)} idle={self._idle}>"

    def submit(self, fn: Callable[..., Awaitable[None]], args: tuple[Any, ...]) -> None:
        self._jobs.append((fn, args))
        if self._idle >= len(self._jobs):
            self._wake.set()
        else:
            self._tg.start_soon(self._run)

    async def _run(self) -> None:
        while True:
            while self._jobs:
                fn, args = self._jobs.popleft()
                try:
                    await fn(*args)
                except Exception:  # a bug to log, never the end of the layer connection
                    log.exception("layer request %s failed", getattr(fn, "__qualname__", fn))
                del fn, args
            self._idle += 1
            try:
                await self._wake.wait()
            finally:
                self._idle -= 1
            if self._wake.is_set():
                self._wake = anyio.Event()


def _pid(client: LayerClient) -> int | None:
    return client.process.pid if client.process else None


def _handle(client: LayerClient, msg: Message) -> None:
    process = client.process
    assert process is not None
    if isinstance(msg, m.Ping):
        client.send_nowait(m.Pong(nonce=msg.nonce))
    elif isinstance(msg, m.LayerConnect):
        if not process.link.start_task(process.outgoing, client, msg):
            client.reply(lost_reply(process), msg.request_id)
    elif isinstance(msg, m.LayerListen):
        process.listen(client, msg)
    elif isinstance(msg, m.LayerUnlisten):
        process.unlisten(client, msg)
    elif isinstance(msg, m.LayerDisconnect):
        process.disconnect(client, msg)
    elif isinstance(msg, m.PeerLookup):
        process.peer(client, msg)
    elif isinstance(msg, m.Request) and msg.KIND < 100:
        if not client.start_task(process.forward, client, msg):
            client.reply(lost_reply(process), msg.request_id)
    elif isinstance(msg, m.Request):
        client.reply(
            m.ErrorReply(request_id=0, errno=errno_mod.ENOSYS, message="not a layer request"),
            msg.request_id,
        )
    # anything else (Pong, Fatal handled by the connection) needs no answer
