"""The HTTP/2 router of a filtered steal, sans-IO: a real h2 client, real h2 servers (the pod's
app and one per session connection) and `H2Router` between them, bytes moved in memory in an
order and in pieces that hypothesis chooses (down to one byte at a time)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mirrord.agent._http2_detect import (
    H2_PREFACE,
    could_be_h2_preface,
    could_be_h2_server_preface,
    h2c_upgrade_from,
    head_from_headers,
    is_h2_preface,
)
from mirrord.agent._http2_filter import CLIENT, CloseConnection, H2Router, OpenUpstream, SendBytes
from mirrord.agent._http_filter import HttpFilter, RequestHead

ALICE = HttpFilter.from_config({"header_filter": "^x-user: alice$"})


def _route(head: RequestHead) -> Any:
    return "alice" if ALICE.matches(head) else None


@dataclass
class _Msg:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None


class _Endpoint:
    """A real h2 connection that sends bodies as its peer's windows allow."""

    def __init__(self, client: bool, max_streams: int | None = None) -> None:
        config = h2.config.H2Configuration(client_side=client, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        if max_streams is not None:
            self.conn.local_settings = h2.settings.Settings(
                client=client,
                initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams},
            )
        self.conn.initiate_connection()
        self.pending: dict[int, tuple[bytearray, list[tuple[bytes, bytes]] | None]] = {}
        self.msgs: dict[int, _Msg] = {}
        self.closed = False
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.ping_acks: list[bytes] = []

    def send_message(
        self,
        sid: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        trailers: list[tuple[bytes, bytes]] | None,
    ) -> None:
        self.conn.send_headers(sid, headers)
        self.pending[sid] = (bytearray(body), trailers)
        self.pump()

    def pump(self) -> None:
        for sid, (body, trailers) in list(self.pending.items()):
            while body:
                try:
                    window = self.conn.local_flow_control_window(sid)
                except h2.exceptions.ProtocolError:
                    del self.pending[sid]
                    break
                n = min(len(body), window, self.conn.max_outbound_frame_size)
                if n <= 0:
                    break
                self.conn.send_data(sid, bytes(body[:n]))
                del body[:n]
            if not body and sid in self.pending:
                del self.pending[sid]
                if trailers:
                    self.conn.send_headers(sid, trailers, end_stream=True)
                else:
                    self.conn.end_stream(sid)

    def receive(self, data: bytes) -> list[h2.events.Event]:
        events = self.conn.receive_data(data)
        for ev in events:
            sid = getattr(ev, "stream_id", None) or 0
            if isinstance(ev, h2.events.RequestReceived | h2.events.ResponseReceived):
                self.msgs.setdefault(sid, _Msg()).headers = list(ev.headers or [])
            elif isinstance(ev, h2.events.DataReceived):
                self.msgs[sid].body += ev.data or b""
                self.conn.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
            elif isinstance(ev, h2.events.TrailersReceived):
                self.msgs[sid].trailers = list(ev.headers or [])
            elif isinstance(ev, h2.events.StreamEnded):
                self.msgs[sid].ended = True
            elif isinstance(ev, h2.events.StreamReset):
                self.msgs.setdefault(sid, _Msg()).reset = ev.error_code
                self.pending.pop(sid, None)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
            elif isinstance(ev, h2.events.PingAckReceived):
                self.ping_acks.append(ev.ping_data or b"")
        self.pump()
        return events


class _Server(_Endpoint):
    """An app: answers each complete request with `NAME METHOD PATH\\n` + the request body,
    and echoes request trailers as response trailers."""

    def __init__(self, name: str, max_streams: int | None = None) -> None:
        super().__init__(client=False, max_streams=max_streams)
        self.name = name
        self.served: list[int] = []

    def receive(self, data: bytes) -> list[h2.events.Event]:
        events = super().receive(data)
        for ev in events:
            if isinstance(ev, h2.events.StreamEnded):
                sid = ev.stream_id or 0
                msg = self.msgs[sid]
                hd = dict(msg.headers)
                body = b"%s %s %s\n" % (self.name.encode(), hd[b":method"], hd[b":path"])
                self.served.append(sid)
                if hd[b":path"] == b"/trailers-only":  # gRPC's status-only answer
                    status = [(b":status", b"200"), (b"grpc-status", b"5")]
                    self.conn.send_headers(sid, status, end_stream=True)
                    continue
                self.send_message(
                    sid,
                    [(b":status", b"200"), (b"x-served-by", self.name.encode())],
                    body + bytes(msg.body),
                    [(b"x-echo", t[1]) for t in msg.trailers] or None,
                )
        return events


