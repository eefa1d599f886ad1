"""One stolen connection under a filtered steal, routed request by request (HTTP/1.x).

Owns: `FilteredConnection`, which `IncomingService` (`_incoming.py`) runs for each stolen
connection that no session steals whole. A request that a channel's filter matches (first
subscriber first) becomes an `IncomingConnection` of its own carrying exactly the client's
bytes; the response is read back and written to the client. Other requests go to the pod's
app over one connection to the original destination, opened from inside the pod with
`SO_MARK` so our own OUTPUT rule lets it through. Responses are written in request order
(pipelining, at most `MAX_PIPELINE` in flight). After a matched `Upgrade` that the app
accepts, the rest of the connection is relayed whole. Bytes that are not HTTP/1.x go to the
pod's app untouched; a pod app that speaks first (a server-first protocol) gets the whole
connection relayed both ways.
Does not own: HTTP parsing (`_http_filter.py`), HTTP/2 (the connection hands itself to
`_incoming_h2.py` when its first bytes are the preface or an `Upgrade: h2c` request), the
choice of session (the port's filters, `IncomingService.steals`), opening a connection
from inside the pod (`IncomingService.connect_upstream`), or TLS (`_incoming_tls.py`: a
terminated client arrives decrypted, with its `TlsConnection`, which puts the connections to
the pod's app and to the sessions in TLS of their own).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.abc

from mirrord.agent._http2_detect import could_be_h2_preface, h2c_upgrade_from
from mirrord.agent._http_filter import (
    CLOSED,
    NEED_DATA,
    Passthrough,
    RequestBody,
    RequestEnded,
    RequestHead,
    RequestSplitter,
    RequestStarted,
    ResponseEnded,
    ResponseError,
    ResponseSplitter,
)
from mirrord.agent._incoming_h2 import pod_app_sent_h2_settings, serve_h2, serve_h2c_upgrade
from mirrord.agent._incoming_pipe import PipeEnd, pipe_pair
from mirrord.agent._incoming_tls import TlsConnection, TlsEnd

__all__ = ["MAX_PIPELINE", "REPLAY_LIMIT", "FilteredConnection"]

log = logging.getLogger("mirrord.agent.incoming")

MAX_PIPELINE = 32  # requests of one client connection in flight at once
# A matched request is kept (up to this size) until its session connection is accepted, so
# that it can go to the pod's app instead when the user app stopped listening meanwhile.
REPLAY_LIMIT = 1024 * 1024
_READ = 256 * 1024
_BAD_GATEWAY = (
    b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
    b"connection: close\r\n\r\n%s"
)


class StealRouter(Protocol):
    """What a filtered connection needs of the incoming service (`IncomingService`,
    `_incoming.py`, which imports this module; this one never imports it back)."""

    stats: dict[str, int]

    def session_for(self, port: int, head: RequestHead) -> Any | None:
        """The channel whose filter on `port` matches `head` (None: the pod's app answers)."""
        ...

    async def connect_upstream(
        self, address: tuple[str, int], *, sniffed: bool = False
    ) -> anyio.abc.SocketStream: ...


@dataclass
class _Exchange:
    """One request of a filtered connection and where its response comes from."""

    head: RequestHead | None
    dest: Any  # PipeEnd (a session) or the upstream stream; None: no upstream (502)
    session: bool
    upstream: _Upstream | None = None  # when `dest` is the pod's app: its connection
    tunnel: bool = False  # not a request: relay `dest` -> client until EOF
    switched: bool | None = None
    decided: anyio.Event = field(default_factory=anyio.Event)
    answered: bool = False  # some of the response reached the client
    # A session's request as sent so far (None: too big to keep, or not all of it is HTTP),
    # and whether the client has sent all of it (`complete` is set either way at the end).
    replay: bytearray | None = field(default_factory=bytearray)
    whole: bool = False
    complete: anyio.Event = field(default_factory=anyio.Event)

    async def send_request(self, raw: bytes) -> None:
        """Bytes of this request to where it goes (kept for a replay while small)."""
        if self.session and self.replay is not None:
            if len(self.replay) + len(raw) > REPLAY_LIMIT:
                self.replay = None
            else:
                self.replay += raw
        await self.dest.send(raw)

    def request_done(self, whole: bool) -> None:
        self.whole = whole
        self.complete.set()

    def decide(self, switched: bool) -> None:
        """The response says whether the connection switched protocols (an accepted
        `Upgrade`); the request reader waits for this after an `Upgrade` request."""
        self.switched = switched
        self.decided.set()


def _closed_by_peer(stream: anyio.abc.ByteStream) -> bool:
    """Has the peer closed this (idle) connection? A peek that does not consume anything."""
    if isinstance(stream, TlsEnd):
        return stream.closed_by_peer()
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if raw is None:
        return False
    try:
        return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class _Upstream:
    """The connection to the pod's app shared by a client connection's unmatched requests,
    with the bytes read past the end of the previous response."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.leftover = b""
        self.broken = False


class FilteredConnection:
    """One client connection of a filtered steal. `run` serves it until either side ends."""

    def __init__(
        self,
        service: StealRouter,
        client: anyio.abc.ByteStream,
        remote: tuple[str, int],
        original: tuple[str, int],
        *,
        sniffed: bool = False,
        tls: TlsConnection | None = None,
    ) -> None:
        self.service = service
        self.tls = tls  # its TLS, when the agent terminated it (`_incoming_tls.py`)
        self.sniffed = sniffed
        self.client = client
        self.remote = remote
        self.original = original
        self.port = original[1]
        self.upstream: _Upstream | None = None
        self.upstream_failed: str | None = None  # why the pod's app cannot be reached
        self._upstream_lock = anyio.Lock()
        self._old_upstreams: list[_Upstream] = []
        self._client_spoke = False
        self._server_first = False
        self._watch_scope: anyio.CancelScope | None = None
        self._reading: list[_Exchange] = []  # requests whose bytes are still coming in
        self._current: _Exchange | None = None  # the request being read
        self._tunnel: Any = None  # where the client's bytes go untouched, once not HTTP/1.x

    def __repr__(self) -> str:
        return (
            f"<FilteredConnection port={self.port} remote={self.remote} "
            f"reading={len(self._reading)} tunnel={self._tunnel is not None}>"
        )

    async def run(self) -> None:
        send_ex, recv_ex = anyio.create_memory_object_stream[_Exchange](MAX_PIPELINE)
        try:
            async with anyio.create_task_group() as tg:
                if self.tls is None:  # TLS: the client speaks first
                    tg.start_soon(self._watch_server_first, send_ex.clone())
                tg.start_soon(self._read_client, send_ex)
                await self._write_client(recv_ex)
                # The responses are done (or the connection must end): stop reading too.
                tg.cancel_scope.cancel()
        except* (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # one side went away: the whole exchange ends, for that client only
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self.client.aclose()
                for up in [*self._old_upstreams, *([self.upstream] if self.upstream else [])]:
                    with contextlib.suppress(Exception):
                        await up.stream.aclose()

    async def _watch_server_first(self, send_ex: anyio.abc.ObjectSendStream[_Exchange]) -> None:
        """Connect to the pod's app at once; if it speaks before the client does (SMTP, MySQL,
        any server-first protocol), the connection is not HTTP: relay it whole, both ways."""
        async with send_ex:
            with anyio.CancelScope() as scope:
                self._watch_scope = scope
                up = await self.get_upstream()
                if up is None or self._client_spoke:
                    return
                raw: socket.socket = up.stream.extra(anyio.abc.SocketAttribute.raw_socket)
                await anyio.wait_readable(raw)
            self._watch_scope = None
            if scope.cancel_called or self._client_spoke or up is None:
                return
            if pod_app_sent_h2_settings(raw):
                return  # an HTTP/2 app greets first: the client's bytes decide
            self._server_first = True
            await send_ex.send(_Exchange(head=None, dest=up, session=False, tunnel=True))

    def _client_speaks(self) -> None:
        # No await between the check in the watcher and this: whoever is first wins.
        self._client_spoke = True
        if self._watch_scope is not None:
            self._watch_scope.cancel()
            self._watch_scope = None

    # ------------------------------------------------------------------ routing, upstreams

    def session_for(self, head: RequestHead) -> Any | None:
        return self.service.session_for(self.port, head)

    def count(self, figure: str) -> None:
        self.service.stats[figure] += 1

    async def get_upstream(self) -> _Upstream | None:
        """The shared connection to the pod's app (a new one when the last broke), or None
        when it cannot be reached (`upstream_failed` says why)."""
        async with self._upstream_lock:
            up = self.upstream
            if up is not None and not up.broken and _closed_by_peer(up.stream):
                up.broken = True  # the app closed its idle keep-alive connection
            if up is not None and not up.broken:
                return up
            if up is not None:
                # Not closed here: a response may still be read from it; closed at the end.
                self._old_upstreams.append(up)
                self.upstream = None
            if self.upstream_failed is not None:
                return None
            try:
                stream = await self.connect_pod()
            except OSError as exc:
                self.upstream_failed = f"{exc.strerror or exc}"
                return None
            self.upstream = _Upstream(stream)
            return self.upstream

    def set_upstream(self, stream: anyio.abc.ByteStream) -> None:
        """The shared connection to the pod's app, opened already (`_incoming_tls.terminate`)."""
        self.upstream = _Upstream(stream)

    async def connect_pod(self) -> anyio.abc.ByteStream:
        """A new connection to the pod's app, in TLS when the client's was terminated.
        Raises `OSError` when the app cannot be reached."""
        stream = await self.service.connect_upstream(self.original, sniffed=self.sniffed)
        return stream if self.tls is None else await self.tls.to_pod(stream)

    async def open_extra_upstream(self) -> anyio.abc.ByteStream:
        """A connection of its own to the pod's app, closed with the client connection.
        Raises `OSError` when the app cannot be reached."""
        stream = await self.connect_pod()
        self._old_upstreams.append(_Upstream(stream))
        return stream

    async def session_stream(self, channel: Any) -> anyio.abc.ByteStream | None:
        """`open_session`, in TLS of its own when the client's was terminated and the session
        wants its user app to get TLS; None when the session cannot take it."""
        end = self.open_session(channel)
        if end is None or self.tls is None:
            return end
        return await self.tls.to_session(channel, end)

    def open_session(self, channel: Any) -> PipeEnd | None:
        """A new `IncomingConnection` to `channel`'s session, or None when it closed."""
        ours, theirs = pipe_pair(names=("filter", "channel"))
        try:
            channel.start_incoming(
                port=self.port,
                remote_address=self.remote[0],
                remote_port=self.remote[1],
                local_address=self.original[0],
                local_port=self.port,
                mode="steal",
                stream=theirs,
            )
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return None
        return ours

    # ------------------------------------------------------------------ client -> requests

    async def _read_client(self, send_ex: anyio.abc.ObjectSendStream[_Exchange]) -> None:
        splitter = RequestSplitter()
        try:
            await self._read_requests(send_ex, splitter)
        finally:
            # A request cut short (client gone, parse error) is never replayed; and nobody
            # may wait for it forever.
            for ex in self._reading:
                ex.request_done(False)
            self._reading.clear()

    async def _read_requests(
        self, send_ex: anyio.abc.ObjectSendStream[_Exchange], splitter: RequestSplitter
    ) -> None:
        async with send_ex:
            while True:
                try:
                    data = await self.client.receive(_READ)
                except anyio.EndOfStream:
                    data = b""
                if not self._client_spoke:
                    if self._server_first and self.upstream is not None:
                        self._tunnel = self.upstream.stream
                    self._client_speaks()
                if self._tunnel is not None:
                    if not data:
                        await self._tunnel_eof()
                        return
                    await self._tunnel.send(data)
                    continue
                splitter.receive_data(data)
                if not await self._split_requests(send_ex, splitter):
                    return
                if self._tunnel is not None and not data:
                    await self._tunnel_eof()
                    return
                if not data:
                    return

    async def _tunnel_eof(self) -> None:
        with contextlib.suppress(Exception):
            await self._tunnel.send_eof()

    async def _split_requests(
        self, send_ex: anyio.abc.ObjectSendStream[_Exchange], splitter: RequestSplitter
    ) -> bool:
        """Route what the splitter cut from the client's bytes; False when reading ends."""
        while True:
            ev = splitter.next_event()
            if ev is NEED_DATA:
                return True
            if ev is CLOSED:
                current = self._current
                if current is not None and current.dest is not None:
                    # The client half-closed inside a request (a body cut short): its server
                    # must see that EOF too, or both wait for each other.
                    with contextlib.suppress(Exception):
                        await current.dest.send_eof()
                return False
            if isinstance(ev, RequestStarted):
                if not await self._request_started(ev, send_ex, splitter):
                    return False
            elif isinstance(ev, RequestBody | RequestEnded):
                await self._request_part(ev, splitter)
            elif isinstance(ev, Passthrough) and not await self._passthrough(ev, send_ex, splitter):
                return False

    async def _request_started(
        self,
        ev: RequestStarted,
        send_ex: anyio.abc.ObjectSendStream[_Exchange],
        splitter: RequestSplitter,
    ) -> bool:
        if self._current is None and splitter.requests == 1:
            upgrade = h2c_upgrade_from(ev.head)
            if upgrade and await serve_h2c_upgrade(self, upgrade, splitter):
                return False  # switched to HTTP/2: routed stream by stream there
        current = self._current = await self._route(ev.head)
        self._reading.append(current)
        await send_ex.send(current)
        if current.dest is not None:
            await current.send_request(ev.raw)
        return True

    async def _request_part(
        self, ev: RequestBody | RequestEnded, splitter: RequestSplitter
    ) -> None:
        current = self._current
        if current is not None and current.dest is not None and ev.raw:
            await current.send_request(ev.raw)
        if not isinstance(ev, RequestEnded):
            return
        if current is not None:
            self._reading.remove(current)
            current.request_done(True)
        if ev.head.upgrade:
            assert current is not None
            await current.decided.wait()
            splitter.switched(bool(current.switched))
            if current.switched:
                self._tunnel = current.dest
        self._current = None

    async def _passthrough(
        self,
        ev: Passthrough,
        send_ex: anyio.abc.ObjectSendStream[_Exchange],
        splitter: RequestSplitter,
    ) -> bool:
        if self._current is None and not splitter.requests and could_be_h2_preface(ev.raw):
            # HTTP/2 with prior knowledge: routed stream by stream there.
            rest = await serve_h2(self, ev.raw)
            if rest is None:
                return False
            ev = Passthrough(rest)
        # Not HTTP (or no longer): the rest goes untouched to where the current request
        # went, else to the pod's app, and its answer comes back whole.
        current = self._current
        if current is not None and current.dest is not None:
            current.replay = None  # not all HTTP: never replayed
            self._tunnel = current.dest
        else:
            up = await self.get_upstream()
            self._tunnel = up.stream if up is not None else None
            await send_ex.send(_Exchange(head=None, dest=up, session=False, tunnel=True))
        if self._tunnel is None:
            return False
        await self._tunnel.send(ev.raw)
        return True

    async def _route(self, head: RequestHead) -> _Exchange:
        channel = self.session_for(head)
        if channel is not None:
            end = await self.session_stream(channel)
            if end is not None:
                self.count("filtered_requests")
                return _Exchange(head=head, dest=end, session=True)
        self.count("passed_to_pod")
        up = await self.get_upstream()
        return _Exchange(
            head=head, dest=up.stream if up is not None else None, session=False, upstream=up
        )

    # ------------------------------------------------------------------ responses -> client

    async def _write_client(self, recv_ex: anyio.abc.ObjectReceiveStream[_Exchange]) -> None:
        async with recv_ex:
            async for ex in recv_ex:
                if ex.tunnel:
                    up = ex.dest
                    if up is None:
                        return
                    if up.leftover:
                        await self.client.send(up.leftover)
                    await self._copy(up.stream)
                    return
                keep = await self._one_response(ex)
                if not keep:
                    return
        with contextlib.suppress(Exception):
            await self.client.send_eof()

    async def _replay_to_pod(
        self, ex: _Exchange, source: anyio.abc.ByteStream
    ) -> anyio.abc.ByteStream | None:
        """The session refused a matched request because the user app stopped listening (it
        exited, the session is ending): the app never saw it, so the pod's app answers it,
        as it will the next requests once the subscription is gone. Returns the stream the
        response comes from, or None (then the client gets 502 as before)."""
        if not isinstance(source, PipeEnd) or source.peer_errno != errno.ECONNREFUSED:
            return None
        await ex.complete.wait()  # the rest of a refused request is read (and dropped) fast
        if ex.replay is None or not ex.whole:
            return None
        try:
            stream = await self.open_extra_upstream()
        except OSError:
            return None
        request, ex.replay = bytes(ex.replay), None
        await stream.send(request)
        ex.dest = stream  # an accepted Upgrade is relayed to it
        self.count("replayed_to_pod")
        log.info(
            "port %d: a matched request went to the pod's app: the user app no longer listens",
            self.port,
        )
        return stream

    async def _copy(self, source: anyio.abc.ByteStream) -> None:
        while True:
            try:
                data = await source.receive(_READ)
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            await self.client.send(data)

    async def _bad_gateway(self, reason: str) -> None:
        body = f"mirrord: {reason}\n".encode()
        await self.client.send(_BAD_GATEWAY % (len(body), body))

    async def _one_response(self, ex: _Exchange) -> bool:
        """Write the response of `ex` to the client; False when the connection must end."""
        assert ex.head is not None
        if ex.dest is None:
            ex.decide(False)
            await self._bad_gateway(
                f"the pod's app on port {self.port} is unreachable: {self.upstream_failed}"
            )
            return False
        up = ex.upstream
        splitter = ResponseSplitter(ex.head)
        pending = b""
        if up is not None:
            pending, up.leftover = up.leftover, b""
        try:
            ended, source = await self._relay_response(ex, splitter, pending)
        except BaseException:
            if up is not None:
                up.broken = True
            ex.decide(False)
            raise
        if ended is None:
            return False
        ex.decide(ended.switched)
        trailing = splitter.trailing
        if ended.switched:
            if trailing:
                await self.client.send(trailing)
            await self._copy(source)
            return False
        if ex.session:
            await source.aclose()  # one request per session connection: the relay ends
        elif up is not None:
            up.leftover = trailing
            if not ended.keep_alive:
                up.broken = True
        return ended.keep_alive

    async def _relay_response(
        self, ex: _Exchange, splitter: ResponseSplitter, pending: bytes
    ) -> tuple[ResponseEnded | None, anyio.abc.ByteStream]:
        """Read the response of `ex` and write it to the client, to its end (returned with the
        stream it came from). None: the connection must end (`ex` is decided already)."""
        source: anyio.abc.ByteStream = ex.dest
        while True:
            if pending:
                splitter.receive_data(pending)
                pending = b""
            got = await self._forward_response(ex, splitter, source)
            if got is False:
                return None, source
            if isinstance(got, ResponseEnded):
                return got, source
            try:
                pending = await source.receive(_READ)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                if not ex.answered and ex.session:
                    replacement = await self._replay_to_pod(ex, source)
                    if replacement is not None:
                        source = replacement
                        continue
                return await self._response_cut(ex, splitter), source

    async def _forward_response(
        self, ex: _Exchange, splitter: ResponseSplitter, source: anyio.abc.ByteStream
    ) -> ResponseEnded | bool:
        """Write what the splitter has of the response to the client: its end, True (more
        bytes needed) or False (not a valid response: relayed whole, the connection ends)."""
        while True:
            try:
                ev = splitter.next_event()
            except ResponseError:
                # Not a valid response: pass what is left through and relay the rest.
                rest = splitter.trailing
                if rest:
                    await self.client.send(rest)
                ex.decide(False)
                await self._copy(source)
                return False
            if ev is NEED_DATA:
                return True
            assert not isinstance(ev, type(NEED_DATA))
            if ev.raw:  # type: ignore[union-attr]
                await self.client.send(ev.raw)  # type: ignore[union-attr]
                ex.answered = True
                ex.replay = None  # answered: never replayed, no need to keep it
            if isinstance(ev, ResponseEnded):
                return ev

    async def _response_cut(
        self, ex: _Exchange, splitter: ResponseSplitter
    ) -> ResponseEnded | None:
        """The response's source ended: a close-delimited response ends here (returned);
        anything else was cut short (None: the connection ends, `ex` is decided)."""
        splitter.receive_data(b"")
        try:
            ev = splitter.next_event()
        except ResponseError:
            ev = NEED_DATA
        if isinstance(ev, ResponseEnded):
            if ev.raw:
                await self.client.send(ev.raw)
            return ev
        if not ex.answered:
            await self._bad_gateway("the app closed the connection without a response")
        ex.decide(False)
        return None
