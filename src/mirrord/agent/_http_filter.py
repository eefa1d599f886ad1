"""HTTP filters for a filtered steal, and sans-IO splitting of an HTTP/1.1 byte stream into
requests (and of a response stream into responses) without changing a byte.

Owns: compiling the config's `http_filter` object into a matcher (`HttpFilter`), the
`RequestSplitter` that cuts a client's bytes into requests (keep-alive, pipelining, Upgrade,
non-HTTP detection), and the `ResponseSplitter` that finds where one response ends. Parsing is
h11's; the bytes forwarded are always the client's and the server's own raw bytes: h11 only
tells us where each message starts and ends (by how much of its buffer it consumed).

Does not own: sockets, routing decisions between sessions, or relaying (see `_incoming.py`).

Theory of operation
-------------------
A request whose whole head has arrived and whose framing is simple (HTTP/1.0 or 1.1, a
`Content-Length` or no body, no `Transfer-Encoding`, no Upgrade/CONNECT, the Host rules h11
applies) is parsed by `_fast_head`, a few compiled regular expressions that accept exactly
what h11's grammar accepts for those lines, and its body is counted off; anything else goes
to h11 as below, which stays the reference (the tests check both paths agree). h11 builds a
connection and a state machine per request: ~45 % of the agent's CPU per mirrored request.
`ResponseSplitter` does the same for a response head with a final status and a
`Content-Length` (or no body: HEAD, 204, 304), and hands everything else (1xx, chunked,
delimited by the close) to h11 with the bytes it holds.

`RequestSplitter` holds one h11 server-role connection per request. After each h11 event it
compares how many bytes h11 still buffers with how many it was fed: the difference is the raw
bytes that event consumed, which are emitted with it. When a request ends, the remaining bytes
start a fresh h11 connection (pipelining; HTTP/1.0 keep-alive). A request that proposes an
Upgrade (or is a CONNECT) pauses the splitter until the caller says whether the response
switched protocols (`switched()`): if so the rest of the connection is a tunnel. Bytes that
cannot be HTTP/1.x (checked on the first line, before h11 waits for a full head) make the
splitter pass everything through untouched from there on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import h11

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "FilterError",
    "HttpFilter",
    "Passthrough",
    "RequestBody",
    "RequestEnded",
    "RequestHead",
    "RequestSplitter",
    "RequestStarted",
    "ResponseBody",
    "ResponseEnded",
    "ResponseSplitter",
    "ResponseStarted",
    "kube_probe_recipe",
]

# h11's default (16 KiB) refuses heads that real clients send (big cookies, JWTs).
MAX_HEAD_SIZE: Final = 64 * 1024
_TOKEN_CHARS: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_MAX_METHOD: Final = 32
_MAX_TARGET: Final = 16 * 1024


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Sentinel("NEED_DATA")
CLOSED: Final = _Sentinel("CLOSED")


class FilterError(ValueError):
    """The `http_filter` object is invalid; the message names the key and what is allowed.
    The agent answers the Subscribe with EINVAL."""


# ---------------------------------------------------------------- filters


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What a filter looks at. Header names are lower case (h11 normalises them)."""

    method: str
    target: str
    http_version: str
    headers: tuple[tuple[str, str], ...]
    upgrade: bool

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


class _Matcher:
    __slots__ = ("kind", "pattern", "regex")

    def __init__(self, kind: str, pattern: str) -> None:
        self.kind = kind
        self.pattern = pattern
        self.regex: re.Pattern[str] | None = None
        if kind == "method":
            if not pattern or not all(ord(c) in _TOKEN_CHARS for c in pattern):
                raise FilterError(f"method filter {pattern!r} is not an HTTP method")
            return
        try:
            # Case-insensitive like mirrord's filters, so "x-user: alice" matches "X-User: Alice".
            self.regex = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise FilterError(f"{kind} filter {pattern!r} is not a valid regex: {exc}") from None

    def matches(self, head: RequestHead) -> bool:
        if self.kind == "method":
            return head.method.upper() == self.pattern.upper()
        assert self.regex is not None
        if self.kind == "path":
            return (
                self.regex.search(head.path) is not None
                or self.regex.search(head.target) is not None
            )
        return any(self.regex.search(f"{k}: {v}") is not None for k, v in head.headers)

    def __repr__(self) -> str:
        return f"{self.kind}={self.pattern!r}"


