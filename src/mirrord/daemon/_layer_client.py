"""The layer socket's connection handler: one layer connection (a thread of a user-app
process) from its handshake to its end.

Owns: reading the layer's frames (from the event loop's reader callback; a malformed one
closes that connection only), attaching the connection to its session's process, forwarding
its file, env and DNS requests to the agent undecoded (`AgentLink.forward`: the reply comes
back undecoded too, with no task in between), and the bound on replies it leaves unread.
Does not own what the other requests do (`LayerProcess` in `_session`).
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import logging
from collections.abc import Callable

import anyio
import anyio.abc

from mirrord._frames import Frame, FrameReader, FrameWriter, Passable
from mirrord._splice import SPLICE_MAX, PipeFill, PipePart, release_parts
from mirrord.daemon._link import FORWARDED_REQUESTS, fill_large_frame
from mirrord.daemon._session import LayerProcess, Session, lost_reply
from mirrord.protocol import (
    CLOSED,
    NEED_DATA,
    LayerConnection,
    LayerRole,
    LocalProtocolError,
    Message,
    ProtocolError,
    Received,
    State,
    Undecoded,
    UnknownMessage,
    read_head,
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
        self._queue(self.conn.send(msg), passing)

    def _queue(self, frame: Frame, passing: tuple[Passable, ...] = ()) -> None:
        self.writer.send_nowait(frame, passing)
        if self.writer.queued_bytes > MAX_LAYER_UNREAD and not self.closed:
            reason = (
                f"{self.writer.queued_bytes} bytes of replies unread (the limit is "
                f"{MAX_LAYER_UNREAD}): the layer does not read its connection"
            )
            log.warning("layer connection (pid %s) closed: %s", _pid(self), reason)
            self.close("unread_replies", reason)

    @property
    def can_splice(self) -> bool:
        return not self.closed and self.writer.can_splice

    def forward_reply(
        self,
        frame: Undecoded,
        request_id: int,
        *,
        passing: tuple[Passable, ...] = (),
        tail: list[PipePart] | None = None,
    ) -> None:
        """The agent's reply `frame` to a forwarded request, undecoded, as the answer to the
        layer's `request_id` (its body goes through as bytes); `passing` as for `reply`;
        `tail`: the body's last bytes in pipes (`can_splice` only), written or released."""
        if self.closed or self.conn.state is not State.OPEN:
            for fd in passing:
                fd.close()
            release_parts(tail)
            return  # the layer connection is gone: nobody waits for this reply
        try:
            out = self.conn.forward(frame, request_id, tail=tail or ())
        except LocalProtocolError as exc:  # a frame that no longer fits once re-headed
            for fd in passing:
                fd.close()
            release_parts(tail)
            self.reply(
                m.ErrorReply(request_id=0, errno=errno_mod.EMSGSIZE, message=str(exc)), request_id
            )
            return
        self._queue(out, passing)

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
    # shared requests (files, env, DNS) are forwarded to the agent undecoded
    conn = LayerConnection(LayerRole.DAEMON, build_id=build_id, undecoded=FORWARDED_REQUESTS)
    writer = FrameWriter(stream, "layer")
    client = LayerClient(conn, writer)
    try:
        async with stream, anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            with anyio.CancelScope() as client._scope:
                await _serve(stream, conn, client, find_session)
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
) -> None:
    """Read the layer's frames until the connection ends or is closed. Each read is handled
    in the event loop's reader callback (`FrameReader.run`): a request forwarded to the agent
    costs no task wake-up here."""
    reader = FrameReader(stream, _READ_SIZE)

    def on_data(data: bytes | memoryview) -> None:
        if not _on_data(conn, client, find_session, data):
            raise _Ended

    writes = _WriteSplice(conn, client) if client.writer.can_splice else None
    try:
        try:
            await reader.run(
                on_data, into=conn.receive_buffer, splice=writes.next if writes else None
            )
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        on_data(b"")  # the end of the stream (a frame cut short is the layer's error)
    except _Ended:
        pass
    finally:
        if writes is not None:
            writes.close()


_READ_SIZE = 256 * 1024