class _World:
    """The client, the router and the servers, with the bytes in flight between them."""

    def __init__(
        self, route: Any = _route, *, pod_reachable: bool = True, pod_limit: int | None = None
    ) -> None:
        self.pod_limit = pod_limit
        self.client = _Endpoint(client=True)
        self.router = H2Router(route)
        self.servers: dict[int, _Server] = {}
        self.closed: set[int] = set()
        self.opened: list[OpenUpstream] = []
        # (from, to) -> bytes in flight; "c" the client, "r" the router, ints the upstreams
        self.wires: dict[tuple[Any, Any], bytearray] = {}
        self.pod_reachable = pod_reachable
        self.move_client()
        self.take()

    def move_client(self) -> None:
        data = self.client.conn.data_to_send()
        if data:
            self.wires.setdefault(("c", "r"), bytearray()).extend(data)

    def take(self) -> None:
        refused: list[int] = []  # (as the shell: a failed connect is reported after the actions)
        for action in self.router.take_actions():
            if isinstance(action, OpenUpstream):
                self.opened.append(action)
                if action.session is None and not self.pod_reachable:
                    refused.append(action.key)
                    continue
                if action.session is None:
                    server = _Server("pod", self.pod_limit)
                else:
                    server = _Server(str(action.session))
                self.servers[action.key] = server
                self.wires[(action.key, "r")] = bytearray(server.conn.data_to_send())
            elif isinstance(action, SendBytes):
                if action.key in refused:
                    continue
                assert action.key not in self.closed, action
                dest: Any = "c" if action.key == CLIENT else action.key
                self.wires.setdefault(("r", dest), bytearray()).extend(action.data)
            elif isinstance(action, CloseConnection):
                self.closed.add(action.key)
        for key in refused:
            self.closed.add(key)
            self.router.upstream_closed(key, "connection refused")
        if refused:
            self.take()

    def busy(self) -> list[tuple[Any, Any]]:
        return sorted((k for k, v in self.wires.items() if v), key=repr)

    def deliver(self, wire: tuple[Any, Any], n: int) -> None:
        buf = self.wires[wire]
        data = bytes(buf[:n])
        del buf[:n]
        src, dst = wire
        if dst == "r":
            if src == "c":
                self.router.receive_client(data)
            elif src not in self.closed:
                self.router.receive_upstream(src, data)
            self.take()
        elif dst == "c":
            self.client.receive(data)
            self.move_client()
        else:
            server = self.servers[dst]
            server.receive(data)
            if dst not in self.closed:
                out = server.conn.data_to_send()
                self.wires.setdefault((dst, "r"), bytearray()).extend(out)

    def run(self, pick: Any = None, size: Any = None, limit: int = 200_000) -> None:
        """Deliver until nothing is in flight; `pick(n)` chooses a wire, `size(n)` how many of
        its n bytes go (default: the first wire, all of it)."""
        for _ in range(limit):
            busy = self.busy()
            if not busy:
                return
            wire = busy[pick(len(busy)) if pick else 0]
            n = len(self.wires[wire])
            self.deliver(wire, size(n) if size else n)
        raise AssertionError("bytes still in flight after the step limit")


def _request(
    world: _World,
    path: str,
    user: str | None,
    body: bytes = b"",
    trailer: bytes | None = None,
    *,
    method: str = "POST",
) -> int:
    sid = world.client.conn.get_next_available_stream_id()
    headers = [
        (b":method", method.encode()),
        (b":path", path.encode()),
        (b":scheme", b"http"),
        (b":authority", b"pod"),
    ]
    if user is not None:
        headers.append((b"x-user", user.encode()))
    trailers = [(b"x-trailer", trailer)] if trailer is not None else None
    world.client.send_message(sid, headers, body, trailers)
    world.move_client()
    return sid