_TOP_KEYS: Final = {
    "header_filter": "header",
    "path_filter": "path",
    "method_filter": "method",
}
_INNER_KEYS: Final = ("header", "path", "method")


class HttpFilter:
    """A compiled `http_filter` (the config's JSON shape): exactly one of `header_filter`,
    `path_filter`, `method_filter` (strings), `all_of`, `any_of` (lists of `{"header": re}`,
    `{"path": re}`, `{"method": name}`); optional `ports` (the filter applies only on these
    ports; others are stolen unfiltered).

    Regexes are searched case-insensitively: a header regex against each `name: value` line
    (name lower case), a path regex against the path and against the path with its query. A method filter
    compares the method case-insensitively."""

    __slots__ = ("combine", "matchers", "ports", "source")

    def __init__(
        self,
        combine: str,
        matchers: list[_Matcher],
        ports: frozenset[int] | None,
        source: dict[str, Any],
    ) -> None:
        self.combine = combine
        self.matchers = matchers
        self.ports = ports
        self.source = source

    @classmethod
    def from_config(cls, obj: dict[str, Any]) -> HttpFilter:
        if not isinstance(obj, dict):
            raise FilterError(f"http_filter must be an object, got {type(obj).__name__}")
        ports: frozenset[int] | None = None
        if obj.get("ports") is not None:
            raw_ports = obj["ports"]
            if not isinstance(raw_ports, list) or not all(
                isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in raw_ports
            ):
                raise FilterError(f"http_filter.ports must be a list of ports, got {raw_ports!r}")
            ports = frozenset(raw_ports) if raw_ports else None
        unknown = set(obj) - {*_TOP_KEYS, "all_of", "any_of", "ports"}
        if unknown:
            raise FilterError(
                f"http_filter has unknown key(s) {sorted(unknown)}; allowed: header_filter, "
                "path_filter, method_filter, all_of, any_of, ports"
            )
        given = [k for k in (*_TOP_KEYS, "all_of", "any_of") if obj.get(k) is not None]
        if len(given) != 1:
            raise FilterError(
                "http_filter needs exactly one of header_filter, path_filter, method_filter, "
                f"all_of, any_of; got {given or 'none'}"
            )
        key = given[0]
        value = obj[key]
        if key in _TOP_KEYS:
            if not isinstance(value, str):
                raise FilterError(f"http_filter.{key} must be a string, got {value!r}")
            return cls("all", [_Matcher(_TOP_KEYS[key], value)], ports, obj)
        if not isinstance(value, list) or not value:
            raise FilterError(f"http_filter.{key} must be a non-empty list, got {value!r}")
        matchers = []
        for i, item in enumerate(value):
            if not isinstance(item, dict) or len(item) != 1:
                raise FilterError(
                    f'http_filter.{key}[{i}] must be one of {{"header": ...}}, '
                    f'{{"path": ...}}, {{"method": ...}}; got {item!r}'
                )
            ((kind, pattern),) = item.items()
            if kind not in _INNER_KEYS or not isinstance(pattern, str):
                raise FilterError(
                    f"http_filter.{key}[{i}]: {kind!r} must be header, path or method with a "
                    f"string value; got {item!r}"
                )
            matchers.append(_Matcher(kind, pattern))
        return cls("all" if key == "all_of" else "any", matchers, ports, obj)

    def applies_to(self, port: int) -> bool:
        return self.ports is None or port in self.ports

    def matches(self, head: RequestHead) -> bool:
        if self.combine == "all":
            return all(m.matches(head) for m in self.matchers)
        return any(m.matches(head) for m in self.matchers)

    def __repr__(self) -> str:
        return f"<HttpFilter {self.combine}_of {self.matchers!r}>"


