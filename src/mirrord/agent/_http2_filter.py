"""HTTP/2 under a filtered steal: a sans-IO router that terminates a client's HTTP/2
connection and routes each stream, by the same filters as HTTP/1 (`HttpFilter`), to the pod's
app or to a session.

Owns: `H2Router`, which holds one server-role h2 connection toward the client and one
client-role h2 connection per upstream: one shared connection to the pod's app for every
unmatched stream, and one connection per matched stream to the session (the analogue of
HTTP/1's one `IncomingConnection` per matched request; the user app gets an HTTP/2 connection
with prior knowledge carrying that one stream, as the pod's app got). Parsing and framing are
the `h2` library's; the router moves headers, data, trailers, resets and end-of-stream between
the connections, and owns the flow-control bookkeeping between them.
Does not own: sockets, opening connections (it asks for them with `OpenUpstream` and is told
how they went), or the choice of session (the `route` callable decides: `_incoming_h2.py`).

Theory of operation
-------------------
Bytes in (`receive_client`, `receive_upstream`, `upstream_closed`), actions out
(`take_actions`: `OpenUpstream`, `SendBytes`, `CloseConnection`, in the order they must be
done). Per stream a request side (client -> upstream) and a response side (upstream ->
client), each a buffer plus a pending end (with trailers or not). A buffer moves on only as
far as the receiving peer's flow-control window allows, and the bytes are acknowledged to the
sending peer (WINDOW_UPDATE) only once moved on: what the router holds is bounded by the
windows it grants, whatever the speed of either side. PING and SETTINGS are answered per
connection by h2 (the router is an endpoint toward each peer, as any HTTP/2 proxy is).

- A GOAWAY from the pod's app: streams above its last stream id were not processed and are
  reset toward the client with REFUSED_STREAM (safe to retry); streams waiting to start go to
  a new connection to the pod's app, as will later ones.
- An upstream that ends or breaks: its unanswered streams are answered 502 with the reason,
  answered ones are reset (INTERNAL_ERROR). A session connection refused before the user app
  read anything (`upstream_closed(refused=True)`) sends its stream to the pod's app instead,
  when its request is complete and at most `REPLAY_LIMIT` bytes (as for HTTP/1).
- A GOAWAY from the client, or its EOF, closes everything at once (streams still in flight
  are reset toward their upstreams; h2 sends nothing after a GOAWAY it received, and clients
  send it when they are done).
- More streams than an upstream's SETTINGS_MAX_CONCURRENT_STREAMS wait for a free slot.
"""

from __future__ import annotations

import binascii
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from mirrord.agent._http2_detect import H2cUpgrade, Headers, head_from_headers
from mirrord.agent._http_filter import RequestHead

__all__ = [
    "CLIENT",
    "CloseConnection",
    "H2Router",
    "OpenUpstream",
    "SendBytes",
]

CLIENT: Final = 0  # the key of the client's connection in actions; upstreams count from 1
MAX_CLIENT_STREAMS: Final = 128  # SETTINGS_MAX_CONCURRENT_STREAMS we grant the client
# Connection-level window granted to each peer (a stream's stays the default 64 KiB: a larger
# SETTINGS_INITIAL_WINDOW_SIZE applies only once acknowledged, a race with the first DATA).
# 4 MiB lets several large bodies move at once; it is also what the router may buffer per
# connection and direction.
CONNECTION_WINDOW: Final = 4 * 1024 * 1024
REPLAY_LIMIT: Final = 1024 * 1024  # as HTTP/1's: a refused session stream kept this far
_DEFAULT_WINDOW: Final = 65535


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """Open a connection for `key`: to the pod's app (`session` None) or to the session
    `route` chose. Then feed what it sends to `receive_upstream(key, ...)`."""

    key: int
    session: Any