def _check(
    world: _World, sid: int, user: str | None, path: str, *, body: bytes, trailer: Any
) -> None:
    msg = world.client.msgs[sid]
    assert msg.reset is None, msg
    assert msg.ended
    served_by = "alice" if user == "alice" else "pod"
    assert dict(msg.headers)[b"x-served-by"] == served_by.encode()
    assert bytes(msg.body) == f"{served_by} POST {path}\n".encode() + body
    assert msg.trailers == ([(b"x-echo", trailer)] if trailer is not None else [])


def test_preface_recognised_from_its_first_bytes() -> None:
    assert could_be_h2_preface(b"PRI * HTTP/2")
    assert could_be_h2_preface(H2_PREFACE + b"\x00\x00")
    assert not could_be_h2_preface(b"GET / HTTP/1.1\r\n")
    assert not could_be_h2_preface(b"PRI * HTTP/2.0\r\n\r\nXX")
    assert is_h2_preface(H2_PREFACE + b"rest")
    assert not is_h2_preface(H2_PREFACE[:-1])


def test_head_of_an_http2_request_carries_host_from_authority() -> None:
    head = head_from_headers(
        [(b":method", b"GET"), (b":path", b"/a?b=1"), (b":authority", b"pod:80"), (b"x-user", b"z")]
    )
    assert (head.method, head.path, head.target, head.http_version) == ("GET", "/a", "/a?b=1", "2")
    assert head.header("host") == "pod:80"
    assert head.header("x-user") == "z"


def test_matching_streams_go_to_the_session_the_rest_to_the_pod_on_one_connection() -> None:
    world = _World()
    users = ["alice", "bob", None, "alice", "alice", "carol"]
    sids = [_request(world, f"/r{i}", u, b"b%d" % i, b"t%d" % i) for i, u in enumerate(users)]
    world.run()
    for i, (sid, user) in enumerate(zip(sids, users, strict=True)):
        _check(world, sid, user, f"/r{i}", body=b"b%d" % i, trailer=b"t%d" % i)
    sessions = [o for o in world.opened if o.session is not None]
    pods = [o for o in world.opened if o.session is None]
    assert len(sessions) == 3 and len(pods) == 1  # one connection per matched stream
    assert {o.key for o in sessions} <= world.closed  # each closed once its stream is done
    assert all(len(world.servers[o.key].served) == 1 for o in sessions)
    assert len(world.servers[pods[0].key].served) == 3


def test_large_bodies_both_ways_respect_flow_control() -> None:
    world = _World()
    big = bytes(range(256)) * 12_000  # ~3 MiB: many times every default window
    a = _request(world, "/big-a", "alice", big, b"ta")
    b = _request(world, "/big-b", "bob", big[::-1], None)
    world.run(size=lambda n: min(n, 70_000))
    _check(world, a, "alice", "/big-a", body=big, trailer=b"ta")
    _check(world, b, "bob", "/big-b", body=big[::-1], trailer=None)


@settings(
    max_examples=25,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from(["alice", "bob", None]),
            st.binary(max_size=300),
            st.one_of(st.none(), st.text("abcxyz019", min_size=1, max_size=8).map(str.encode)),
        ),
        min_size=1,
        max_size=5,
    ),
    data=st.data(),
)
def test_fuzz_split_frames_and_interleaved_streams(requests: Any, data: Any) -> None:
    world = _World()
    sids = []
    # streams start at different moments: some before any byte moved, some midway
    starts = data.draw(st.lists(st.integers(0, 30), min_size=len(requests), max_size=len(requests)))
    order = sorted(range(len(requests)), key=lambda i: starts[i])
    step = 0
    pending = list(order)
    ids: dict[int, int] = {}
    for _ in range(20_000):
        while pending and starts[pending[0]] <= step:
            i = pending.pop(0)
            user, body, trailer = requests[i]
            ids[i] = _request(world, f"/f{i}", user, body, trailer)
        busy = world.busy()
        if not busy and not pending:
            break
        step += 1
        if not busy:
            continue
        wire = busy[data.draw(st.integers(0, len(busy) - 1))]
        n = len(world.wires[wire])
        world.deliver(wire, data.draw(st.integers(1, min(n, 64))))
    assert not world.busy()
    for i, (user, body, trailer) in enumerate(requests):
        sids.append(ids[i])
        _check(world, ids[i], user, f"/f{i}", body=body, trailer=trailer)