def kube_probe_recipe() -> dict[str, Any]:
    """A filter that steals every request except the kubelet's probes (which have no user
    agent other than `kube-probe/...`); requests without a User-Agent stay with the pod."""
    return {"header_filter": "^user-agent: (?!kube-probe)"}


# ---------------------------------------------------------------- request splitting


@dataclass(frozen=True, slots=True)
class RequestStarted:
    head: RequestHead
    raw: bytes


@dataclass(frozen=True, slots=True)
class RequestBody:
    raw: bytes


@dataclass(frozen=True, slots=True)
class RequestEnded:
    """The request is complete; `raw` is its last framing bytes (may be empty). If
    `head.upgrade`, the splitter waits for `switched()` before emitting anything more."""

    raw: bytes
    head: RequestHead


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Bytes that are not (or no longer) HTTP/1.x: forward them untouched. Once emitted, every
    later byte of the connection is a Passthrough too."""

    raw: bytes


RequestEvent = RequestStarted | RequestBody | RequestEnded | Passthrough


def _first_line_could_be_http(buf: bytes | bytearray) -> bool:
    """Could `buf` start an HTTP/1.x request line? Decided on what has arrived, so a binary
    protocol is recognised from its first bytes without waiting for a full head."""
    n = len(buf)
    i = 0
    while i < n and buf[i] in _TOKEN_CHARS:
        i += 1
        if i > _MAX_METHOD:
            return False
    if i == n:
        return True
    if i == 0 or buf[i] != 0x20:
        return False
    i += 1
    start = i
    while i < n and 0x20 < buf[i] < 0x7F:
        i += 1
        if i - start > _MAX_TARGET:
            return False
    if i == n:
        return True
    if i == start or buf[i] != 0x20:
        return False
    i += 1
    rest = bytes(buf[i : i + 10])
    for expected in (b"HTTP/1.1\r\n", b"HTTP/1.0\r\n"):
        if expected.startswith(rest) or rest.startswith(expected):
            return True
    return False


class _Feeder:
    """One h11 connection plus the raw bytes fed to it that no event has consumed yet."""

    __slots__ = ("conn", "prefix", "raw")

    def __init__(self, role: type[h11.CLIENT] | type[h11.SERVER], data: bytes | bytearray) -> None:
        self.conn = h11.Connection(role, max_incomplete_event_size=MAX_HEAD_SIZE)
        self.raw = bytearray()
        self.prefix = b""  # bytes h11 never sees that belong to the next event (blank lines)
        self.feed(data)

    def unconsumed(self) -> bytes:
        return self.prefix + bytes(self.raw)

    def feed(self, data: bytes | bytearray) -> None:
        if data:
            self.raw += data
            self.conn.receive_data(bytes(data))

    def close(self) -> None:
        self.conn.receive_data(b"")

    def next(self) -> tuple[Any, bytes]:
        """(h11 event, the raw bytes it consumed). Raises h11.RemoteProtocolError."""
        event = self.conn.next_event()
        left = len(self.conn.trailing_data[0])
        used = len(self.raw) - left
        out = bytes(self.raw[:used])
        del self.raw[:used]
        if self.prefix and event is not h11.NEED_DATA:
            out, self.prefix = self.prefix + out, b""
        return event, out


# h11's grammar (h11/_abnf.py) for the lines the fast path parses, compiled once.
_FAST_REQUEST_LINE: Final = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+) ([\x21-\x7e]+) HTTP/(1\.[01])"
)
_FAST_HEADER: Final = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*"
)
_FAST_LENGTH: Final = re.compile(rb"[0-9]{1,18}")


def _fast_head(buf: bytes | bytearray, start: int) -> tuple[RequestHead, int, int] | None:
    """(head, end of the head in `buf`, body length) of a simple request head starting at
    `start` that has fully arrived; None when h11 must decide (not all there, another
    framing, an Upgrade, anything its grammar might see differently)."""
    end = buf.find(b"\r\n\r\n", start)
    if end < 0 or end - start > MAX_HEAD_SIZE:
        return None
    lines = bytes(buf[start:end]).split(b"\r\n")
    first = _FAST_REQUEST_LINE.fullmatch(lines[0])
    if first is None:
        return None
    method, target, version = first.groups()
    if method == b"CONNECT":
        return None
    headers: list[tuple[str, str]] = []
    hosts = 0
    length: int | None = None
    for line in lines[1:]:
        field = _FAST_HEADER.fullmatch(line)
        if field is None:
            return None  # obs-fold, bad bytes: h11's call
        name = field[1].lower()
        value = field[2]
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if length is not None or _FAST_LENGTH.fullmatch(value) is None:
                return None
            length = int(value)
        elif name in (b"transfer-encoding", b"upgrade"):
            return None
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
    if hosts > 1 or (hosts == 0 and version == b"1.1"):
        return None  # h11 refuses these: it says how
    head = RequestHead(
        method=method.decode("ascii"),
        target=target.decode("latin-1"),
        http_version=version.decode("ascii"),
        headers=tuple(headers),
        upgrade=False,
    )
    return head, end + 4, length or 0


def _head_from(req: h11.Request) -> RequestHead:
    headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers)
    upgrade = req.method == b"CONNECT" or any(k == "upgrade" for k, _ in headers)
    return RequestHead(
        method=req.method.decode("ascii"),
        target=req.target.decode("latin-1"),
        http_version=req.http_version.decode("ascii"),
        headers=headers,
        upgrade=upgrade,
    )


class RequestSplitter:
    """Cuts a client's byte stream into requests. Feed `receive_data()` (`b""` at EOF), then
    call `next_event()` until it returns `NEED_DATA` (or `CLOSED`). `fast=False`: every
    request through h11 (the reference the tests compare the fast path with)."""

    def __init__(self, *, fast: bool = True) -> None:
        self._fast = fast
        self._buf = bytearray()  # bytes not yet given to a parser (between requests)
        self._feeder: _Feeder | None = None
        self._head: RequestHead | None = None
        self._state = "IDLE"  # IDLE, REQUEST (h11), BODY (fast path), PAUSED, TUNNEL
        self._left = 0  # BODY: bytes of the body still to come
        self._eof = False
        self.requests = 0

    def __repr__(self) -> str:
        return f"<RequestSplitter state={self._state} requests={self.requests} eof={self._eof}>"

    @property
    def state(self) -> str:
        return self._state

    @property
    def idle(self) -> bool:
        """True between requests with nothing of the next one received."""
        return self._state == "IDLE" and not self._buf

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
            if self._feeder is not None:
                self._feeder.close()
            return
        if self._eof:
            raise RuntimeError("receive_data after EOF")
        if self._state == "REQUEST" and self._feeder is not None:
            self._feeder.feed(data)
        else:
            self._buf += data

    def switched(self, switched: bool) -> None:
        """After a `RequestEnded` with `head.upgrade`: did the response switch protocols?"""
        if self._state != "PAUSED":
            raise RuntimeError(f"switched() in state {self._state}")
        if switched:
            self._state = "TUNNEL"
        else:
            self._state = "IDLE"

    def _to_tunnel(self, extra: bytes | bytearray = b"") -> Passthrough | _Sentinel:
        self._state = "TUNNEL"
        data = bytes(extra) + bytes(self._buf)
        self._buf.clear()
        self._feeder = None
        if data:
            return Passthrough(data)
        return CLOSED if self._eof else NEED_DATA

    def next_event(self) -> RequestEvent | _Sentinel:
        if self._state == "PAUSED":
            return NEED_DATA
        if self._state == "TUNNEL":
            if self._buf:
                data = bytes(self._buf)
                self._buf.clear()
                return Passthrough(data)
            return CLOSED if self._eof else NEED_DATA
        if self._state == "IDLE":
            return self._start_request()
        if self._state == "BODY":
            return self._fast_body()
        return self._continue_request()

    def _fast_body(self) -> RequestEvent | _Sentinel:
        """The body of a request `_fast_head` parsed: counted off, then its end."""
        if self._left:
            if not self._buf:
                return self._to_tunnel() if self._eof else NEED_DATA
            n = min(self._left, len(self._buf))
            raw = bytes(self._buf[:n])
            del self._buf[:n]
            self._left -= n
            return RequestBody(raw)
        head = self._head
        assert head is not None
        self._head = None
        self._state = "IDLE"
        return RequestEnded(b"", head)

    def _start_request(self) -> RequestEvent | _Sentinel:
        # h11 refuses the empty lines RFC 9112 says a server should skip before a request line:
        # they stay in the raw bytes of the request that follows them.
        skip = 0
        while self._buf[skip : skip + 2] == b"\r\n":
            skip += 2
        if skip == len(self._buf) or (self._buf[skip:] == b"\r" and not self._eof):
            if self._eof:
                return self._to_tunnel() if self._buf else CLOSED
            return NEED_DATA
        line_end = self._buf.find(b"\r\n", skip)
        first = self._buf[skip : line_end + 2 if line_end >= 0 else len(self._buf)]
        if not _first_line_could_be_http(first):
            return self._to_tunnel()
        fast = _fast_head(self._buf, skip) if self._fast else None
        if fast is not None:
            head, end, self._left = fast
            raw = bytes(self._buf[:end])  # (the blank lines before it included)
            del self._buf[:end]
            self._head = head
            self._state = "BODY"
            self.requests += 1
            return RequestStarted(head, raw)
        prefix = bytes(self._buf[:skip])
        data = bytes(self._buf[skip:])
        self._buf.clear()
        self._feeder = _Feeder(h11.SERVER, data)
        if self._eof:
            self._feeder.close()
        self._state = "REQUEST"
        event = self._continue_request()
        if prefix:
            if isinstance(event, RequestStarted):
                return RequestStarted(event.head, prefix + event.raw)
            if isinstance(event, Passthrough):
                return Passthrough(prefix + event.raw)
            # still waiting for the head: the prefix goes with the head when it comes
            if self._feeder is not None:
                self._feeder.prefix = prefix
        return event

    def _continue_request(self) -> RequestEvent | _Sentinel:
        feeder = self._feeder
        assert feeder is not None
        if self._head is None:
            # Still in the head: re-check the first line as more of it arrives.
            buf = feeder.raw
            skip = 0
            while buf[skip : skip + 2] == b"\r\n":
                skip += 2
            end = buf.find(b"\r\n", skip)
            if not _first_line_could_be_http(buf[skip : end + 2 if end >= 0 else len(buf)]):
                return self._to_tunnel(feeder.unconsumed())
        try:
            event, raw = feeder.next()
        except h11.RemoteProtocolError:
            # Not HTTP after all (or a broken body): everything from here passes through.
            return self._to_tunnel(feeder.unconsumed())
        if isinstance(event, h11.Request):
            self._head = _head_from(event)
            self.requests += 1
            return RequestStarted(self._head, raw)
        if isinstance(event, h11.Data):
            return RequestBody(raw)
        if isinstance(event, h11.EndOfMessage):
            head = self._head
            assert head is not None
            # The rest starts the next request (pipelining) with a fresh parser.
            self._buf[:0] = feeder.raw
            self._feeder = None
            self._head = None
            self._state = "PAUSED" if head.upgrade else "IDLE"
            return RequestEnded(raw, head)
        if event is h11.NEED_DATA:
            if raw:
                return RequestBody(raw) if self._head is not None else NEED_DATA
            return NEED_DATA
        # ConnectionClosed (EOF inside a request); PAUSED cannot come before EndOfMessage.
        return self._to_tunnel(feeder.unconsumed())


# ---------------------------------------------------------------- response splitting


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    status: int
    raw: bytes
    informational: bool


@dataclass(frozen=True, slots=True)
class ResponseBody:
    raw: bytes


@dataclass(frozen=True, slots=True)
class ResponseEnded:
    """The response is complete. `switched`: a 101/2xx-to-CONNECT answer to an upgrade, the
    connection is a tunnel from here. `keep_alive`: the client connection may carry another
    request (False also when the response was delimited by the server closing)."""

    raw: bytes
    switched: bool
    keep_alive: bool


ResponseEvent = ResponseStarted | ResponseBody | ResponseEnded


class ResponseError(Exception):
    """The server's bytes are not a valid HTTP/1.x response to the request."""


