"""The HTTP filter and the request/response splitters, sans-IO: no sockets, bytes in, events
out. The invariant everywhere: the raw bytes of the events concatenate to the input, unchanged."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord.agent._http_filter import (
    CLOSED,
    NEED_DATA,
    FilterError,
    HttpFilter,
    Passthrough,
    RequestBody,
    RequestEnded,
    RequestHead,
    RequestSplitter,
    RequestStarted,
    ResponseBody,
    ResponseEnded,
    ResponseError,
    ResponseSplitter,
    ResponseStarted,
    kube_probe_recipe,
)


def drain(splitter: RequestSplitter, *, max_events: int = 10_000) -> list[Any]:
    events: list[Any] = []
    for _ in range(max_events):
        ev = splitter.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            return events
        events.append(ev)
        if isinstance(ev, RequestEnded) and ev.head.upgrade:
            splitter.switched(False)
    raise AssertionError("splitter did not settle")


def split_all(chunks: list[bytes], *, eof: bool = True) -> list[Any]:
    splitter = RequestSplitter()
    events: list[Any] = []
    for chunk in chunks:
        splitter.receive_data(chunk)
        events += drain(splitter)
    if eof:
        splitter.receive_data(b"")
        events += drain(splitter)
    return events


def raw_of(events: list[Any]) -> bytes:
    return b"".join(e.raw for e in events)


def head(
    method: str = "GET",
    target: str = "/",
    headers: tuple[tuple[str, str], ...] = (("host", "pod"),),
) -> RequestHead:
    return RequestHead(
        method=method, target=target, http_version="1.1", headers=headers, upgrade=False
    )


# ---------------------------------------------------------------- filters


def test_header_filter_matches_name_and_value_case_insensitively() -> None:
    f = HttpFilter.from_config({"header_filter": "x-user: alice"})
    assert f.matches(head(headers=(("host", "pod"), ("x-user", "Alice"))))
    assert not f.matches(head(headers=(("host", "pod"), ("x-user", "bob"))))
    assert not f.matches(head())


def test_path_filter_matches_the_path_or_the_path_with_its_query() -> None:
    f = HttpFilter.from_config({"path_filter": "^/api/v1/users$"})
    assert f.matches(head(target="/api/v1/users?x=1"))
    assert not f.matches(head(target="/health?p=/api/v1/users"))
    q = HttpFilter.from_config({"path_filter": "[?&]debug=me"})
    assert q.matches(head(target="/any?debug=me"))
    assert not q.matches(head(target="/any"))


def test_method_filter() -> None:
    f = HttpFilter.from_config({"method_filter": "post"})
    assert f.matches(head(method="POST"))
    assert not f.matches(head(method="GET"))


def test_all_of_and_any_of() -> None:
    both = HttpFilter.from_config(
        {"all_of": [{"header": "^x-user: alice$"}, {"path": "^/api"}, {"method": "GET"}]}
    )
    alice = (("host", "pod"), ("x-user", "alice"))
    assert both.matches(head(target="/api/x", headers=alice))
    assert not both.matches(head(target="/other", headers=alice))
    assert not both.matches(head(method="PUT", target="/api/x", headers=alice))
    either = HttpFilter.from_config({"any_of": [{"header": "^x-user: alice$"}, {"path": "^/api"}]})
    assert either.matches(head(target="/other", headers=alice))
    assert either.matches(head(target="/api"))
    assert not either.matches(head(target="/other"))


def test_ports_limit_where_the_filter_applies() -> None:
    f = HttpFilter.from_config({"header_filter": "a", "ports": [80, 8080]})
    assert f.applies_to(80)
    assert not f.applies_to(9999)
    assert HttpFilter.from_config({"header_filter": "a"}).applies_to(9999)


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ({}, "exactly one"),
        ({"header_filter": "a", "path_filter": "b"}, "exactly one"),
        ({"header_filter": "("}, "not a valid regex"),
        ({"header_filter": 3}, "must be a string"),
        ({"all_of": []}, "non-empty list"),
        ({"any_of": [{"cookie": "x"}]}, "header, path or method"),
        ({"any_of": [{"header": "a", "path": "b"}]}, "must be one of"),
        ({"method_filter": "GE T"}, "not an HTTP method"),
        ({"header_filter": "a", "ports": ["80"]}, "list of ports"),
        ({"header_filter": "a", "colour": "red"}, "unknown key"),
    ],
)
def test_invalid_filters_say_what_is_wrong(obj: dict[str, Any], words: str) -> None:
    with pytest.raises(FilterError, match=words):
        HttpFilter.from_config(obj)


def test_kube_probe_recipe_leaves_probes_to_the_pod() -> None:
    f = HttpFilter.from_config(kube_probe_recipe())
    assert not f.matches(head(headers=(("host", "pod"), ("user-agent", "kube-probe/1.29"))))
    assert f.matches(head(headers=(("host", "pod"), ("user-agent", "curl/8.0"))))


# ---------------------------------------------------------------- request splitting


def test_keep_alive_and_pipelined_requests_are_cut_exactly() -> None:
    data = (
        b"GET /a HTTP/1.1\r\nHost: pod\r\nX-User: alice\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: pod\r\nContent-Length: 5\r\n\r\nhello"
        b"PUT /c HTTP/1.1\r\nHost: pod\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n"
        b"DELETE /d HTTP/1.1\r\nHost: pod\r\n\r\n"
    )
    events = split_all([data])
    assert raw_of(events) == data
    starts = [e for e in events if isinstance(e, RequestStarted)]
    assert [(s.head.method, s.head.target) for s in starts] == [
        ("GET", "/a"),
        ("POST", "/b"),
        ("PUT", "/c"),
        ("DELETE", "/d"),
    ]
    assert starts[0].head.header("X-USER") == "alice"
    assert sum(isinstance(e, RequestEnded) for e in events) == 4
    assert not any(isinstance(e, Passthrough) for e in events)


def test_each_request_raw_is_its_own_bytes() -> None:
    r1 = b"POST /b HTTP/1.1\r\nHost: pod\r\nContent-Length: 5\r\n\r\nhello"
    r2 = b"GET / HTTP/1.1\r\nHost: pod\r\n\r\n"
    events = split_all([r1 + r2])
    per_request: list[bytes] = []
    for e in events:
        if isinstance(e, RequestStarted):
            per_request.append(b"")
        per_request[-1] += e.raw
    assert per_request == [r1, r2]


def test_byte_by_byte_gives_the_same_requests() -> None:
    data = b"\r\nGET /x HTTP/1.1\r\nHost: pod\r\n\r\nPOST / HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\nok"
    events = split_all([data[i : i + 1] for i in range(len(data))])
    assert raw_of(events) == data
    assert [e.head.target for e in events if isinstance(e, RequestStarted)] == ["/x", "/"]


def test_non_http_bytes_pass_through_untouched_at_once() -> None:
    splitter = RequestSplitter()
    splitter.receive_data(b"\x16\x03\x01\x02\x00\x01")  # a TLS ClientHello starts like this
    events = drain(splitter)
    assert events == [Passthrough(b"\x16\x03\x01\x02\x00\x01")]
    splitter.receive_data(b"more")
    assert drain(splitter) == [Passthrough(b"more")]


def test_http2_preface_passes_through() -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert raw_of(split_all([preface])) == preface
    assert all(isinstance(e, Passthrough) for e in split_all([preface]))


def test_garbage_after_a_request_passes_through() -> None:
    data = b"GET / HTTP/1.1\r\nHost: pod\r\n\r\nSSH-2.0-OpenSSH\r\n"
    events = split_all([data])
    assert raw_of(events) == data
    assert isinstance(events[-1], Passthrough)
    assert events[-1].raw == b"SSH-2.0-OpenSSH\r\n"


def test_upgrade_pauses_until_the_caller_knows_if_it_switched() -> None:
    req = b"GET /ws HTTP/1.1\r\nHost: pod\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    splitter = RequestSplitter()
    splitter.receive_data(req + b"\x81\x05hello")
    started = splitter.next_event()
    assert isinstance(started, RequestStarted) and started.head.upgrade
    ended = splitter.next_event()
    assert isinstance(ended, RequestEnded)
    assert splitter.next_event() is NEED_DATA  # paused: frames are not parsed as HTTP
    splitter.switched(True)
    assert splitter.next_event() == Passthrough(b"\x81\x05hello")


def test_refused_upgrade_goes_back_to_http() -> None:
    req = b"GET /ws HTTP/1.1\r\nHost: pod\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    nxt = b"GET /next HTTP/1.1\r\nHost: pod\r\n\r\n"
    splitter = RequestSplitter()
    splitter.receive_data(req + nxt)
    assert isinstance(splitter.next_event(), RequestStarted)
    assert isinstance(splitter.next_event(), RequestEnded)
    splitter.switched(False)
    started = splitter.next_event()
    assert isinstance(started, RequestStarted) and started.head.target == "/next"


def test_truncated_body_at_eof_passes_the_rest_through() -> None:
    data = b"POST / HTTP/1.1\r\nHost: pod\r\nContent-Length: 10\r\n\r\nabc"
    events = split_all([data])
    assert raw_of(events) == data


def test_eof_between_requests_is_closed() -> None:
    splitter = RequestSplitter()
    splitter.receive_data(b"GET / HTTP/1.1\r\nHost: pod\r\n\r\n")
    drain(splitter)
    assert splitter.idle
    splitter.receive_data(b"")
    assert splitter.next_event() is CLOSED


# ---------------------------------------------------------------- responses


def response_events(req: RequestHead, data: bytes, *, eof: bool = False) -> tuple[list[Any], bytes]:
    rs = ResponseSplitter(req)
    rs.receive_data(data)
    if eof:
        rs.receive_data(b"")
    events: list[Any] = []
    for _ in range(1000):
        ev = rs.next_event()
        if ev is NEED_DATA:
            break
        events.append(ev)
    return events, rs.trailing


def test_response_ends_at_content_length_and_leaves_the_next() -> None:
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    events, rest = response_events(head(), first + b"HTTP/1.1 404 Not Found\r\n")
    assert raw_of(events) == first
    assert isinstance(events[-1], ResponseEnded) and events[-1].keep_alive
    assert rest == b"HTTP/1.1 404 Not Found\r\n"


def test_head_response_has_no_body_and_100_continue_is_passed_on() -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
    events, rest = response_events(head(method="HEAD"), data)
    assert raw_of(events) == data and rest == b""
    assert isinstance(events[0], ResponseStarted) and events[0].informational
    assert isinstance(events[-1], ResponseEnded)


def test_close_delimited_response_ends_at_eof_without_keep_alive() -> None:
    data = b"HTTP/1.1 200 OK\r\n\r\nall of it"
    events, _ = response_events(head(), data, eof=True)
    assert raw_of(events) == data
    assert isinstance(events[-1], ResponseEnded) and not events[-1].keep_alive


def test_switching_protocols_ends_with_switched() -> None:
    up = RequestHead(
        method="GET",
        target="/ws",
        http_version="1.1",
        headers=(("host", "pod"), ("upgrade", "websocket"), ("connection", "Upgrade")),
        upgrade=True,
    )
    data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    events, rest = response_events(up, data + b"\x81\x02hi")
    assert raw_of(events) == data
    assert isinstance(events[-1], ResponseEnded) and events[-1].switched
    assert rest == b"\x81\x02hi"


def test_chunked_response() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    events, rest = response_events(head(), data)
    assert raw_of(events) == data and rest == b""
    assert isinstance(events[1], ResponseBody)


# ---------------------------------------------------------------- fuzzing

_methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
_paths = st.from_regex(r"\A/[a-z0-9/._~-]{0,20}(\?[a-z0-9=&]{0,10})?\Z", fullmatch=True)
_values = st.from_regex(r"\A[a-zA-Z0-9 ;=,./-]{0,20}\Z", fullmatch=True).map(str.strip)
_names = st.from_regex(r"\Ax-[a-z]{1,8}\Z", fullmatch=True)


@st.composite
def http_request(draw: st.DrawFn) -> tuple[bytes, str, str]:
    method = draw(_methods)
    path = draw(_paths)
    headers = [("Host", "pod")]
    headers += draw(st.lists(st.tuples(_names, _values), max_size=4))
    body = draw(st.binary(max_size=64))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "none":
        body = b""
    elif framing == "length":
        headers.append(("Content-Length", str(len(body))))
    else:
        headers.append(("Transfer-Encoding", "chunked"))
        cut = draw(st.integers(0, len(body)))
        pieces = [p for p in (body[:cut], body[cut:]) if p]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body, method, path


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return [c for c in out if c]


@settings(max_examples=200, deadline=None)
@given(reqs=st.lists(http_request(), min_size=1, max_size=6), cuts=st.lists(st.integers(0, 10**6)))
def test_fuzz_pipelined_requests_roundtrip(
    reqs: list[tuple[bytes, str, str]], cuts: list[int]
) -> None:
    data = b"".join(r for r, _, _ in reqs)
    events = split_all(chunked(data, cuts))
    assert raw_of(events) == data
    starts = [e.head for e in events if isinstance(e, RequestStarted)]
    assert [(h.method, h.target) for h in starts] == [(m, p) for _, m, p in reqs]
    assert not any(isinstance(e, Passthrough) for e in events)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 10**6)))
def test_fuzz_arbitrary_bytes_are_never_lost_or_changed(data: bytes, cuts: list[int]) -> None:
    events = split_all(chunked(data, cuts))
    assert raw_of(events) == data


@settings(max_examples=200, deadline=None)
@given(
    req=http_request(),
    junk=st.binary(min_size=1, max_size=50),
    cuts=st.lists(st.integers(0, 10**6)),
)
def test_fuzz_request_then_junk(req: tuple[bytes, str, str], junk: bytes, cuts: list[int]) -> None:
    data = req[0] + junk
    events = split_all(chunked(data, cuts))
    assert raw_of(events) == data
    assert isinstance(events[0], RequestStarted)
    assert events[0].head.target == req[2]


@settings(max_examples=150, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=40), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 10**6)),
)
def test_fuzz_pipelined_responses(bodies: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b) for b in bodies
    )
    pending = chunked(wire, cuts)
    seen: list[bytes] = []
    carry = b""
    for _ in bodies:
        rs = ResponseSplitter(head())
        if carry:
            rs.receive_data(carry)
        got = b""
        for _ in range(10_000):
            ev = rs.next_event()
            if ev is NEED_DATA:
                if not pending:
                    break
                rs.receive_data(pending.pop(0))
                continue
            got += ev.raw  # type: ignore[union-attr]
            if isinstance(ev, ResponseEnded):
                break
        seen.append(got)
        carry = rs.trailing
    assert b"".join(seen) == wire
    assert len(seen) == len(bodies)


# ---------------------------------------------------------------- the fast path against h11


def _mostly(good: list[str], odd: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(*[st.sampled_from(good)] * 8, st.sampled_from(odd))


_odd_names = _mostly(
    ["x-a", "X-B", "Accept", "Content-Length", "Connection", "Expect"],
    ["Host", "Transfer-Encoding", "Upgrade", "Bad Name", "x\x00y", "", "h\xe9llo", "x:y"],
)
_odd_values = _mostly(
    ["pod", "", " pod ", "\tpod\t", "a b", "a\tb", "5", "0", "3", "keep-alive", "close"],
    ["05", "-1", "5, 5", "5 5", "abc", "chunked", "websocket", "caf\xe9", "a\x00b", "a\rb",
     "a\nb", "a\x0bb", "1234567890123456789012", "100-continue"],
)  # fmt: skip
_versions = _mostly(["HTTP/1.1", "HTTP/1.0"], ["HTTP/1.2", "HTTP/2.0", "http/1.1"])
_odd_methods = _mostly(["GET", "POST", "M-SEARCH"], ["CONNECT", "get", "G T"])
_odd_targets = _mostly(["/", "/a?b=c", "*", "http://x/y"], ["/a b", "/\x7f", "/\xe9"])


@st.composite
def odd_request(draw: st.DrawFn) -> bytes:
    """A request head near and across the edges of what h11 accepts, with a body."""
    line = f"{draw(_odd_methods)} {draw(_odd_targets)} {draw(_versions)}"
    headers = draw(st.lists(st.tuples(_odd_names, _odd_values), max_size=4))
    hosts = draw(st.sampled_from([1, 1, 1, 0, 2]))
    headers[draw(st.integers(0, len(headers))) : 0] = [("Host", "pod")] * hosts
    sep = draw(_mostly([": ", ":"], [" : ", ":\t"]))
    lines = [line] + [f"{k}{sep}{v}" for k, v in headers]
    if draw(st.integers(0, 9)) == 9:
        lines.insert(draw(st.integers(1, len(lines))), " folded")  # obs-fold
    eol = draw(_mostly(["\r\n"], ["\n"]))
    prefix = draw(_mostly([""], ["\r\n", "\r\n\r\n"]))
    body = draw(st.binary(max_size=12))
    return (prefix + eol.join(lines) + eol + eol).encode("latin-1") + body


def normalized(events: list[Any]) -> list[Any]:
    """Events with each request's body bytes joined (h11 and the fast path may cut a body
    into different pieces) and passthrough bytes joined."""
    out: list[Any] = []
    body = b""
    for ev in events:
        if isinstance(ev, RequestStarted):
            out.append(("start", ev.head, ev.raw))
        elif isinstance(ev, RequestBody):
            body += ev.raw
        elif isinstance(ev, RequestEnded):
            out.append(("end", ev.head, body + ev.raw))
            body = b""
        else:
            if body:
                out.append(("body", body))
                body = b""
            if out and out[-1][0] == "pass":
                out[-1] = ("pass", out[-1][1] + ev.raw)
            else:
                out.append(("pass", ev.raw))
    if body:
        out.append(("body", body))
    return out


def split_with(chunks: list[bytes], *, fast: bool) -> list[Any]:
    splitter = RequestSplitter(fast=fast)
    events: list[Any] = []
    for chunk in [*chunks, b""]:
        splitter.receive_data(chunk)
        events += drain(splitter)
    return events


@settings(max_examples=600, deadline=None)
@given(reqs=st.lists(odd_request(), min_size=1, max_size=4), cuts=st.lists(st.integers(0, 10**6)))
def test_fuzz_fast_path_agrees_with_h11(reqs: list[bytes], cuts: list[int]) -> None:
    data = b"".join(reqs)
    chunks = chunked(data, cuts)
    fast = split_with(chunks, fast=True)
    assert normalized(fast) == normalized(split_with(chunks, fast=False))
    assert raw_of(fast) == data


def test_fast_path_takes_simple_heads_and_leaves_the_rest_to_h11() -> None:
    simple = b"POST /x HTTP/1.1\r\nHost: pod\r\nContent-Length: 3\r\n\r\nabc"
    splitter = RequestSplitter()
    splitter.receive_data(simple)
    assert isinstance(splitter.next_event(), RequestStarted)
    assert splitter.state == "BODY"  # parsed without h11
    for other in (
        b"POST /x HTTP/1.1\r\nHost: pod\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: pod\r\nUpgrade: websocket\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: pod\r\n folded\r\n\r\n",
    ):
        splitter = RequestSplitter()
        splitter.receive_data(other)
        assert isinstance(splitter.next_event(), RequestStarted)
        assert splitter.state == "REQUEST", other  # h11's


@settings(max_examples=300, deadline=None)
@given(
    reqs=st.lists(http_request(), min_size=1, max_size=5),
    odd=st.lists(odd_request(), max_size=1),
    cuts=st.lists(st.integers(0, 10**6)),
)
def test_fuzz_fast_path_agrees_with_h11_on_valid_requests(
    reqs: list[tuple[bytes, str, str]], odd: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(r for r, _, _ in reqs) + b"".join(odd)
    chunks = chunked(data, cuts)
    fast = split_with(chunks, fast=True)
    assert normalized(fast) == normalized(split_with(chunks, fast=False))
    assert raw_of(fast) == data


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # no Host: h11 refuses it
        b"GET / HTTP/1.0\r\n\r\n",  # HTTP/1.0 needs none
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2 \r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\tfolded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX : 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xe9 \t\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
    ],
)
def test_fast_path_agrees_with_h11_at_the_edges(data: bytes) -> None:
    for cut in (len(data), len(data) // 2, 1):
        chunks = [data[:cut], data[cut:]]
        fast = split_with(chunks, fast=True)
        assert normalized(fast) == normalized(split_with(chunks, fast=False))
        assert raw_of(fast) == data


_statuses = _mostly(["200 OK", "404 Not Found", "204 No Content", "304 NM", "500"], ["100 Continue", "101 Switching", "20 X", "200 OK\x00"])  # fmt: skip
_resp_versions = _mostly(["HTTP/1.1", "HTTP/1.0"], ["HTTP/1.2", "HTTP/2", "HTTP/1.1 "])


@st.composite
def odd_response(draw: st.DrawFn) -> bytes:
    """A response near and across the edges of what h11 accepts, framed in any way."""
    names = _mostly(["x-a", "Server", "Connection"], ["Content-Length", "Bad Name", "x\x00"])
    headers = draw(st.lists(st.tuples(names, _odd_values), max_size=3))
    body = draw(st.binary(max_size=10))
    framing = draw(_mostly(["length", "none"], ["chunked", "length twice"]))
    if framing.startswith("length"):
        headers += [("Content-Length", str(len(body)))] * (2 if framing == "length twice" else 1)
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    lines = [f"{draw(_resp_versions)} {draw(_statuses)}"] + [f"{k}: {v}" for k, v in headers]
    eol = draw(_mostly(["\r\n"], ["\n"]))
    return (eol.join(lines) + eol + eol).encode("latin-1") + body


def response_outcome(
    req: RequestHead, chunks: list[bytes], *, fast: bool, eof: bool
) -> tuple[list[Any], bytes]:
    """The events of one response (bodies joined, an error as its message) and what trails."""
    splitter = ResponseSplitter(req, fast=fast)
    out: list[Any] = []
    body = b""
    try:
        for chunk in [*chunks, *([b""] if eof else [])]:
            splitter.receive_data(chunk)
            for _ in range(10_000):
                ev = splitter.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, ResponseStarted):
                    out.append(("start", ev.status, ev.raw, ev.informational))
                elif isinstance(ev, ResponseBody):
                    body += ev.raw
                else:
                    assert isinstance(ev, ResponseEnded)
                    out.append(("end", body + ev.raw, ev.switched, ev.keep_alive))
                    body = b""
            if splitter.done:
                break
    except ResponseError:
        out.append(("error",))
    return out, splitter.trailing if splitter.done else b""


@settings(max_examples=400, deadline=None)
@given(
    resp=odd_response(),
    request=st.tuples(
        _mostly(["GET", "HEAD", "POST"], ["CONNECT"]), st.sampled_from(["1.1", "1.0"])
    ),
    extra=st.binary(max_size=8),
    cuts=st.lists(st.integers(0, 10**6)),
    eof=st.booleans(),
)
def test_fuzz_fast_response_path_agrees_with_h11(
    resp: bytes, request: tuple[str, str], extra: bytes, cuts: list[int], eof: bool
) -> None:
    method, version = request
    req = RequestHead(
        method=method,
        target="/",
        http_version=version,
        headers=(("host", "pod"),),
        upgrade=method == "CONNECT",
    )
    chunks = chunked(resp + extra, cuts)
    fast = response_outcome(req, chunks, fast=True, eof=eof)
    assert fast == response_outcome(req, chunks, fast=False, eof=eof)


@pytest.mark.parametrize(
    ("method", "data"),
    [
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nnext"),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\nnext"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\nnext"),
        ("GET", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ("GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"),
        ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\n\r\nuntil the close"),
        (
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        ("GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ("GET", b"HTTP/1.1 200\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"),
        ("GET", b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"),  # cut short by EOF
        ("GET", b"HTTP/2 200 OK\r\n\r\n"),
    ],
)
def test_fast_response_path_agrees_with_h11_at_the_edges(method: str, data: bytes) -> None:
    req = RequestHead(
        method=method, target="/", http_version="1.1", headers=(("host", "a"),), upgrade=False
    )
    for cut in (len(data), len(data) // 2, 1):
        for eof in (False, True):
            chunks = [data[:cut], data[cut:]]
            fast = response_outcome(req, chunks, fast=True, eof=eof)
            assert fast == response_outcome(req, chunks, fast=False, eof=eof), (cut, eof)