def test_every_byte_split_of_a_mixed_exchange() -> None:
    world = _World()
    a = _request(world, "/one", "alice", b"x" * 40, b"t")
    b = _request(world, "/two", None, b"y" * 40, None)
    world.run(size=lambda n: 1)  # every frame arrives one byte at a time, every direction
    _check(world, a, "alice", "/one", body=b"x" * 40, trailer=b"t")
    _check(world, b, None, "/two", body=b"y" * 40, trailer=None)


def test_unreachable_pod_app_answers_502_and_sessions_still_work() -> None:
    world = _World(pod_reachable=False)
    a = _request(world, "/a", "alice", b"hi")
    b = _request(world, "/b", "bob", b"hi")
    world.run()
    _check(world, a, "alice", "/a", body=b"hi", trailer=None)
    msg = world.client.msgs[b]
    assert dict(msg.headers)[b":status"] == b"502"
    assert b"connection refused" in msg.body and msg.ended


def test_a_session_refused_before_the_app_read_sends_the_stream_to_the_pod() -> None:
    world = _World()
    a = _request(world, "/a", "alice", b"body", b"t")
    # deliver only the client's bytes: the session connection is asked for, never served
    world.deliver(("c", "r"), len(world.wires[("c", "r")]))
    session = next(o for o in world.opened if o.session is not None)
    world.wires.pop(("r", session.key), None)
    world.wires.pop((session.key, "r"), None)
    world.router.upstream_closed(session.key, "refused", refused=True)
    world.take()
    world.run()
    msg = world.client.msgs[a]
    assert dict(msg.headers)[b"x-served-by"] == b"pod"
    assert bytes(msg.body) == b"pod POST /a\nbody" and msg.trailers == [(b"x-echo", b"t")]
    assert world.router.stats["replayed"] == 1


def test_goaway_of_the_pod_app_moves_new_streams_to_a_new_connection() -> None:
    world = _World()
    a = _request(world, "/a", None)
    world.run()
    first_pod = next(o.key for o in world.opened if o.session is None)
    server = world.servers[first_pod]
    server.conn.close_connection(last_stream_id=max(server.served))
    world.wires[(first_pod, "r")] += server.conn.data_to_send()
    world.run()
    assert first_pod in world.closed
    b = _request(world, "/b", None)
    world.run()
    _check(world, a, None, "/a", body=b"", trailer=None)
    _check(world, b, None, "/b", body=b"", trailer=None)
    assert len([o for o in world.opened if o.session is None]) == 2


def test_client_goaway_after_its_streams_closes_everything() -> None:
    world = _World()
    a = _request(world, "/a", "alice", b"x")
    b = _request(world, "/b", None, b"y")
    world.run()
    _check(world, a, "alice", "/a", body=b"x", trailer=None)
    _check(world, b, None, "/b", body=b"y", trailer=None)
    world.client.conn.close_connection(last_stream_id=0)
    world.move_client()
    world.run()
    assert world.router.finished
    assert CLIENT in world.closed and {o.key for o in world.opened} <= world.closed


def test_client_reset_and_ping_are_handled_per_stream() -> None:
    world = _World()
    sid = world.client.conn.get_next_available_stream_id()
    head = [
        (b":method", b"POST"),
        (b":path", b"/slow"),
        (b":scheme", b"http"),
        (b":authority", b"p"),
    ]
    world.client.conn.send_headers(sid, head)  # a request whose body never ends
    world.move_client()
    world.run()
    world.client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    world.client.conn.ping(b"12345678")
    world.move_client()
    b = _request(world, "/b", "alice", b"z")
    world.run()
    _check(world, b, "alice", "/b", body=b"z", trailer=None)
    assert world.client.ping_acks == [b"12345678"]  # answered by the router (h2 acks it)
    pod = world.servers[next(o.key for o in world.opened if o.session is None)]
    assert pod.msgs[1].reset == h2.errors.ErrorCodes.CANCEL  # the reset reached the pod's app
    assert sid not in world.client.msgs