def _wants_close(headers: Any) -> bool:
    return any(k.lower() == b"connection" and b"close" in v.lower() for k, v in headers)


# h11's status line (h11/_abnf.py), for HTTP/1.0 and 1.1 only.
_FAST_STATUS_LINE: Final = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: [^\x00\n\r\x0b\x0c]*)?")


def _fast_response_head(head: bytes, method: str) -> tuple[int, int, bool] | None:
    """(status, body length, the server will close) of a whole response head (without its
    blank line) that the fast path can frame: a final status, a Content-Length or no body
    (HEAD, 204, 304), no Transfer-Encoding. None: h11 decides (1xx, chunked, close-delimited,
    anything its grammar might see differently)."""
    lines = head.split(b"\r\n")
    first = _FAST_STATUS_LINE.fullmatch(lines[0])
    if first is None:
        return None
    status = int(first[2])
    if status < 200:
        return None
    close = first[1] == b"1.0"
    length: int | None = None
    for line in lines[1:]:
        field = _FAST_HEADER.fullmatch(line)
        if field is None:
            return None
        name = field[1].lower()
        if name == b"content-length":
            if length is not None or _FAST_LENGTH.fullmatch(field[2]) is None:
                return None
            length = int(field[2])
        elif name == b"transfer-encoding":
            return None
        elif name == b"connection" and b"close" in field[2].lower():
            close = True
    if method == "HEAD" or status in (204, 304):
        return status, 0, close
    if length is None:
        return None  # delimited by the server's close: h11
    return status, length, close