@dataclass(frozen=True, slots=True)
class SendBytes:
    """Write `data` to the connection `key` (`CLIENT` or an upstream)."""

    key: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close the connection `key` once what was sent to it is written."""

    key: int


Action = OpenUpstream | SendBytes | CloseConnection


def _settings(client: bool, values: dict[h2.settings.SettingCodes, int]) -> h2.settings.Settings:
    return h2.settings.Settings(client=client, initial_values=values)


def _config(*, client_side: bool) -> h2.config.H2Configuration:
    # Headers are validated as they arrive (inbound) on every connection; what the router
    # sends is what arrived, so checking it again on the way out only costs time (~10 % of
    # the router's time per request, measured with cProfile).
    return h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


class _Stream:
    """One client stream and where it goes."""

    __slots__ = (
        "client_id",
        "head",
        "headers",
        "replay",
        "req_debt",
        "req_end",
        "req_sent_end",
        "req_trailers",
        "resend",
        "resp_debt",
        "resp_end",
        "resp_sent_end",
        "resp_trailers",
        "responded",
        "to_client",
        "to_up",
        "up",
        "up_id",
    )

    def __init__(self, client_id: int, headers: Headers, head: RequestHead, up: _Upstream) -> None:
        self.client_id = client_id
        self.headers = headers
        self.head = head
        self.up = up
        self.up_id: int | None = None
        self.to_up = bytearray()  # request body bytes not yet given to the upstream
        self.req_debt = 0  # of those, bytes not acknowledged to the client yet
        self.req_end = False
        self.req_trailers: Headers | None = None
        self.req_sent_end = False
        # a session stream's request as sent so far, for a replay to the pod's app
        self.replay: bytearray | None = bytearray() if up.session is not None else None
        self.resend = bytearray()  # replayed bytes, already acknowledged to the client
        self.to_client = bytearray()
        self.resp_debt = 0  # of `to_client`, bytes not acknowledged to the upstream yet
        self.resp_end = False
        self.resp_trailers: Headers | None = None
        self.resp_sent_end = False
        self.responded = False  # response headers went to the client

    def __repr__(self) -> str:
        return f"<_Stream {self.client_id} -> {self.up.key}:{self.up_id}>"


class _Upstream:
    __slots__ = (
        "closed",
        "conn",
        "going_away",
        "key",
        "session",
        "settings_seen",
        "streams",
        "waiting",
    )

    def __init__(self, key: int, session: Any) -> None:
        self.key = key
        self.session = session
        self.conn = h2.connection.H2Connection(_config(client_side=True))
        # No server push: the router would have nowhere to put it.
        self.conn.local_settings = _settings(True, {h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self.streams: dict[int, _Stream] = {}  # by upstream stream id
        self.waiting: deque[_Stream] = deque()  # not started: the peer's stream limit
        self.going_away = False
        self.closed = False
        # Streams start once the peer's first SETTINGS arrived (it comes first, at once):
        # before, its stream limit is unknown, and h2 apps end a connection that exceeds it.
        self.settings_seen = False

    def can_start(self) -> bool:
        if self.closed or self.going_away or not self.settings_seen:
            return False
        limit = self.conn.remote_settings.max_concurrent_streams
        return self.conn.open_outbound_streams < limit

    def __repr__(self) -> str:
        kind = "pod" if self.session is None else "session"
        return f"<_Upstream {self.key} {kind} streams={len(self.streams)}>"


class H2Router:
    """The HTTP/2 side of one stolen client connection. `route(head)` returns the session a
    stream goes to, or None for the pod's app. Feed bytes, then `take_actions()`."""

    def __init__(
        self, route: Callable[[RequestHead], Any], *, upgrade: H2cUpgrade | None = None
    ) -> None:
        """`upgrade`: the connection switched from HTTP/1.1 (the caller sent `H2C_SWITCH`);
        its request is stream 1. Raises ValueError for a malformed `HTTP2-Settings`."""
        self._route = route
        self.client = h2.connection.H2Connection(_config(client_side=False))
        self.client.local_settings = _settings(
            False, {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CLIENT_STREAMS}
        )
        if upgrade is None:
            self.client.initiate_connection()
        else:
            try:
                self.client.initiate_upgrade_connection(upgrade.settings)
            except (binascii.Error, h2.exceptions.ProtocolError, ValueError) as exc:
                raise ValueError(f"bad HTTP2-Settings: {exc}") from None
        self.client.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self._actions: list[Action] = []
        self._streams: dict[int, _Stream] = {}  # by client stream id
        self._upstreams: dict[int, _Upstream] = {}
        self._pod: _Upstream | None = None
        self._next_key = CLIENT + 1
        self._client_goaway = False
        self.finished = False
        self.stats = {"streams": 0, "to_session": 0, "to_pod": 0, "replayed": 0}
        if upgrade is not None:
            self._new_stream(1, upgrade.headers, True)
        self._flush()

    def __repr__(self) -> str:
        return (
            f"<H2Router streams={len(self._streams)} upstreams={len(self._upstreams)} "
            f"finished={self.finished}>"
        )

    # ------------------------------------------------------------------ input

    def receive_client(self, data: bytes) -> None:
        """Bytes from the client; `b""` at its EOF (everything closes)."""
        if self.finished:
            return
        if not data:
            self._finish()
            return
        try:
            events = self.client.receive_data(data)
        except h2.exceptions.ProtocolError:
            # h2 queued a GOAWAY naming the error: send it, and end everything.
            self._finish()
            return
        for ev in events:
            self._client_event(ev)
        self._maybe_finish()
        self._flush()

    def receive_upstream(self, key: int, data: bytes) -> None:
        """Bytes from upstream `key`; `b""` at its EOF."""
        up = self._upstreams.get(key)
        if up is None or self.finished:
            return
        if not data:
            self.upstream_closed(key, "the app closed the connection")
            return
        try:
            events = up.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail_upstream(up, f"the app broke HTTP/2: {exc}")
            self._maybe_finish()
            self._flush()
            return
        for ev in events:
            self._upstream_event(up, ev)
        self._maybe_finish()
        self._flush()

    def upstream_closed(self, key: int, reason: str, *, refused: bool = False) -> None:
        """Upstream `key` could not be opened or ended. `refused`: a session connection
        that the user app never read (it stopped listening): its stream may go to the pod."""
        up = self._upstreams.get(key)
        if up is None or self.finished:
            return
        if refused and up.session is not None:
            for st in [*up.streams.values(), *up.waiting]:
                if not st.responded and st.req_end and st.replay is not None:
                    self._reroute_to_pod(st)
        self._fail_upstream(up, reason)
        self._maybe_finish()
        self._flush()

    def take_actions(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    # ------------------------------------------------------------------ client events

    def _client_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            assert ev.stream_id is not None and ev.headers is not None
            self._new_stream(ev.stream_id, list(ev.headers), ev.stream_ended is not None)
        elif isinstance(ev, h2.events.DataReceived):
            assert ev.stream_id is not None and ev.data is not None
            length = ev.flow_controlled_length or 0
            st = self._streams.get(ev.stream_id)
            if st is None or st.req_sent_end:
                self._ack_client(ev.stream_id, length)
                return
            if length > len(ev.data):  # padding: nothing to forward
                self._ack_client(ev.stream_id, length - len(ev.data))
            st.to_up += ev.data
            st.req_debt += len(ev.data)
            self._pump_request(st)
        elif isinstance(ev, h2.events.TrailersReceived):
            st = self._streams.get(ev.stream_id or 0)
            if st is not None:
                st.req_trailers = list(ev.headers or [])
        elif isinstance(ev, h2.events.StreamEnded):
            st = self._streams.get(ev.stream_id or 0)
            if st is not None:
                st.req_end = True
                self._pump_request(st)
        elif isinstance(ev, h2.events.StreamReset):
            st = self._streams.get(ev.stream_id or 0)
            if st is not None:
                self._drop_stream(st, reset_up=ev.error_code or h2.errors.ErrorCodes.CANCEL)
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            sid = getattr(ev, "stream_id", 0) or 0
            targets = [self._streams[sid]] if sid in self._streams else list(self._streams.values())
            for st in targets:
                self._pump_response(st)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            # h2 sends nothing after a GOAWAY it received, so the streams in flight cannot be
            # answered: clients send it when they are done (curl, browsers), or on an error.
            self._client_goaway = True

    def _new_stream(self, client_id: int, headers: Headers, ended: bool) -> None:
        head = head_from_headers(headers)
        self.stats["streams"] += 1
        session = self._route(head)
        if session is None:
            up = self._pod_upstream()
            self.stats["to_pod"] += 1
        else:
            up = self._new_upstream(session)
            self.stats["to_session"] += 1
        st = _Stream(client_id, headers, head, up)
        st.req_end = ended  # (HEADERS with END_STREAM: a request without a body)
        self._streams[client_id] = st
        up.waiting.append(st)
        self._start_waiting(up)

    # ------------------------------------------------------------------ upstream events

    def _upstream_event(self, up: _Upstream, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", None) or 0
        st = up.streams.get(sid)
        if isinstance(ev, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            if st is not None:
                final = isinstance(ev, h2.events.ResponseReceived)
                # A response that is one HEADERS frame with END_STREAM (gRPC's "trailers-only"
                # status) stays one: an empty DATA frame to end it would make those headers
                # plain headers, and the client would miss its status.
                only = final and getattr(ev, "stream_ended", None) is not None and not st.to_client
                if not self._to_client(
                    st, self.client.send_headers, st.client_id, ev.headers, only
                ):
                    return
                st.responded = st.responded or final
                if final:
                    st.replay = None
                if only:
                    st.resp_end = st.resp_sent_end = True
                    self._maybe_done(st)
        elif isinstance(ev, h2.events.DataReceived):
            length = ev.flow_controlled_length or 0
            data = ev.data or b""
            if st is None or st.resp_sent_end:
                self._ack_upstream(up, sid, length)
                return
            if length > len(data):
                self._ack_upstream(up, sid, length - len(data))
            st.to_client += data
            st.resp_debt += len(data)
            self._pump_response(st)
        elif isinstance(ev, h2.events.TrailersReceived):
            if st is not None:
                st.resp_trailers = list(ev.headers or [])
        elif isinstance(ev, h2.events.StreamEnded):
            if st is not None:
                st.resp_end = True
                self._pump_response(st)
        elif isinstance(ev, h2.events.StreamReset):
            if st is not None:
                code = ev.error_code if ev.error_code is not None else 0
                self._to_client(st, self.client.reset_stream, st.client_id, code)
                self._drop_stream(st)
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                up.settings_seen = True
            targets = [st] if st is not None else list(up.streams.values())
            for one in targets:
                self._pump_request(one)
            self._start_waiting(up)
        elif isinstance(ev, h2.events.PushedStreamReceived):
            # We said ENABLE_PUSH 0; a peer that pushes anyway gets the push refused.
            if ev.pushed_stream_id:
                self._up_call(up.conn.reset_stream, ev.pushed_stream_id, 7)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._upstream_goaway(up, ev.last_stream_id or 0, ev.error_code)

    def _upstream_goaway(self, up: _Upstream, last: int, code: Any) -> None:
        up.going_away = True
        if self._pod is up:
            self._pod = None
        for sid, st in list(up.streams.items()):
            if sid > last:
                # Never processed by the app: the client may retry it safely.
                refused = h2.errors.ErrorCodes.REFUSED_STREAM
                self._to_client(st, self.client.reset_stream, st.client_id, refused)
                self._drop_stream(st)
        waiting = list(up.waiting)
        up.waiting.clear()
        for st in waiting:
            if up.session is None:
                st.up = self._pod_upstream()
                st.up.waiting.append(st)
                self._start_waiting(st.up)
            else:
                self._answer_502(st, f"the app ended the connection (GOAWAY {code!r})")
        self._close_if_idle(up)

    # ------------------------------------------------------------------ streams

    def _pod_upstream(self) -> _Upstream:
        if self._pod is None or self._pod.closed or self._pod.going_away:
            self._pod = self._new_upstream(None)
        return self._pod

    def _new_upstream(self, session: Any) -> _Upstream:
        key = self._next_key
        self._next_key += 1
        up = _Upstream(key, session)
        self._upstreams[key] = up
        self._actions.append(OpenUpstream(key, session))
        return up

    def _start_waiting(self, up: _Upstream) -> None:
        while up.waiting and up.can_start():
            st = up.waiting.popleft()
            st.up_id = up.conn.get_next_available_stream_id()
            up.streams[st.up_id] = st
            headers, up_id = st.headers, st.up_id
            # a request that is its HEADERS alone stays one frame, as for responses
            only = st.req_end and not st.to_up and not st.resend and not st.req_trailers
            self._up_call(up.conn.send_headers, up_id, headers, only)
            if only:
                st.req_sent_end = True
                self._maybe_done(st)
            else:
                self._pump_request(st)

    def _pump_request(self, st: _Stream) -> None:
        """Move the request's buffered bytes (and its end) on to the upstream, as far as its
        window allows; acknowledge them to the client as they go."""
        up, up_id = st.up, st.up_id
        if up_id is None or up.closed or st.req_sent_end:
            return
        conn = up.conn
        for buf, debt in ((st.resend, False), (st.to_up, True)):
            while buf:
                try:
                    window = conn.local_flow_control_window(up_id)
                except h2.exceptions.ProtocolError:
                    return
                n = min(len(buf), window, conn.max_outbound_frame_size)
                if n <= 0:
                    return
                chunk = bytes(buf[:n])
                del buf[:n]
                if not self._up_call(conn.send_data, up_id, chunk):
                    return
                if st.replay is not None and debt:
                    if len(st.replay) + n > REPLAY_LIMIT:
                        st.replay = None
                    else:
                        st.replay += chunk
                if debt:
                    acked = min(n, st.req_debt)
                    st.req_debt -= acked
                    self._ack_client(st.client_id, acked)
        if st.req_end:
            st.req_sent_end = True
            trailers = st.req_trailers
            if trailers:
                self._up_call(conn.send_headers, up_id, trailers, True)
            else:
                self._up_call(conn.end_stream, up_id)
            self._maybe_done(st)

    def _pump_response(self, st: _Stream) -> None:
        """Move the response's buffered bytes (and its end) on to the client, as far as the
        client's window allows; acknowledge them to the upstream as they go."""
        if st.resp_sent_end or self._streams.get(st.client_id) is not st:
            return
        client = self.client
        while st.to_client:
            try:
                window = client.local_flow_control_window(st.client_id)
            except h2.exceptions.ProtocolError:
                return
            n = min(len(st.to_client), window, client.max_outbound_frame_size)
            if n <= 0:
                return
            chunk = bytes(st.to_client[:n])
            del st.to_client[:n]
            if not self._to_client(st, client.send_data, st.client_id, chunk):
                return
            acked = min(n, st.resp_debt)
            st.resp_debt -= acked
            if acked and st.up_id is not None:
                self._ack_upstream(st.up, st.up_id, acked)
        if st.resp_end:
            st.resp_sent_end = True
            trailers = st.resp_trailers
            if trailers:
                self._to_client(st, client.send_headers, st.client_id, trailers, True)
            else:
                self._to_client(st, client.end_stream, st.client_id)
            self._maybe_done(st)

    def _answer_502(self, st: _Stream, reason: str) -> None:
        if st.responded or st.resp_sent_end:
            code = h2.errors.ErrorCodes.INTERNAL_ERROR
            self._to_client(st, self.client.reset_stream, st.client_id, code)
            self._drop_stream(st)
            return
        body = f"mirrord: {reason}\n".encode()
        headers = [
            (b":status", b"502"),
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
        ]
        if not self._to_client(st, self.client.send_headers, st.client_id, headers):
            return
        st.responded = True
        st.to_client = bytearray(body)
        st.resp_debt = 0
        st.resp_trailers = None
        st.resp_end = True
        # The request goes nowhere now: what the client still sends is acknowledged and dropped.
        st.req_sent_end = True
        st.to_up.clear()
        self._ack_client(st.client_id, st.req_debt)
        st.req_debt = 0
        self._pump_response(st)

    def _reroute_to_pod(self, st: _Stream) -> None:
        """A session stream the user app never saw goes to the pod's app instead."""
        old = st.up
        if st.up_id is not None:
            old.streams.pop(st.up_id, None)
        with _suppress():
            old.waiting.remove(st)
        assert st.replay is not None
        st.resend = st.replay + st.resend
        st.replay = None
        st.up = self._pod_upstream()
        st.up_id = None
        st.req_sent_end = False
        self.stats["replayed"] += 1
        st.up.waiting.append(st)
        self._start_waiting(st.up)

    def _maybe_done(self, st: _Stream) -> None:
        if st.req_sent_end and st.resp_sent_end:
            self._drop_stream(st)

    def _drop_stream(self, st: _Stream, *, reset_up: int | None = None) -> None:
        """Forget `st` (done or reset); `reset_up`: reset its upstream stream with that code."""
        if self._streams.get(st.client_id) is st:
            del self._streams[st.client_id]
        up, up_id = st.up, st.up_id
        with _suppress():
            up.waiting.remove(st)
        if up_id is not None and up.streams.get(up_id) is st:
            del up.streams[up_id]
            if reset_up is not None and not up.closed:
                self._up_call(up.conn.reset_stream, up_id, reset_up)
            if st.resp_debt:
                self._ack_upstream(up, up_id, st.resp_debt)
        if st.req_debt:
            self._ack_client(st.client_id, st.req_debt)
        st.req_debt = st.resp_debt = 0
        st.req_sent_end = st.resp_sent_end = True
        self._close_if_idle(up)
        self._start_waiting(up)

    def _close_if_idle(self, up: _Upstream) -> None:
        """A session connection carries one stream: closed when it is done. The pod's app
        connection is kept for the next streams unless it is going away."""
        if up.closed or up.streams or up.waiting:
            return
        if up.session is not None or up.going_away:
            self._close_upstream(up)

    def _close_upstream(self, up: _Upstream) -> None:
        if up.closed:
            return
        with _suppress():
            up.conn.close_connection()
        self._flush_one(up)
        up.closed = True
        if self._pod is up:
            self._pod = None
        self._actions.append(CloseConnection(up.key))

    def _fail_upstream(self, up: _Upstream, reason: str) -> None:
        was_closed, up.closed = up.closed, True  # nothing more is sent to it
        if self._pod is up:
            self._pod = None
        for st in [*up.streams.values(), *up.waiting]:
            if st.up is up:
                self._answer_502(st, reason)
        up.streams.clear()
        up.waiting.clear()
        if not was_closed:
            self._actions.append(CloseConnection(up.key))

    def _maybe_finish(self) -> None:
        if self._client_goaway and not self.finished:
            self._finish()

    def _finish(self) -> None:
        """The client connection ends: every upstream closes, streams in flight are reset."""
        if self.finished:
            return
        for st in list(self._streams.values()):
            self._drop_stream(st, reset_up=h2.errors.ErrorCodes.CANCEL)
        for up in list(self._upstreams.values()):
            self._close_upstream(up)
        with _suppress():
            self.client.close_connection()
        self._flush()
        self.finished = True
        self._actions.append(CloseConnection(CLIENT))

    # ------------------------------------------------------------------ plumbing

    def _ack_client(self, stream_id: int, n: int) -> None:
        if n > 0:
            with _suppress():
                self.client.acknowledge_received_data(n, stream_id)

    def _ack_upstream(self, up: _Upstream, stream_id: int, n: int) -> None:
        if n > 0 and not up.closed:
            with _suppress():
                up.conn.acknowledge_received_data(n, stream_id)

    def _to_client(self, st: _Stream, call: Callable[..., Any], *args: Any) -> bool:
        """`call(*args)` on the client connection; a stream the client closed meanwhile is
        dropped (False)."""
        try:
            call(*args)
            return True
        except (h2.exceptions.ProtocolError, h2.exceptions.FrameTooLargeError):
            self._drop_stream(st, reset_up=h2.errors.ErrorCodes.CANCEL)
            return False

    def _up_call(self, call: Callable[..., Any], *args: Any) -> bool:
        """`call(*args)` on an upstream connection; False when h2 refuses (the stream or
        connection is closed)."""
        try:
            call(*args)
            return True
        except h2.exceptions.ProtocolError:
            return False

    def _flush_one(self, up: _Upstream) -> None:
        if up.closed:
            return
        data = up.conn.data_to_send()
        if data:
            self._actions.append(SendBytes(up.key, bytes(data)))

    def _flush(self) -> None:
        for up in self._upstreams.values():
            self._flush_one(up)
        self._upstreams = {k: u for k, u in self._upstreams.items() if not u.closed}
        data = self.client.data_to_send()
        if data and not self.finished:
            self._actions.append(SendBytes(CLIENT, bytes(data)))


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(
            exc_type, (h2.exceptions.ProtocolError, ValueError, KeyError)
        )