class _WriteSplice:
    """The layer's large `FileWrite`s, forwarded with their data in pipes (`mirrord._splice`):
    from the layer's socket into a pipe and from it into the agent's, by reference, when both
    are unix sockets. `next` is the reader's `splice` hook: decided once per large frame, at
    its first read; any other frame is received in place as before."""

    def __init__(self, conn: LayerConnection, client: LayerClient) -> None:
        self.conn = conn
        self.client = client
        self.checked = 0  # the last large frame looked at (`conn.large_frames`)
        self.job: PipeFill | None = None

    def next(self) -> PipeFill | None:
        if self.job is not None:
            return self.job
        conn, process = self.conn, self.client.process
        if conn.large_frames == self.checked or process is None:
            return None
        self.checked = conn.large_frames
        pool = process.link.write_pipes()
        large = conn.large_prefix()
        head = None if large is None else read_head(large[0], 2)
        if pool is None or large is None or head is None:
            return None
        (kind, rid), items, body = head
        if kind != m.FileWrite.KIND or large[1] > SPLICE_MAX:
            return None
        start = Undecoded(
            channel=0, kind=kind, request_id=rid, items=items, head_items=2, payload=b"", body=body
        )
        self.job = fill_large_frame(conn, pool, start, self._filled)
        return self.job

    def _filled(self, frame: Undecoded, job: PipeFill) -> None:
        """All of `frame` is in: forward it (the reader callback)."""
        self.job = None
        if job.copy is not None:  # copied after all (the pipes were full)
            _forward(self.client, dataclasses.replace(frame, payload=frame.payload + job.copy))
        else:
            _forward(self.client, frame, job.take_parts())

    def close(self) -> None:
        """The stream ended: a frame cut short is dropped with its pipes."""
        if self.job is not None:
            self.job.close()
            self.job = None


class _Ended(Exception):
    """The layer connection is done: stop reading it."""


def _on_data(
    conn: LayerConnection,
    client: LayerClient,
    find_session: Callable[[str], Session | None],
    data: bytes | memoryview,
) -> bool:
    """Feed one read (b"": the end) and handle its frames; False once the connection is done."""
    conn.receive_data(data)
    while True:
        try:
            event = conn.next_event()
        except ProtocolError as exc:
            log.warning("layer connection (pid %s): %s", _pid(client), exc)
            client.writer.send_nowait(conn.error_frame(exc))
            client.closed = True
            return False
        if event is NEED_DATA:
            return True
        if event is CLOSED:
            return False
        if isinstance(event, UnknownMessage):
            if event.request_id is not None and conn.state is State.OPEN:
                client.reply(
                    m.ErrorReply(request_id=0, errno=errno_mod.ENOSYS, message="unknown"),
                    event.request_id,
                )
            continue
        if isinstance(event, Undecoded):
            _forward(client, event)
            if client.closed:
                return False
            continue
        assert isinstance(event, Received)
        msg = event.message
        if client.process is None:
            hello = conn.peer_hello
            if hello is None:
                continue
            found = find_session(hello.session)
            if found is None or found.state == "closed":
                client.close(
                    "session_not_found",
                    f"mirrord session {hello.session!r} is not open in this daemon",
                )
                return False
            client.process = found.attach(client, hello)
            client.writer.send_nowait(conn.welcome(process=client.process.channel))
            continue
        _handle(client, msg)
        if client.closed:
            return False  # closed while handling (unread replies past the bound)


def _pid(client: LayerClient) -> int | None:
    return client.process.pid if client.process else None


def _forward(
    client: LayerClient, request: Undecoded | m.Request, tail: list[PipePart] | None = None
) -> None:
    """A shared request (files, env, DNS) to the agent on the process's channel; the reply
    comes back to `client` from the agent link's reader callback (`AgentLink.forward`).
    `tail`: an undecoded request's last bytes, in pipes (`AgentLink.forward`'s)."""
    process = client.process
    assert process is not None
    if not process.link.forward(process.channel, request, client, tail):
        client.reply(lost_reply(process), request.request_id)


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
        _forward(client, msg)  # one the layer did not encode in the usual form: decoded
    elif isinstance(msg, m.Request):
        client.reply(
            m.ErrorReply(request_id=0, errno=errno_mod.ENOSYS, message="not a layer request"),
            msg.request_id,
        )
    # anything else (Pong, Fatal handled by the connection) needs no answer