class ResponseSplitter:
    """Finds the end of the response to one request. Bytes after it (the next pipelined
    response, or tunnel bytes after a switch) are `trailing` when it has ended."""

    def __init__(self, head: RequestHead, *, fast: bool = True) -> None:
        self._head = head
        headers = head.headers
        self._request_close = _wants_close((k.encode(), v.encode()) for k, v in headers) or (
            head.http_version == "1.0" and (head.header("connection") or "").lower() != "keep-alive"
        )
        self._upgrade = head.upgrade
        self._method = head.method.upper()
        self._close = False
        self.done = False
        # The fast path (a head with Content-Length, or no body by status or method; see
        # `_fast_response_head`) until it meets anything else; then h11 for the rest.
        self._feeder: _Feeder | None = None
        self._buf = bytearray()
        self._eof = False
        self._left = -1  # fast path: body bytes still to come (-1: before the head)
        if not fast or head.upgrade:
            self._to_h11()

    def _to_h11(self) -> _Feeder:
        feeder = self._feeder = _Feeder(h11.CLIENT, b"")
        head = self._head
        # h11 only parses the response here, and only sends HTTP/1.1: an HTTP/1.0 request (or
        # one without Host, which 1.0 allows) is described to it as 1.1 with a Host; what
        # 1.0 changes for the response (no keep-alive by default) is `_request_close`.
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head.headers]
        if not any(k == "host" for k, _ in head.headers):
            raw_headers.append((b"host", b""))
        feeder.conn.send(
            h11.Request(
                method=head.method,
                target=head.target.encode("latin-1"),
                headers=raw_headers,
                http_version="1.1",
            )
        )
        feeder.feed(self._buf)
        self._buf.clear()
        if self._eof:
            feeder.close()
        return feeder

    @property
    def trailing(self) -> bytes:
        return bytes(self._feeder.raw) if self._feeder is not None else bytes(self._buf)

    def receive_data(self, data: bytes) -> None:
        if self._feeder is not None:
            if data:
                self._feeder.feed(data)
            else:
                self._feeder.close()
        elif data:
            self._buf += data
        else:
            self._eof = True

    def _fast_event(self) -> ResponseEvent | _Sentinel | None:
        """The fast path's next event; None: h11 takes over from here."""
        buf = self._buf
        if self._left < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if self._eof or len(buf) > MAX_HEAD_SIZE or b"\n\n" in buf or b"\n\r\n" in buf:
                    return None  # h11 says what this is
                return NEED_DATA
            parsed = _fast_response_head(bytes(buf[:end]), self._method)
            if parsed is None:
                return None
            status, self._left, close = parsed
            self._close = close
            raw = bytes(buf[: end + 4])
            del buf[: end + 4]
            return ResponseStarted(status, raw, informational=False)
        if self._left:
            if not buf:
                if self._eof:
                    raise ResponseError(
                        "the server closed the connection before a complete response"
                    )
                return NEED_DATA
            n = min(self._left, len(buf))
            raw = bytes(buf[:n])
            del buf[:n]
            self._left -= n
            return ResponseBody(raw)
        self.done = True
        return ResponseEnded(
            b"", switched=False, keep_alive=not (self._close or self._request_close)
        )

    def next_event(self) -> ResponseEvent | _Sentinel:
        """Raises `ResponseError` when the bytes are not a response."""
        if self.done:
            return NEED_DATA
        if self._feeder is None:
            fast = self._fast_event()
            if fast is not None:
                return fast
            self._to_h11()
        assert self._feeder is not None
        try:
            event, raw = self._feeder.next()
        except h11.RemoteProtocolError as exc:
            raise ResponseError(str(exc)) from None
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101 and self._upgrade:
                self.done = True
                return ResponseEnded(raw, switched=True, keep_alive=False)
            return ResponseStarted(event.status_code, raw, informational=True)
        if isinstance(event, h11.Response):
            names = {k.lower() for k, _ in event.headers}
            close_delimited = (
                b"content-length" not in names
                and b"transfer-encoding" not in names
                and event.status_code not in (204, 304)
                and self._method != "HEAD"
            )
            self._close = (
                _wants_close(event.headers) or event.http_version == b"1.0" or (close_delimited)
            )
            if self._feeder.conn.their_state is h11.SWITCHED_PROTOCOL:
                # a 2xx answer to CONNECT: the tunnel starts right after the head
                self.done = True
                return ResponseEnded(raw, switched=True, keep_alive=False)
            return ResponseStarted(event.status_code, raw, informational=False)
        if isinstance(event, h11.Data):
            return ResponseBody(raw)
        if isinstance(event, h11.EndOfMessage):
            self.done = True
            closed = (
                self._feeder.conn.their_state is h11.MUST_CLOSE
                or self._feeder.conn.their_state is h11.CLOSED
            )
            keep = not (self._close or self._request_close or closed)
            return ResponseEnded(raw, switched=False, keep_alive=keep)
        if isinstance(event, h11.ConnectionClosed):
            raise ResponseError("the server closed the connection before a complete response")
        if event is h11.NEED_DATA and raw:
            return ResponseBody(raw)
        return NEED_DATA