def test_broken_client_bytes_end_the_connection_with_goaway() -> None:
    world = _World()
    world.router.receive_client(b"\x00\x00\x04\x09\x00\x00\x00\x00\x01junk")  # bad frame
    world.take()
    assert world.router.finished
    assert CLIENT in world.closed


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_more_streams_than_the_pod_allows_wait_for_a_slot(n: int) -> None:
    world = _World(pod_limit=n)
    sids = [_request(world, f"/w{i}", None, b"q") for i in range(n + 3)]
    world.run()  # with more in flight than n, the pod's h2 would refuse the connection
    for i, sid in enumerate(sids):
        _check(world, sid, None, f"/w{i}", body=b"q", trailer=None)


def test_an_http2_servers_settings_are_recognised_as_its_preface() -> None:
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    greeting = server.data_to_send()
    assert could_be_h2_server_preface(greeting)
    assert could_be_h2_server_preface(greeting[:4])
    assert not could_be_h2_server_preface(greeting[:3])  # too short to tell
    assert not could_be_h2_server_preface(b"220 smtp.example ESMTP\r\n")
    assert not could_be_h2_server_preface(b"\x4a\x00\x00\x00\x0a8.0.36")  # MySQL greeting


def test_a_headers_only_response_stays_one_frame_with_end_stream() -> None:
    world = _World()
    sids = [_request(world, "/trailers-only", u, b"") for u in ("alice", None)]
    seen: list[h2.events.Event] = []
    for _ in range(1000):
        busy = world.busy()
        if not busy:
            break
        wire = busy[0]
        data = bytes(world.wires[wire])
        world.wires[wire].clear()
        if wire[1] == "c":
            seen += world.client.receive(data)
            world.move_client()
        else:
            world.wires[wire] += data
            world.deliver(wire, len(data))
    for sid in sids:
        (response,) = [
            e for e in seen if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid
        ]
        assert response.stream_ended is not None  # HEADERS with END_STREAM: the client sees
        assert dict(response.headers or [])[b"grpc-status"] == b"5"  # its status there


def test_an_h2c_upgrade_request_is_stream_one_then_the_connection_is_http2() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = client.initiate_upgrade_connection()
    assert settings is not None
    head = RequestHead(
        method="GET",
        target="/up",
        http_version="1.1",
        headers=(
            ("host", "pod"),
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", settings.decode().rstrip("=")),  # as curl sends it, unpadded
            ("x-user", "alice"),
        ),
        upgrade=True,
    )
    upgrade = h2c_upgrade_from(head)
    assert upgrade is not None
    assert (b":authority", b"pod") in upgrade.headers and (b"x-user", b"alice") in upgrade.headers
    assert not any(k in (b"connection", b"upgrade", b"http2-settings") for k, _ in upgrade.headers)
    world = _World()
    world.router = H2Router(_route, upgrade=upgrade)
    world.client = _Endpoint(client=True)
    world.client.conn = client  # its preface and SETTINGS come after the 101
    world.client.msgs[1] = _Msg()
    world.wires.clear()
    world.move_client()
    world.take()
    b = _request(world, "/after", None, b"z")
    world.run()
    msg = world.client.msgs[1]
    assert dict(msg.headers)[b"x-served-by"] == b"alice" and msg.ended
    assert bytes(msg.body) == b"alice GET /up\n"
    _check(world, b, None, "/after", body=b"z", trailer=None)


def test_only_bodyless_h2c_upgrades_with_settings_are_taken() -> None:
    base = (("host", "pod"), ("upgrade", "h2c"), ("http2-settings", "AAMAAABkAAQAAP__"))
    head = RequestHead("GET", "/", "1.1", base, upgrade=True)
    assert h2c_upgrade_from(head) is not None
    for extra in ((("content-length", "5"),), (("transfer-encoding", "chunked"),)):
        assert h2c_upgrade_from(RequestHead("POST", "/", "1.1", base + extra, True)) is None
    assert h2c_upgrade_from(RequestHead("GET", "/", "1.1", base[:2], True)) is None
    websocket = (("host", "pod"), ("upgrade", "websocket"), ("http2-settings", "AAMA"))
    assert h2c_upgrade_from(RequestHead("GET", "/", "1.1", websocket, True)) is None
